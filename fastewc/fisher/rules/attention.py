"""``nn.MultiheadAttention`` without a per-sample replay of attention.

The generic module-local rule replays the whole attention once per sample under ``vmap``. Its
parameters, though, are only used by four linear maps: the q/k/v projections (rows of
``in_proj_weight``) and ``out_proj``. So one batched replay of the module, with the projection
outputs and the attention's output kept as autograd leaves, gives their output gradients for all
samples at once; each sample's parameter gradients are then ``G_n^T X_n`` as for any Linear.

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
    b, T, E = q.shape
    S, H = k.shape[1], m.num_heads
    d = E // H
    dtype = q.dtype
    mask = torch.zeros(b, 1, T, S, dtype=dtype, device=q.device)
    if a["is_causal"] and attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = mask + _additive(attn_mask, dtype).view(1, 1, T, S)
    if kpm is not None:
        mask = mask + _additive(kpm, dtype).view(b, 1, 1, S)
    Wq, Wk, Wv = m.in_proj_weight.detach().chunk(3)
    bq, bk, bv = (m.in_proj_bias.detach().chunk(3) if m.in_proj_bias is not None else (None, None, None))
    G = grads[0][i:j]
    with torch.enable_grad():
        P = [torch.nn.functional.linear(x, W, bias).detach().requires_grad_(True)
             for x, W, bias in ((q, Wq, bq), (k, Wk, bk), (v, Wv, bv))]
        Qh, Kh, Vh = (t.view(b, -1, H, d).transpose(1, 2) for t in P)
        weights = torch.softmax(Qh @ Kh.transpose(-1, -2) / math.sqrt(d) + mask, -1)
        C = (weights @ Vh).transpose(1, 2).reshape(b, T, E).detach().requires_grad_(True)
        out = torch.nn.functional.linear(C, m.out_proj.weight.detach(),
                                         None if m.out_proj.bias is None else m.out_proj.bias.detach())
        gC = torch.autograd.grad(out, C, G)[0]
        gQ, gK, gV = torch.autograd.grad((weights @ Vh).transpose(1, 2).reshape(b, T, E), P, gC)
    result = {}
    if "in_proj_weight" in attrs:
        result["in_proj_weight"] = torch.cat([torch.bmm(g.transpose(1, 2), x) for g, x in ((gQ, q), (gK, k), (gV, v))], 1)
    if "in_proj_bias" in attrs and m.in_proj_bias is not None:
        result["in_proj_bias"] = torch.cat([gQ.sum(1), gK.sum(1), gV.sum(1)], 1)
    if "out_proj.weight" in attrs:
        result["out_proj.weight"] = torch.bmm(G.transpose(1, 2), C.detach())
    if "out_proj.bias" in attrs and m.out_proj.bias is not None:
        result["out_proj.bias"] = G.sum(1)
    if set(result) != set(attrs):
        return None
    return result


# module type -> f(module, attrs, recorded call, output gradients, i, j) -> blocks or None
LOCAL_REPLAYS = {nn.MultiheadAttention: mha_blocks}
