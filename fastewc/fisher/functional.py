"""``torch.func.functional_call`` for modules whose tree holds one block at two paths.

``functional_call`` swaps the given tensors in at every path that names them (``tie_weights``) and
swaps the originals back afterwards, path by path. A module reachable by two paths (one block
placed twice in an ``nn.ModuleList``, ALBERT-style sharing) is then swapped twice: the second swap
saves the first one's stand-in as the "original", and the restore leaves that stand-in, a plain
tensor, where the user's ``nn.Parameter`` was. The model is silently broken from then on (its
parameter gets no gradient). :func:`call_once` swaps every distinct (module, attribute) slot exactly
once, still in every distinct module that shares the tensor (a head tied to the embedding).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call


def _slots(module: nn.Module) -> dict[int, list[str]]:
    """``{id(tensor): [path, ...]}``: one path per distinct (module, attribute) holding the tensor."""
    seen: set = set()
    paths: dict[int, list[str]] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for attr, t in (*m._parameters.items(), *m._buffers.items()):
            if t is None or (id(m), attr) in seen:
                continue
            seen.add((id(m), attr))
            paths.setdefault(id(t), []).append(f"{prefix}.{attr}" if prefix else attr)
    return paths


def _tensor_at(module: nn.Module, path: str):
    prefix, _, attr = path.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    return getattr(owner, attr, None)


def call_once(module: nn.Module, values: dict[str, torch.Tensor], args=(), kwargs=None):
    """``module(*args, **kwargs)`` with the tensors ``values`` (path -> tensor) in place of the
    module's own, as ``functional_call`` with tied weights, each slot swapped once."""
    slots = _slots(module)
    full: dict[str, torch.Tensor] = {}
    for path, v in values.items():
        t = _tensor_at(module, path)
        for p in slots.get(id(t), [path]) if isinstance(t, torch.Tensor) else [path]:
            full[p] = v
    return functional_call(module, full, args, kwargs or {}, tie_weights=False, strict=False)
