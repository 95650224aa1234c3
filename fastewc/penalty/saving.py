"""Save and load an ``EWCRegularizer`` as a file, so a Fisher computed once ships with a model.

Two formats, chosen by the file name:

* ``*.safetensors`` (extra ``safetensors``): the importance and anchor tensors under
  ``importance/<name>`` / ``anchor/<name>`` and everything else (lambda, mode, gamma, globs,
  tasks seen, constants) as JSON in the metadata key ``"fastewc"``. No pickle: safe to load from
  an untrusted source.
* anything else: ``torch.save`` of ``state_dict()`` (loaded with ``weights_only=True``).

Saving is crash-safe: the file is written in a private temporary folder beside it
(``.<name>.<random>.tmp``), flushed to disk, then renamed over ``path`` in one step, so a crash or
a kill mid-save leaves the previous file as it was (and at worst that stray ``.tmp`` folder, which
nothing loads; a writer's own temporary files, such as safetensors', stay inside it). Loading checks the whole file before it builds anything, and every failure is an
``EWCInputError`` that names the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._utils import require, write_atomically
from ..errors import EWCInputError
from .regularizer import EWCRegularizer

_EXTRA_KEY = "_extra_state"


def _is_safetensors(path) -> bool:
    return Path(path).suffix == ".safetensors"


def _write_atomically(path: Path, write) -> None:
    if not path.parent.is_dir():
        raise EWCInputError(f"cannot save to {path}: the folder {path.parent} does not exist")
    write_atomically(path, write)


def save_regularizer(regularizer: EWCRegularizer, path: str | Path) -> Path:
    """Write ``regularizer`` (everything ``state_dict()`` holds) to ``path``; returns the path.

    The format follows the suffix (see the module docstring). The previous content of ``path``
    is replaced in one step, never left half written.
    """
    path = Path(path)
    if not _is_safetensors(path):
        state_dict = regularizer.state_dict()
        _write_atomically(path, lambda tmp: torch.save(state_dict, tmp))
        return path
    st = require("safetensors.torch", extra="safetensors", package="safetensors")
    state = regularizer.get_extra_state()
    # safetensors refuses tensors that share storage: the per-name views of the flat buffers do.
    tensors = {f"importance/{n}": t.detach().contiguous().clone() for n, t in state.pop("importance").items()}
    tensors.update({f"anchor/{n}": t.detach().contiguous().clone() for n, t in state.pop("anchor").items()})
    _write_atomically(path, lambda tmp: st.save_file(tensors, tmp, metadata={"fastewc": json.dumps(state)}))
    return path


def load_regularizer(path: str | Path, map_location: str | torch.device = "cpu", *, backend: str | None = None,
                     check_finite: bool | None = None) -> EWCRegularizer:
    """A fresh ``EWCRegularizer`` holding what :func:`save_regularizer` wrote to ``path``.

    Buffers are loaded onto ``map_location``; at the first step they follow the model's device.
    ``backend`` and ``check_finite`` (how the regularizer runs, not its state) are the saved
    ones unless given here. Raises ``EWCInputError`` naming the file when it is missing, truncated, corrupted, not a
    regularizer, or from a newer fastewc.
    """
    path = Path(path)
    if not path.exists():
        raise EWCInputError(f"no such file: {path}")
    safetensors = _is_safetensors(path)
    try:
        if safetensors:
            state = _read_safetensors(path, map_location)
        else:
            state_dict = _read_torch(path, map_location)
            state = state_dict.get(_EXTRA_KEY) if isinstance(state_dict, dict) else None
        saved = state if isinstance(state, dict) else {}
        reg = EWCRegularizer(
            backend=saved.get("backend", "auto") if backend is None else backend,
            check_finite=saved.get("check_finite", False) if check_finite is None else check_finite)
        if safetensors:
            reg.set_extra_state(state)
        else:
            reg.load_state_dict(state_dict)
    except EWCInputError as exc:
        msg = str(exc)
        raise EWCInputError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return reg


def _read_torch(path: Path, map_location) -> dict:
    try:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files
        raise EWCInputError(f"{path} is not a readable torch.save file (truncated or corrupted?): "
                            f"{type(exc).__name__}: {_short(exc)}") from None
    if not isinstance(sd, dict) or _EXTRA_KEY not in sd:
        raise EWCInputError(f"{path} does not hold an EWCRegularizer state_dict (no {_EXTRA_KEY!r} entry)")
    return sd


def _read_safetensors(path: Path, map_location) -> dict:
    safe_open = require("safetensors", extra="safetensors").safe_open
    try:
        with safe_open(str(path), framework="pt", device=str(torch.device(map_location))) as f:
            meta = (f.metadata() or {}).get("fastewc")
            if meta is None:
                raise EWCInputError(f"{path} is a safetensors file without fastewc metadata; "
                                    f"was it written by fastewc.save_regularizer?")
            try:
                state = json.loads(meta)
            except ValueError as exc:
                raise EWCInputError(f"{path}: the fastewc metadata is not valid JSON ({exc})") from None
            if not isinstance(state, dict):
                raise EWCInputError(f"{path}: the fastewc metadata is not a JSON object")
            state["importance"], state["anchor"] = {}, {}
            for key in f.keys():
                kind, _, name = key.partition("/")
                if kind not in ("importance", "anchor"):
                    raise EWCInputError(f"{path}: unexpected tensor {key!r}")
                state[kind][name] = f.get_tensor(key)
    except EWCInputError:
        raise
    except Exception as exc:  # safetensors raises its own error type (and OSError) for damaged files
        raise EWCInputError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                            f"{type(exc).__name__}: {_short(exc)}") from None
    return state


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if len(text) <= limit else text[:limit] + "..."
