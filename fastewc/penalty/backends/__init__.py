"""Backend choice: one function, decided by capability, never by catching a fast-path error.

``select_backend(requested, device, param_dtype, storage_dtype)`` returns the backend object for
one parameter group, once per binding: ``"auto"`` takes Triton for CUDA tensors when Triton and
fastewc's Triton backend import, the fused C kernel (``"cpu"``) for CPU tensors when it builds on
this machine (a C compiler is found), and PyTorch otherwise; ``"torch"``, ``"triton"`` and
``"cpu"`` force one (Triton on CPU tensors only under ``TRITON_INTERPRET=1``, for tests;
``"cpu"`` on CPU tensors only). The environment variable ``FASTEWC_BACKEND`` overrides the
requested name.

``INSTANCES`` maps each name to the backend object it runs: the PyTorch one from the start, the
fused ones made at first use. Replacing an entry (before a regularizer first binds a model) makes
that name run another object, e.g. ``TorchBackend(strategy="blocked", block=61)`` or
``CpuBackend(threads=3, poison=True)``: this is how the tests choose backend settings.

A fused backend runs only the dtypes its kernels are written for (``takes``: the C kernel float32
and bfloat16 parameters and storage; Triton float32, bfloat16, float16 and float64). A group of
other dtypes gets the PyTorch backend, whether the fused one was chosen by ``"auto"`` or forced:
``backend="cpu"`` on a model with float64 parameters runs those on PyTorch, and the regularizer's
``active_backends`` says so.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from ...errors import EWCInputError
from ..validation import BACKENDS
from .base import GroupPlan
from .cpu_backend import CpuBackend, cpu_kernel_status
from .torch_backend import TorchBackend

__all__ = ["CpuBackend", "GroupPlan", "INSTANCES", "TorchBackend", "cpu_backend_status", "select_backend",
           "triton_status"]

# name -> the backend object ``backend=name`` runs ("triton" / "cpu" made on first use; see above)
INSTANCES: dict = {"torch": TorchBackend()}
_TOLD_NO_CPU_KERNEL = False  # the fallback on CPU tensors is announced once per process


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


def cpu_backend_status(device: torch.device) -> str | None:
    """None when the fused CPU kernel can run on ``device``; otherwise the reason it cannot (the
    first call in a process on a CPU device builds the kernel, once per machine, then cached)."""
    if device.type != "cpu":
        return f"the fused CPU kernel runs on CPU tensors; the parameters are on {device}"
    return cpu_kernel_status()


def requested_backend(requested: str) -> str:
    env = os.environ.get("FASTEWC_BACKEND")
    name = env if env else requested
    if name not in BACKENDS:
        src = "FASTEWC_BACKEND" if env else "backend"
        expected = ", ".join(repr(b) for b in BACKENDS[:-1]) + f" or {BACKENDS[-1]!r}"
        raise EWCInputError(f"unknown {src} {name!r}; expected {expected}")
    return name


def _tell_no_cpu_kernel(why: str) -> None:
    """Say once per process that CPU tensors run on the slower stock-ops backend, and why."""
    global _TOLD_NO_CPU_KERNEL
    if not _TOLD_NO_CPU_KERNEL:
        _TOLD_NO_CPU_KERNEL = True
        warnings.warn(f"fastewc: the fused CPU kernel is not available ({why}); the penalty runs on the "
                      "PyTorch backend instead, which is correct but slower. Set FASTEWC_BACKEND=torch to "
                      "choose it explicitly and silence this.", RuntimeWarning, stacklevel=3)


def select_backend(requested: str, device: torch.device, param_dtype: torch.dtype, storage_dtype: torch.dtype):
    """The backend object to run a group of ``param_dtype`` parameters with ``storage_dtype``
    buffers on ``device`` (see the module docstring)."""
    name = requested_backend(requested)
    if name == "auto":
        if device.type == "cuda" and triton_status(device) is None:
            name = "triton"
        elif device.type == "cpu" and cpu_backend_status(device) is None:
            name = "cpu"
        else:
            name = "torch"
            if device.type == "cpu":
                _tell_no_cpu_kernel(cpu_backend_status(device))
    if name == "torch":
        return INSTANCES["torch"]
    why = (cpu_backend_status if name == "cpu" else triton_status)(device)
    if why is not None:
        raise EWCInputError(f"backend {name!r} is not available: {why}")
    if name not in INSTANCES:
        if name == "cpu":
            INSTANCES[name] = CpuBackend()
        else:
            from .triton_backend import TritonBackend

            INSTANCES[name] = TritonBackend()
    fused = INSTANCES[name]
    return fused if fused.takes(param_dtype, storage_dtype) else INSTANCES["torch"]
