"""Fisher files: a Fisher diagonal saved once, shared beside the model it belongs to, checked
against a model before use.

Format: safetensors (no pickle, safe to load from an untrusted source), one tensor per parameter
name, and string metadata:

* ``format`` = ``"fastewc-fisher"``, ``format_version``;
* ``kind``, ``num_samples``, ``data`` (a description of the data, if given), ``dtype``,
  ``fastewc_version``;
* ``fingerprint``: SHA-256 of the sorted ``name:shape`` list, and ``shapes`` (JSON
  ``{name: shape}``): what a model must have for the Fisher to fit it;
* ``user``: the caller's own ``metadata`` dict, as JSON.

Small Fishers are one file. Above ``max_shard_bytes`` they are split like Hugging Face
checkpoints: ``fisher-00001-of-0000N.safetensors`` ... plus ``fisher.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {name: file}}``), in a folder. Every file is written under a
temporary name and renamed into place, so a crash mid-save leaves no file that looks whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .._utils import require, shard_names, write_atomically
from ..errors import EWCInputError

__all__ = ["FisherDict", "INDEX_NAME", "check_fits", "fingerprint", "fisher_tensor_names", "load_fisher",
           "open_fisher_tensors", "save_fisher"]

FORMAT = "fastewc-fisher"
FORMAT_VERSION = 1
SINGLE_NAME = "fisher.safetensors"
INDEX_NAME = "fisher.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


class FisherDict(dict):
    """``{name: Fisher tensor}`` as loaded from a Fisher file, with its ``metadata`` (a dict:
    kind, num_samples, data, dtype, fastewc_version, fingerprint, shapes, user). A plain dict
    everywhere one is accepted (``EWCRegularizer.register_task``, merging)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: dict):
        super().__init__(tensors)
        self.metadata = metadata


