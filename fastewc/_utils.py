"""Small helpers both halves of the library share: unwrapping wrapped models, eval mode, free
memory, and lazy imports of optional dependencies. Imports nothing from the rest of fastewc."""

from __future__ import annotations

import contextlib
import importlib
import os

import torch
import torch.nn as nn

try:  # DTensor is in every torch this package supports, but keep import errors readable
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment]


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def require(module: str, *, extra: str, package: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install 'fastewc[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{pkg} is needed for this feature but is not installed: pip install 'fastewc[{extra}]' "
            f"(or pip install {pkg})"
        ) from e


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers.

    The wrappers hold the very same parameter tensors under a ``module.`` prefix; the Fisher is
    registered under the unwrapped names, and gradients reach the wrapper's reducer hooks either way.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode; restore each module's own flag on exit (also on error)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (host: MemAvailable; CUDA: free memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def is_sharded(t) -> bool:
    """True for a ``DTensor`` (an FSDP2 / tensor-parallel parameter, gradient or state tensor)."""
    return DTensor is not None and isinstance(t, DTensor)
