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

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module


def _slots(module: nn.Module) -> tuple[dict[int, list[str]], dict[str, torch.Tensor]]:
    """``({id(tensor): [path, ...]}, {path: tensor})``: one path per distinct (module, attribute)
    holding each tensor, and the tensor at every path (also the second path of a shared slot)."""
    seen: set = set()
    paths: dict[int, list[str]] = {}
    at: dict[str, torch.Tensor] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for attr, t in (*m._parameters.items(), *m._buffers.items()):
            if t is None:
                continue
            path = f"{prefix}.{attr}" if prefix else attr
            at[path] = t
            if (id(m), attr) in seen:
                continue
            seen.add((id(m), attr))
            paths.setdefault(id(t), []).append(path)
    return paths, at


def _every_slot(module: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    paths, at = _slots(module)
    full: dict[str, torch.Tensor] = {}
    for path, v in values.items():
        t = at.get(path)
        for p in paths.get(id(t), [path]) if t is not None else [path]:
            full[p] = v
    return full


def call_once(module: nn.Module, values: dict[str, torch.Tensor], args=(), kwargs=None):
    """``module(*args, **kwargs)`` with the tensors ``values`` (path -> tensor) in place of the
    module's own, as ``functional_call`` with tied weights, each slot swapped once."""
    return functional_call(module, _every_slot(module, values), args, kwargs or {}, tie_weights=False, strict=False)


@contextmanager
def swapped(module: nn.Module, values: dict[str, torch.Tensor]):
    """:func:`call_once`'s swap held for a block of code: a backward that recomputes part of the
    forward (non-reentrant gradient checkpointing) must see the same tensors as the forward did.
    Built on the context manager that ``functional_call`` itself uses."""
    with _reparametrize_module(module, _every_slot(module, values), tie_weights=False, strict=False):
        yield
