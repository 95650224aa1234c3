"""Where ``fastewc bench`` runs: the device a user named, and whether a benchmark fits in it.
Both fail with one line the user can act on, before anything large is allocated."""

from __future__ import annotations

import torch

from .._utils import available_memory
from ..errors import EWCInputError


class BenchSizeError(EWCInputError):
    """The requested benchmark would not fit in the device's memory."""


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` -> device, with a clear error when unusable."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EWCInputError(f"unknown device {device!r}; expected 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type not in ("cpu", "cuda"):
        raise EWCInputError(f"device {device!r} is not supported by the benchmark; expected 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EWCInputError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                                f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EWCInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_fits(need_bytes: float, device: torch.device, what: str) -> None:
    """Raise :class:`BenchSizeError` before allocating when ``need_bytes`` exceeds 90% of what is free."""
    free = available_memory(device)
    if need_bytes > 0.9 * free:
        raise BenchSizeError(f"{what} needs about {need_bytes / 2**30:.1f} GiB on {device}, but only "
                             f"{free / 2**30:.1f} GiB is free; choose a smaller size")
