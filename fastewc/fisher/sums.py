"""Sums of squared per-sample gradients: formed over the uses of shared parameters, checked for
NaN/Inf, and added across ranks.

Shared by :func:`~fastewc.estimate_fisher` and :class:`~fastewc.FisherTracker`, which both end
with per-parameter sums and a sample count.
"""

from __future__ import annotations

from typing import Callable

import torch

from .rules import BLOCK_BYTES, chunks
from .rules.registry import add_squares


def squares_of_uses(users: list, n: int, per_sample_bytes: int, add_into: Callable, blocks: Callable,
                    totals: dict[str, torch.Tensor], chunk_bytes: int | None = None) -> None:
    """Add into ``totals`` (``{name: tensor}``, created where missing) the sum over ``n`` samples
    of each parameter's squared per-sample gradient, that gradient being the sum over its uses:
    a tied weight, a module called twice. ``users`` are the uses in order, those whose rule adds
    into another use's block last; for samples ``i..j``, ``add_into(use, i, j, acc)`` adds the
    use into the blocks already in ``acc`` (True when it did) and ``blocks(use, i, j)`` gives its
    blocks ``{name: [j - i, *shape]}``. The samples go in chunks of about ``chunk_bytes`` of
    blocks (default a quarter of the rules' block budget): small, so that a chunk's blocks stay in
    cache between being added up and squared."""
    for i, j in chunks(n, per_sample_bytes, chunk_bytes or BLOCK_BYTES // 4):
        acc: dict[str, torch.Tensor] = {}
        for use in users:
            if add_into(use, i, j, acc):
                continue
            for name, b in blocks(use, i, j).items():
                if name in acc:
                    acc[name].add_(b)
                elif b._is_view() or any(_same_storage(b, a) for a in acc.values()):
                    # Later uses add into it in place: it must own its memory, neither a view of a
                    # recorded gradient nor a buffer that a vjp also handed to another parameter
                    # (one tensor for two biases), or the add would land in the other's block too.
                    acc[name] = b.clone()
                else:
                    acc[name] = b
        for name, b in acc.items():
            total = totals.get(name)
            if total is None:
                total = totals[name] = torch.zeros(b.shape[1:], dtype=b.dtype, device=b.device)
            add_squares(total, b)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (the same storage: conservative for disjoint views)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
