"""Fisher-weighted model merging (Matena & Raffel, "Merging Models with Fisher-Weighted
Averaging", NeurIPS 2022): models fine-tuned from one initialisation, combined per parameter as

    theta = sum_i l_i F_i theta_i / sum_i l_i F_i,      F_i floored at ``floor``,

with the exact per-sample Fisher diagonals fastewc estimates. Entries without a Fisher in any
model (frozen parameters, buffers) are averaged with the weights ``l_i``; integer entries are
taken from the first model. Arithmetic is float32 (float64 for float64 models); the result has
the models' dtypes.

Two ways in: :func:`fisher_merge` on models or state dicts in memory, and
:func:`fisher_merge_files` on safetensors checkpoints (a file, or a Hugging Face folder with
``model.safetensors`` or shards and an index) and Fisher files, streamed a slice of one tensor
at a time and written shard by shard, so models larger than memory merge. Both give the same
bits for the same inputs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ._utils import require, shard_names, write_atomically
from .errors import EWCInputError
from .fisher.files import fisher_tensor_names

__all__ = ["MergeReport", "fisher_merge", "fisher_merge_files"]

# Elements of one tensor read from each input at a time when streaming from files (bounds the
# memory whatever the tensor's size), and merged at a time within that (a few float32
# temporaries of this size stay in a core's cache instead of streaming through memory).
STREAM_CHUNK = 1 << 22
MERGE_CHUNK = 1 << 15
DEFAULT_SHARD_BYTES = 512 * 2**20


@dataclass
class MergeReport:
    """What each entry of the merged state went through."""

    fisher_merged: list[str] = field(default_factory=list)
    averaged: list[str] = field(default_factory=list)  # no Fisher: weighted average
    copied: list[str] = field(default_factory=list)    # not floating point: the first model's
    weights: list[float] = field(default_factory=list)
    floor: float = 0.0
    files: list[str] = field(default_factory=list)     # written by fisher_merge_files

    def __str__(self) -> str:
        return (f"Fisher-merged {len(self.fisher_merged)} tensors; averaged {len(self.averaged)} without a Fisher"
                + (f" ({', '.join(self.averaged[:5])}{', ...' if len(self.averaged) > 5 else ''})" if self.averaged else "")
                + f"; copied {len(self.copied)} non-float entries from the first model; weights {self.weights}, "
                  f"Fisher floor {self.floor:g}")


def _check_weights(weights, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise EWCInputError(f"weights must be a list of {k} numbers; got {weights!r}") from None
    if len(w) != k or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise EWCInputError(f"weights must be {k} finite numbers >= 0 with a positive sum; got {weights!r}")
    total = sum(w)
    return [x / total for x in w]


def _check_floor(floor) -> float:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
        raise EWCInputError(f"floor must be a finite number >= 0; got {floor!r}")
    return float(floor)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge_chunk(out: torch.Tensor, thetas: list[torch.Tensor], fishers: list[torch.Tensor] | None,
                 weights: list[float], scales: list[float], floor: float) -> None:
    """Write into ``out`` (a flat slice of the merged entry) the Fisher-weighted mean of the flat
    slices ``thetas`` (the weighted mean when ``fishers`` is None), computed in the compute dtype
    ``MERGE_CHUNK`` elements at a time. Memory and files call it on the same slices, so they give
    the same bits."""
    acc = _compute_dtype(out.dtype)
    for lo in range(0, out.numel(), MERGE_CHUNK):
        hi = min(lo + MERGE_CHUNK, out.numel())
        num = den = None
        for i, t in enumerate(thetas):
            t = t[lo:hi].to(acc)
            if fishers is None:
                num = t * weights[i] if num is None else num.add_(t, alpha=weights[i])
                continue
            c = fishers[i][lo:hi].to(acc, copy=True)  # modified in place below: never the caller's tensor
            if scales[i] != 1.0:
                c.mul_(scales[i])
            c.clamp_min_(floor).mul_(weights[i])
            num = c * t if num is None else num.addcmul_(c, t)
            den = c if den is None else den.add_(c)
        if den is None:
            out[lo:hi] = num
        elif floor > 0:
            out[lo:hi] = num.div_(den)
        else:  # where every l_i F_i is 0 the entry has no weight at all: the plain mean
            plain = torch.stack([t[lo:hi].to(acc) for t in thetas]).mean(0)
            out[lo:hi] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), plain)


def _state(model) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        return dict(model)
    raise EWCInputError(f"each model must be an nn.Module or a state dict; got {type(model).__name__}")


def _fisher_names(fishers: list[Mapping], names: set[str]) -> set[str]:
    """Entries every Fisher covers; raises when only some do, or when a Fisher names an unknown entry."""
    covered = [set(f) for f in fishers]
    for i, c in enumerate(covered):
        unknown = sorted(c - names)
        if unknown:
            raise EWCInputError(f"fishers[{i}] names entries the models lack: {unknown[:5]}")
    partial = sorted(set.union(*covered) - set.intersection(*covered))
    if partial:
        raise EWCInputError(f"these entries have a Fisher in some models only: {partial[:5]}; give every model's Fisher "
                            "for the same parameters")
    return set.intersection(*covered)


def _norms(fishers) -> list[float]:
    """Per model, the L2 norm of its whole Fisher (``normalize=True`` divides by it)."""
    out = []
    for f in fishers:
        sq = math.fsum(float(t.double().square().sum()) for t in f.values())
        out.append(1.0 / math.sqrt(sq) if sq > 0 else 1.0)
    return out


def fisher_merge(models: Sequence, fishers: Sequence[Mapping[str, torch.Tensor]], *, weights=None,
                 floor: float = 1e-6, normalize: bool = False) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Merge ``models`` (``nn.Module`` s or state dicts of one architecture) with their Fishers
    (``{name: F}`` each, e.g. from :func:`fastewc.estimate_fisher` or
    :func:`fastewc.load_fisher`). ``weights``: ``l_i`` (default equal; normalised to sum 1);
    ``floor``: the smallest Fisher value used (keeps entries no model's data touched defined);
    ``normalize``: divide each model's Fisher by its L2 norm first, so that models whose Fishers
    differ in scale count alike. Returns ``(state dict, MergeReport)``; load it with
    ``model.load_state_dict``."""
    if not isinstance(models, Sequence) or len(models) < 2:
        raise EWCInputError(f"models must be a list of at least 2 models or state dicts; got {type(models).__name__}")
    if not isinstance(fishers, Sequence) or len(fishers) != len(models):
        raise EWCInputError(f"fishers must be a list with one Fisher per model ({len(models)})")
    states = [_state(m) for m in models]
    fishers = [f if isinstance(f, Mapping) else _bad_fisher(i, f) for i, f in enumerate(fishers)]
    weights, floor = _check_weights(weights, len(models)), _check_floor(floor)
    names = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(names) or any(s[n].shape != states[0][n].shape for n in names):
            raise EWCInputError(f"models[{i}] does not have the entries and shapes of models[0]")
    with_fisher = _fisher_names(list(fishers), set(names))
    for i, f in enumerate(fishers):
        for n in with_fisher:
            if tuple(f[n].shape) != tuple(states[0][n].shape):
                raise EWCInputError(f"fishers[{i}][{n!r}] has shape {list(f[n].shape)}; the parameter's is "
                                    f"{list(states[0][n].shape)}")
    scales = _norms(fishers) if normalize else [1.0] * len(models)
    report = MergeReport(weights=weights, floor=floor)
    out = {}
    for n in names:
        ref = states[0][n]
        if not ref.is_floating_point():
            out[n] = ref.clone()
            report.copied.append(n)
            continue
        thetas = [s[n].reshape(-1) for s in states]
        fs = [f[n].reshape(-1) for f in fishers] if n in with_fisher else None
        merged = torch.empty(ref.numel(), dtype=ref.dtype, device=ref.device)
        for lo in range(0, ref.numel(), STREAM_CHUNK):  # the same slices as from files: the same bits
            hi = min(lo + STREAM_CHUNK, ref.numel())
            _merge_chunk(merged[lo:hi], [t[lo:hi].to(ref.device) for t in thetas],
                         None if fs is None else [f[lo:hi].to(ref.device) for f in fs], weights, scales, floor)
        out[n] = merged.view(ref.shape)
        (report.fisher_merged if fs is not None else report.averaged).append(n)
    return out, report


