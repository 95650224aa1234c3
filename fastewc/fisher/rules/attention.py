"""``nn.MultiheadAttention`` without a per-sample replay of attention.

The generic module-local rule replays the whole attention once per sample under ``vmap``. Its
parameters, though, are only used by four linear maps: the q/k/v projections (rows of
``in_proj_weight``) and ``out_proj``; each sample's parameter gradients are ``G_n^T X_n`` as for
any Linear, given the gradients ``G`` of the projections' outputs. During the batched pass the
module runs through :class:`RecordingAttention` (the same maths in the open), so the one backward
gives those gradients; where that cannot run, one batched replay of the module with the
projections as autograd leaves (:func:`mha_blocks`) gives them for all samples at once.

Covers the configuration most models use (``batch_first=True``, equal q/k/v widths, no
``bias_k``/``bias_v``, no ``add_zero_attn``, in eval mode, ``key_padding_mask`` and a 2-D
``attn_mask`` boolean or additive, ``is_causal``, the averaged attention weights unused by the
loss); anything else returns None and the generic module-local rule takes the module. The
probe checks the result against the per-sample loop like any rule.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _applies(m: nn.MultiheadAttention) -> bool:
    return (type(m) is nn.MultiheadAttention and m.batch_first and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn and not m.training and m.in_proj_weight is not None)


def mha_blocks(m: nn.MultiheadAttention, attrs: list[str], rec, grads: list, i: int, j: int) -> dict | None:
    """Per-sample gradients ``{attr: [j - i, *shape]}`` of the attention's parameters, or None
    when this configuration is not covered."""
    if not _applies(m):
        return None
    leaves = list(rec.leaves)
    for k in rec.batched:
        leaves[k] = leaves[k][i:j]
    args, kwargs = tree_unflatten(leaves, rec.spec)
    try:
        bound = _SIGNATURE.bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    q, k, v = a["query"], a["key"], a["value"]
    if q.dim() != 3 or len(grads) > 1 and bool(grads[1][i:j].abs().sum() > 0):
        return None  # unbatched input, or the loss uses the attention weights
    attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
    if attn_mask is not None and attn_mask.dim() != 2:
        return None
    G = grads[0][i:j]
    with torch.enable_grad():
        P, weights, Vh, _ = _project(m, q, k, v, kpm, attn_mask, a["is_causal"], leaves=True)
        C = _combine(weights, Vh).detach().requires_grad_(True)
        out = _out_proj(m, C)
        gC = torch.autograd.grad(out, C, G)[0]
        gQ, gK, gV = torch.autograd.grad(_combine(weights, Vh), P, gC)
    return _blocks_from(m, attrs, (q, k, v), C.detach(), G, (gQ, gK, gV))


def _project(m, q, k, v, kpm, attn_mask, is_causal, leaves: bool):
    """The q/k/v projections ``P`` (autograd leaves when ``leaves``), the attention weights
    ``[b, H, T, S]`` and the value heads, as ``F.multi_head_attention_forward`` computes them."""
    b, T, E = q.shape
    S, H = k.shape[1], m.num_heads
    d = E // H
    dtype = q.dtype
    mask = torch.zeros(b, 1, T, S, dtype=dtype, device=q.device)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = mask + _additive(attn_mask, dtype).view(1, 1, T, S)
    if kpm is not None:
        mask = mask + _additive(kpm, dtype).view(b, 1, 1, S)
    W = m.in_proj_weight.detach() if leaves else m.in_proj_weight
    bias = m.in_proj_bias
    if bias is not None and leaves:
        bias = bias.detach()
    Wq, Wk, Wv = W.chunk(3)
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    P = [torch.nn.functional.linear(x, w, c) for x, w, c in ((q, Wq, bq), (k, Wk, bk), (v, Wv, bv))]
    if leaves:
        P = [t.detach().requires_grad_(True) for t in P]
    Qh, Kh, Vh = (t.view(b, -1, H, d).transpose(1, 2) for t in P)
    weights = torch.softmax(Qh @ Kh.transpose(-1, -2) / math.sqrt(d) + mask, -1)
    return P, weights, Vh, mask


def _combine(weights, Vh):
    b, H, T, d = weights.shape[0], weights.shape[1], weights.shape[2], Vh.shape[-1]
    return (weights @ Vh).transpose(1, 2).reshape(b, T, H * d)


def _out_proj(m, C, detach: bool = True):
    w, b = m.out_proj.weight, m.out_proj.bias
    if detach:
        w, b = w.detach(), None if b is None else b.detach()
    return torch.nn.functional.linear(C, w, b)


def _blocks_from(m, attrs, inputs, C, G, gP) -> dict | None:
    """Per-sample blocks from the projections' inputs and output gradients."""
    result = {}
    if "in_proj_weight" in attrs:
        result["in_proj_weight"] = torch.cat([torch.bmm(g.transpose(1, 2), x) for g, x in zip(gP, inputs)], 1)
    if "in_proj_bias" in attrs and m.in_proj_bias is not None:
        result["in_proj_bias"] = torch.cat([g.sum(1) for g in gP], 1)
    if "out_proj.weight" in attrs:
        result["out_proj.weight"] = torch.bmm(G.transpose(1, 2), C)
    if "out_proj.bias" in attrs and m.out_proj.bias is not None:
        result["out_proj.bias"] = G.sum(1)
    if set(result) != set(attrs):
        return None
    return result


class RecordingAttention:
    """During the batched pass, ``nn.MultiheadAttention`` computed in the open (the same maths):
    its projections' outputs are then part of the batched graph and get their gradients from the
    one backward, so no replay is needed. A configuration it does not cover runs the module's own
    forward (and is replayed)."""

    def __init__(self, m: nn.MultiheadAttention):
        self.m = m
        self.calls: list = []

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        m = self.m
        if not _applies(m) or query.dim() != 3 or (attn_mask is not None and attn_mask.dim() != 2):
            self.calls.append(None)
            return type(m).forward(m, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        P, weights, Vh, _ = _project(m, query, key, value, key_padding_mask, attn_mask, is_causal, leaves=False)
        C = _combine(weights, Vh)
        out = _out_proj(m, C, detach=False)
        self.calls.append({"inputs": (query, key, value), "C": C, "P": P})
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def blocks(self, c: int, attrs: list[str], G, gP, i: int, j: int) -> dict | None:
        entry = self.calls[c]
        if entry is None:
            return None
        inputs = [x[i:j].detach() for x in entry["inputs"]]
        return _blocks_from(self.m, attrs, inputs, entry["C"][i:j].detach(), G[i:j], [g[i:j] for g in gP])


# module type -> f(module, attrs, recorded call, output gradients, i, j) -> blocks or None
LOCAL_REPLAYS = {nn.MultiheadAttention: mha_blocks}
