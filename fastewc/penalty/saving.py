"""Save and load an ``EWCRegularizer`` as a file, so a Fisher computed once ships with a model.

Two formats, chosen by the file name:

* ``*.safetensors`` (extra ``safetensors``): the importance and anchor tensors under
  ``importance/<name>`` / ``anchor/<name>`` and everything else (lambda, mode, gamma, globs,
  tasks seen, constants) as JSON in the metadata key ``"fastewc"``. No pickle: safe to load from
  an untrusted source.
* anything else: ``torch.save`` of ``state_dict()`` (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._utils import require
from ..errors import EWCInputError
from .regularizer import EWCRegularizer

_EXTRA_KEY = "_extra_state"


def _is_safetensors(path) -> bool:
    return Path(path).suffix == ".safetensors"


def save_regularizer(regularizer: EWCRegularizer, path: str | Path) -> Path:
    """Write ``regularizer`` (everything ``state_dict()`` holds) to ``path``; returns the path."""
    path = Path(path)
    state = regularizer.get_extra_state()
    if not _is_safetensors(path):
        torch.save(regularizer.state_dict(), path)
        return path
    st = require("safetensors.torch", extra="safetensors", package="safetensors")
    # safetensors refuses tensors that share storage: the per-name views of the flat buffers do.
    tensors = {f"importance/{n}": t.detach().contiguous().clone() for n, t in state.pop("importance").items()}
    tensors.update({f"anchor/{n}": t.detach().contiguous().clone() for n, t in state.pop("anchor").items()})
    st.save_file(tensors, str(path), metadata={"fastewc": json.dumps(state)})
    return path


def load_regularizer(path: str | Path, map_location: str | torch.device = "cpu") -> EWCRegularizer:
    """A fresh ``EWCRegularizer`` holding what :func:`save_regularizer` wrote to ``path``.

    Buffers are loaded onto ``map_location``; at the first step they follow the model's device.
    """
    path = Path(path)
    if not path.exists():
        raise EWCInputError(f"no such file: {path}")
    reg = EWCRegularizer()
    if not _is_safetensors(path):
        sd = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(sd, dict) or _EXTRA_KEY not in sd:
            raise EWCInputError(f"{path} does not hold an EWCRegularizer state_dict (no {_EXTRA_KEY!r} entry)")
        reg.load_state_dict(sd)
        return reg
    safe_open = require("safetensors", extra="safetensors").safe_open
    with safe_open(str(path), framework="pt", device=str(torch.device(map_location))) as f:
        meta = (f.metadata() or {}).get("fastewc")
        if meta is None:
            raise EWCInputError(f"{path} is a safetensors file without fastewc metadata; "
                                f"was it written by fastewc.save_regularizer?")
        state = json.loads(meta)
        state["importance"], state["anchor"] = {}, {}
        for key in f.keys():
            kind, _, name = key.partition("/")
            if kind not in ("importance", "anchor"):
                raise EWCInputError(f"{path}: unexpected tensor {key!r}")
            state[kind][name] = f.get_tensor(key)
    reg.set_extra_state(state)
    return reg