def _bad_fisher(i: int, f):
    raise EWCInputError(f"fishers[{i}] must be a dict {{name: tensor}}; got {type(f).__name__}")


# -- files ---------------------------------------------------------------------------------------
def _checkpoint_files(path: str | Path) -> dict[str, Path]:
    """``{entry name: file}`` of a safetensors checkpoint: a file, or a folder with
    ``model.safetensors`` or ``model.safetensors.index.json`` (Hugging Face's layout)."""
    st = require("safetensors", extra="safetensors")
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise EWCInputError(f"{index}: not a checkpoint index ({e})") from None
            return {n: path / f for n, f in weight_map.items()}
        path = path / "model.safetensors"
    if not path.is_file():
        raise EWCInputError(f"no safetensors checkpoint at {path}")
    try:
        with st.safe_open(str(path), framework="pt") as f:
            return {n: path for n in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise EWCInputError(f"{path}: not a readable safetensors file ({e})") from None


class _Reader:
    """Reads slices of entries from safetensors files, opening a file for each read so that no
    mapping of a whole checkpoint stays resident between reads."""

    def __init__(self, files: Mapping[str, Path]):
        self.files = files
        self.st = require("safetensors", extra="safetensors")

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        with self.st.safe_open(str(self.files[name]), framework="pt") as f:
            s = f.get_slice(name)
            return _DTYPES[s.get_dtype()], tuple(s.get_shape())

    def flat(self, name: str, lo: int, hi: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Elements ``lo:hi`` of the flattened entry, read by whole rows of its first axis."""
        with self.st.safe_open(str(self.files[name]), framework="pt") as f:
            if len(shape) == 0:
                return f.get_tensor(name).reshape(-1)[lo:hi].clone()
            if len(shape) == 1:
                return f.get_slice(name)[lo:hi].reshape(-1).clone()
            row = math.prod(shape[1:])
            r0, r1 = lo // row, -(-hi // row)
            block = f.get_slice(name)[r0:r1].reshape(-1)
            return block[lo - r0 * row : hi - r0 * row].clone()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _stream_norms(readers: list[_Reader], names: list[str]) -> list[float]:
    out = []
    for r in readers:
        sq = 0.0
        for n in names:
            dtype, shape = r.info(n)
            numel = math.prod(shape)
            for lo in range(0, numel, STREAM_CHUNK):
                sq += float(r.flat(n, lo, min(lo + STREAM_CHUNK, numel), shape).double().square().sum())
        out.append(1.0 / math.sqrt(sq) if sq > 0 else 1.0)
    return out


def fisher_merge_files(model_paths: Sequence, fisher_paths: Sequence, out_dir: str | Path, *, weights=None,
                       floor: float = 1e-6, normalize: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> MergeReport:
    """:func:`fisher_merge` over files: ``model_paths`` are safetensors checkpoints (a file, or a
    Hugging Face folder, sharded or not), ``fisher_paths`` Fisher files (:func:`fastewc.save_fisher`).
    Writes ``model.safetensors`` (or ``model-0000k-of-0000N.safetensors`` shards of at most
    ``max_shard_bytes`` and ``model.safetensors.index.json``) into ``out_dir``. Reads a slice of
    one entry from each input at a time: memory stays about one shard plus a few slices,
    however large the models."""
    if not isinstance(model_paths, Sequence) or isinstance(model_paths, (str, Path)) or len(model_paths) < 2:
        raise EWCInputError("model_paths must be a list of at least 2 checkpoints")
    if not isinstance(fisher_paths, Sequence) or isinstance(fisher_paths, (str, Path)) or len(fisher_paths) != len(model_paths):
        raise EWCInputError(f"fisher_paths must be a list with one Fisher file per model ({len(model_paths)})")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise EWCInputError(f"max_shard_bytes must be a positive int; got {max_shard_bytes!r}")
    st = require("safetensors.torch", extra="safetensors", package="safetensors")
    weights, floor = _check_weights(weights, len(model_paths)), _check_floor(floor)
    models = [_Reader(_checkpoint_files(p)) for p in model_paths]
    fisher_files = [fisher_tensor_names(p) for p in fisher_paths]
    fishers = [_Reader(files) for files, _ in fisher_files]
    names = list(models[0].files)
    for i, m in enumerate(models[1:], 1):
        if set(m.files) != set(names):
            raise EWCInputError(f"{model_paths[i]} does not have the entries of {model_paths[0]}")
    shapes = {n: models[0].info(n) for n in names}
    for i, m in enumerate(models[1:], 1):
        for n in names:
            if m.info(n)[1] != shapes[n][1]:
                raise EWCInputError(f"{model_paths[i]}: {n!r} has shape {list(m.info(n)[1])}, "
                                    f"{model_paths[0]} has {list(shapes[n][1])}")
    with_fisher = _fisher_names([f.files for f in fishers], set(names))
    for i, (_, meta) in enumerate(fisher_files):
        wrong = [n for n in with_fisher if tuple(meta["shapes"][n]) != shapes[n][1]]
        if wrong:
            raise EWCInputError(f"{fisher_paths[i]}: this Fisher does not fit the models ({wrong[0]!r}: "
                                f"{list(meta['shapes'][wrong[0]])} vs {list(shapes[wrong[0]][1])})")
    fisher_names = [n for n in names if n in with_fisher]
    scales = _stream_norms(fishers, fisher_names) if normalize else [1.0] * len(models)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = MergeReport(weights=weights, floor=floor)
    shards: list = []  # (temporary file, names), all written before any is renamed into place
    plan = shard_names({n: math.prod(shapes[n][1]) * shapes[n][0].itemsize for n in names}, max_shard_bytes)
    ends = {members[-1] for members in plan}
    shard = {}

    def flush():
        nonlocal shard
        tmp = out_dir / f".shard-{len(shards):05d}.{os.getpid()}.tmp"
        st.save_file(shard, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as f:  # on disk before the renames below make it the result
            os.fsync(f.fileno())
        shards.append((tmp, list(shard)))
        shard = {}

    try:
        for n in names:
            dtype, shape = shapes[n]
            numel = math.prod(shape)
            if not dtype.is_floating_point:
                shard[n] = models[0].flat(n, 0, numel, shape).view(shape) if numel else torch.empty(shape, dtype=dtype)
                report.copied.append(n)
            else:
                merged = torch.empty(numel, dtype=dtype)
                for lo in range(0, numel, STREAM_CHUNK):
                    hi = min(lo + STREAM_CHUNK, numel)
                    fs = [f.flat(n, lo, hi, shape) for f in fishers] if n in with_fisher else None
                    _merge_chunk(merged[lo:hi], [m.flat(n, lo, hi, shape) for m in models], fs, weights, scales, floor)
                shard[n] = merged.view(shape)
                (report.fisher_merged if n in with_fisher else report.averaged).append(n)
            if n in ends:
                flush()
    except BaseException:
        for tmp, _ in shards:
            tmp.unlink(missing_ok=True)
        raise
    # What an earlier merge into this folder wrote in the other layout would be loaded instead of
    # this result (transformers prefers model.safetensors, readers of the index the shards).
    for old in [out_dir / "model.safetensors", out_dir / "model.safetensors.index.json",
                *out_dir.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        target = out_dir / "model.safetensors"
        os.replace(shards[0][0], target)
        report.files = [str(target)]
        return report
    weight_map = {}
    for k, (tmp, members) in enumerate(shards, 1):
        target = out_dir / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, target)
        weight_map.update({n: target.name for n in members})
        report.files.append(str(target))
    index = out_dir / "model.safetensors.index.json"
    record = json.dumps({"metadata": {"total_size": sum(math.prod(s) * d.itemsize for d, s in shapes.values())},
                         "weight_map": weight_map}, indent=1)
    write_atomically(index, lambda tmp: Path(tmp).write_text(record))
    report.files.append(str(index))
    return report