def fingerprint(shapes: Mapping[str, tuple]) -> str:
    """SHA-256 of the sorted ``name:shape`` pairs: equal exactly when names and shapes are."""
    text = "\n".join(f"{n}:{','.join(str(int(d)) for d in s)}" for n, s in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _st():
    return require("safetensors.torch", extra="safetensors", package="safetensors")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastewc")
    except PackageNotFoundError:
        return "unknown"


def _check_fisher(fisher) -> dict[str, torch.Tensor]:
    if not isinstance(fisher, Mapping) or not fisher:
        raise EWCInputError(f"fisher must be a non-empty dict {{name: tensor}}; got {type(fisher).__name__}"
                            + (" (empty)" if isinstance(fisher, Mapping) else ""))
    out = {}
    for n, t in fisher.items():
        if not isinstance(n, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise EWCInputError(f"fisher[{n!r}] must be a floating-point tensor under a str name; got "
                                f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else f' of {t.dtype}'}")
        if t.layout != torch.strided:
            raise EWCInputError(f"fisher[{n!r}] is a {t.layout} tensor; give a dense one")
        out[n] = t.detach().to("cpu").contiguous()
    return out


def save_fisher(fisher: Mapping[str, torch.Tensor], path: str | Path, *, metadata: Mapping | None = None,
                kind: str | None = None, num_samples: int | None = None, data: str | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``fisher`` (``{name: tensor}``, e.g. from :func:`fastewc.estimate_fisher`) as a Fisher
    file; returns the paths written.

    ``path``: a ``*.safetensors`` file (one file, whatever the size), or a folder (created if
    needed), which gets ``fisher.safetensors`` or, above ``max_shard_bytes``, numbered shards and
    an index. ``kind``, ``num_samples``, ``data`` describe the estimate (``kind`` and
    ``num_samples`` default to what ``estimate_fisher(..., return_info=True)``'s report says when
    ``fisher`` carries one in its ``metadata``); ``metadata``: anything else JSON can hold."""
    tensors = _check_fisher(fisher)
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise EWCInputError(f"max_shard_bytes must be a positive int; got {max_shard_bytes!r}")
    try:
        user = json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as e:
        raise EWCInputError(f"metadata must be a dict JSON can hold: {e}") from None
    old = getattr(fisher, "metadata", {}) or {}
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "kind": str(kind if kind is not None else old.get("kind", "unknown")),
            "num_samples": str(num_samples if num_samples is not None else old.get("num_samples", "unknown")),
            "data": str(data if data is not None else old.get("data", "")),
            "dtype": ",".join(dtypes), "fastewc_version": _version(), "fingerprint": fingerprint(shapes),
            "shapes": json.dumps(shapes), "user": user}
    st = _st()
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.parent.is_dir():
            raise EWCInputError(f"cannot save to {path}: the folder {path.parent} does not exist")
        write_atomically(path, lambda tmp: st.save_file(tensors, str(tmp), metadata=meta))
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    shards = shard_names({n: t.numel() * t.element_size() for n, t in tensors.items()}, max_shard_bytes)
    if len(shards) == 1:
        target = path / SINGLE_NAME
        write_atomically(target, lambda tmp: st.save_file(tensors, str(tmp), metadata=meta))
        return [target]
    written, weight_map = [], {}
    for k, names in enumerate(shards, 1):
        target = path / f"fisher-{k:05d}-of-{len(shards):05d}.safetensors"
        part = {n: tensors[n] for n in names}
        write_atomically(target, lambda tmp, part=part: st.save_file(part, str(tmp), metadata=meta))
        weight_map.update({n: target.name for n in names})
        written.append(target)
    index = path / INDEX_NAME
    write_atomically(index, lambda tmp: Path(tmp).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1)))
    return [*written, index]


def _locate(path: str | Path) -> tuple[dict[str, Path], dict]:
    """``({name: file}, metadata)`` of a Fisher file, shard folder or index."""
    path = Path(path)
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            path = path / INDEX_NAME
        elif (path / SINGLE_NAME).is_file():
            path = path / SINGLE_NAME
        else:
            raise EWCInputError(f"{path} holds no Fisher file ({SINGLE_NAME} or {INDEX_NAME})")
    if not path.is_file():
        raise EWCInputError(f"no such Fisher file: {path}")
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            weight_map, meta = index["weight_map"], index["metadata"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EWCInputError(f"{path}: not a Fisher index ({type(e).__name__}: {e})") from None
        files = {n: path.parent / f for n, f in weight_map.items()}
    else:
        try:
            with _st().safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                files = {n: path for n in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise EWCInputError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise EWCInputError(f"{path}: not a fastewc Fisher file (metadata format {meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise EWCInputError(f"{path}: Fisher file format {meta['format_version']} is newer than this fastewc "
                            f"reads ({FORMAT_VERSION}); upgrade fastewc")
    return files, meta


def _metadata(meta: dict) -> dict:
    out = dict(meta)
    out["shapes"] = {n: tuple(s) for n, s in json.loads(meta.get("shapes", "{}")).items()}
    out["user"] = json.loads(meta.get("user", "{}"))
    if out.get("num_samples", "").isdigit():
        out["num_samples"] = int(out["num_samples"])
    return out


def check_fits(meta: dict, model: nn.Module, where: str) -> None:
    """Raise ``EWCInputError`` unless every name of the Fisher is a parameter of ``model`` with
    the recorded shape (a Fisher may cover part of a model, e.g. its trainable parameters)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in meta["shapes"] if n not in params]
    wrong = [f"{n} {list(s)} (model: {list(params[n].shape)})" for n, s in meta["shapes"].items()
             if n in params and tuple(params[n].shape) != tuple(s)]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} names the model lacks ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if wrong:
            parts.append(f"{len(wrong)} shapes that differ ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
        raise EWCInputError(f"{where}: this Fisher does not fit the model: " + " and ".join(parts))


def load_fisher(path: str | Path, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> FisherDict:
    """The Fisher saved by :func:`save_fisher` at ``path`` (file, folder or index), as a
    :class:`FisherDict` on ``device``. With ``model``, refused (``EWCInputError`` naming what
    differs) unless every name is a parameter of the model with the same shape. Shards are
    checked against the index's fingerprint."""
    files, meta = _locate(path)
    meta = _metadata(meta)
    if fingerprint(meta["shapes"]) != meta.get("fingerprint") or set(meta["shapes"]) != set(files):
        raise EWCInputError(f"{path}: the Fisher file's names and shapes do not match its fingerprint (damaged or "
                            "edited)")
    if model is not None:
        check_fits(meta, model, str(path))
    tensors = dict(open_fisher_tensors(files, device=device))
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(meta["shapes"][n]):
            raise EWCInputError(f"{path}: tensor {n!r} has shape {list(t.shape)}, the metadata says {meta['shapes'][n]}")
    return FisherDict(tensors, meta)


def open_fisher_tensors(files: Mapping[str, Path], names=None, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for ``names`` (default all) from the files that hold them, one file open
    at a time (files in order)."""
    st = require("safetensors", extra="safetensors")
    wanted = list(files) if names is None else list(names)
    by_file: dict[Path, list[str]] = {}
    for n in wanted:
        by_file.setdefault(files[n], []).append(n)
    for f, names_in in by_file.items():
        try:
            with st.safe_open(str(f), framework="pt", device=str(device)) as h:
                for n in names_in:
                    yield n, h.get_tensor(n)
        except EWCInputError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise EWCInputError(f"{f}: cannot read the Fisher tensors ({type(e).__name__}: {e})") from None


def fisher_tensor_names(path: str | Path) -> tuple[dict[str, Path], dict]:
    """``({name: file}, metadata)`` of a Fisher file (for streaming readers such as merging)."""
    files, meta = _locate(path)
    return files, _metadata(meta)
