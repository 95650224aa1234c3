"""``nn.EmbeddingBag`` (``mode="sum"`` or ``"mean"``), with a 2-D input or a flat input and
``offsets``.

Bag ``b`` is ``sum_l w_bl E[x_bl]`` (``w`` = 1, the per-sample weights, or ``1 / count_b`` for a
mean over the bag's tokens other than the padding index), so sample ``b``'s gradient adds
``w_bl G_b`` into the row of each token ``x_bl``: the embedding rule's pairs with weighted rows.
A flat input's samples are known only through ``offsets``, so the call is recorded with every bag
laid out samples-first, ``[N, L]`` tokens and weights (padded with weight 0): then a chunk or a
subset of the samples is a slice or a selection of rows like any batched tensor, and only this
file can replay the record (:class:`_Bags` marks it). ``mode="max"`` is not covered (the generic
module-local rule takes it).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .embedding import embedding_per_sample, embedding_sq_sum
from .local import Recorded

_SIGNATURE = inspect.signature(nn.EmbeddingBag.forward)


class _Bags:
    """First leaf of a bag call recorded samples-first (:func:`bag_record`); no module's forward
    takes it, so no other replay can mistake the record for the module's own arguments."""


def _covered(m: nn.Module) -> bool:
    return (type(m) is nn.EmbeddingBag and m.mode in ("sum", "mean") and m.max_norm is None
            and not m.scale_grad_by_freq)


def _laid_out(m: nn.EmbeddingBag, x: torch.Tensor, offsets, psw, n: int):
    """``(tokens [n, L], weights [n, L])`` of the call, or None when it does not hold ``n`` bags."""
    if x.dim() == 2 and offsets is None and x.shape[0] == n:
        tokens, valid = x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
        scale = None if psw is None else psw
    elif x.dim() == 1 and isinstance(offsets, torch.Tensor) and offsets.dim() == 1:
        starts = offsets[:-1] if m.include_last_offset else offsets
        if starts.numel() != n:
            return None
        ends = offsets[1:] if m.include_last_offset else torch.cat([starts[1:], starts.new_tensor([x.numel()])])
        lengths = ends - starts
        slot = torch.arange(int(lengths.max()) if n else 0, device=x.device)
        valid = slot[None] < lengths[:, None]
        at = (starts[:, None] + slot[None]).clamp(0, max(x.numel() - 1, 0))
        tokens = torch.where(valid, x[at], 0) if x.numel() else torch.zeros_like(at)
        scale = None if psw is None else torch.where(valid, psw[at], 0)
    else:
        return None
    real = valid if m.padding_idx is None else valid & (tokens != m.padding_idx)
    w = real.to(m.weight.dtype)
    if m.mode == "mean":  # over the bag's tokens other than the padding index; an empty bag is 0
        w = w / real.sum(1, keepdim=True).clamp(min=1).to(w.dtype)
    elif scale is not None:
        w = w * scale.to(w.dtype)
    return tokens, w


def bag_record(m: nn.Module, args, kwargs, output, n: int):
    """``(record, None)``: the call with its bags laid out samples-first, or None (the generic
    record then takes it)."""
    if not _covered(m) or not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != n:
        return None
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    a = bound.arguments
    x, offsets, psw = a.get("input"), a.get("offsets"), a.get("per_sample_weights")
    if not isinstance(x, torch.Tensor) or (psw is not None and m.mode != "sum"):
        return None
    got = _laid_out(m, x, offsets, None if psw is None else psw.detach(), n)
    if got is None:
        return None
    if not output.is_floating_point():
        return None
    leaves, spec = tree_flatten(((_Bags(), *got), {}))
    return Recorded(leaves, spec, [output], [0], n, per_sample=[1, 2]), None   # the tokens and the weights


def _weighted(rec: Recorded, G: torch.Tensor, i: int, j: int):
    args, _ = tree_unflatten(rec.leaves, rec.spec)
    if not (args and isinstance(args[0], _Bags)):
        return None
    tokens, w = args[1][i:j], args[2][i:j]
    return tokens, G[i:j, None, :] * w[..., None].to(G.dtype)


def bag_blocks(m: nn.Module, attrs: list[str], rec: Recorded, grads: list, i: int, j: int) -> dict | None:
    """Per-sample gradients ``{"weight": [j - i, V, dim]}`` of a recorded bag call, or None."""
    got = _weighted(rec, grads[0], i, j) if _covered(m) and attrs == ["weight"] else None
    return None if got is None else embedding_per_sample(m, *got)


def bag_sq_sums(m: nn.Module, attrs: list[str], rec: Recorded, grads: list) -> dict | None:
    """``{"weight": sum over the samples of the squared per-sample gradient}``, memory O(tokens x
    dim), or None."""
    got = _weighted(rec, grads[0], 0, rec.n) if _covered(m) and attrs == ["weight"] else None
    return None if got is None else embedding_sq_sum(m, got[0], [got[1]])
