"""Sums of squared per-sample gradients: checked for NaN/Inf, and added across ranks.

Shared by :func:`~fastewc.estimate_fisher` and :class:`~fastewc.FisherTracker`, which both end
with per-parameter sums and a sample count.
"""

from __future__ import annotations

import torch


def all_finite(squares) -> bool:
    """Whether every tensor of ``squares`` is finite, with one host sync: squares are >= 0, so a
    NaN or Inf makes its tensor's sum non-finite (cheaper than ``isfinite().all()`` on each)."""
    return bool(torch.isfinite(torch.stack([t.sum() for t in squares]).sum()))


def all_reduce_sums(sums: dict[str, torch.Tensor], count: float) -> tuple[dict[str, torch.Tensor], float]:
    """The sums and the sample count added over the ranks when torch.distributed is initialised;
    else the sums as they are, uncopied. One all-reduce per sum dtype, so float32 sums are not
    widened on the way; the count travels in float64, exact beyond float32's 2**24 samples."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, float(count)
    groups: dict[torch.dtype, list[str]] = {}
    for n, s in sums.items():
        groups.setdefault(s.dtype, []).append(n)
    out = {}
    for names in groups.values():
        flat = torch.cat([sums[n].reshape(-1) for n in names])
        dist.all_reduce(flat)
        i = 0
        for n in names:
            out[n] = flat[i : i + sums[n].numel()].view_as(sums[n])
            i += sums[n].numel()
    device = next(iter(sums.values())).device
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {n: out[n] for n in sums}, float(total.item())
