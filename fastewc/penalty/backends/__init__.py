"""Backend choice: one function, decided by capability, never by catching a fast-path error.

``select_backend(requested, device)`` returns the backend object for one parameter group:
``"auto"`` takes Triton for CUDA tensors when Triton and fastewc's Triton backend import, and
PyTorch otherwise; ``"torch"`` and ``"triton"`` force one (Triton on CPU tensors only under
``TRITON_INTERPRET=1``, for tests). The environment variable ``FASTEWC_BACKEND`` overrides the
requested name.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...errors import EWCInputError
from .base import GroupPlan
from .torch_backend import TorchBackend

__all__ = ["GroupPlan", "TorchBackend", "select_backend", "triton_status"]

_TORCH = TorchBackend()
_TRITON = None


def triton_status(device: torch.device) -> str | None:
    """None when the Triton backend can run on ``device``; otherwise the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fastewc[triton]')"
    if importlib.util.find_spec("fastewc.penalty.backends.triton_backend") is None:
        return "this build of fastewc has no Triton backend"
    if device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 is set: the Triton interpreter reads CPU tensors only, so it "
                    "cannot run on CUDA tensors; unset TRITON_INTERPRET to use the GPU kernels")
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1); "
            f"the parameters are on {device}")


def requested_backend(requested: str) -> str:
    env = os.environ.get("FASTEWC_BACKEND")
    name = env if env else requested
    if name not in ("auto", "torch", "triton"):
        src = "FASTEWC_BACKEND" if env else "backend"
        raise EWCInputError(f"unknown {src} {name!r}; expected 'auto', 'torch' or 'triton'")
    return name


def select_backend(requested: str, device: torch.device):
    """The backend object to run a group on ``device`` with (see the module docstring)."""
    global _TRITON
    name = requested_backend(requested)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_status(device) is None else "torch"
    if name == "torch":
        return _TORCH
    why = triton_status(device)
    if why is not None:
        raise EWCInputError(f"backend 'triton' is not available: {why}")
    if _TRITON is None:
        from .triton_backend import TritonBackend

        _TRITON = TritonBackend()
    return _TRITON
