"""Normalisation layers: their affine parameters act elementwise, ``y = xhat * w + b``, so a
sample's gradient is ``G * xhat`` (and ``G``) summed over every axis that shares the parameter.

Covers ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*`` in eval mode (each
sample normalised by the running statistics) and RMSNorm-style scales of other libraries
(Llama's ``LlamaRMSNorm`` and its kin: a class named ``*RMSNorm``, or ``*T5LayerNorm``, with a
1-D ``weight`` and an epsilon, normalising in float32 as those modules do; the probe checks each
one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_rule


def _reduce(t: torch.Tensor, n: int, shape, channel_dim: bool) -> torch.Tensor:
    if not channel_dim:  # the parameter covers the trailing dims
        return t.reshape(n, -1, *shape).sum(1)
    return t.reshape(n, shape[0], -1).sum(2)  # per channel (dim 1)


def _affine_rule(name, xhat_of, shape_of, bias_of, channel_dim: bool):
    """Register the per-sample and sum-of-squares forms of an elementwise affine layer; ``xhat``
    is formed once and shared by every output gradient."""
    def per_sample(m, A, G):
        xhat, n, shape = xhat_of(m, A), A.shape[0], shape_of(m)
        out = {"weight": _reduce(G * xhat, n, shape, channel_dim)}
        if bias_of(m):
            out["bias"] = _reduce(G, n, shape, channel_dim)
        return out

    def sq_sum(m, A, Gs):
        # xhat is this call's own tensor: the last output gradient multiplies into it and the
        # others into one buffer, not into fresh memory each time (on the CPU a fresh block of
        # this size is paid for in page faults, which cost more than the products)
        xhat, n, shape = xhat_of(m, A), A.shape[0], shape_of(m)
        out = {}
        if bias_of(m):
            out["bias"] = sum(_reduce(G, n, shape, channel_dim).square().sum(0) for G in Gs)
        w, buf = None, None
        for k, G in enumerate(Gs):
            if G.shape != xhat.shape or torch.result_type(G, xhat) != xhat.dtype:
                prod = G * xhat
            elif k == len(Gs) - 1:
                prod = xhat.mul_(G)
            else:
                prod = buf = G * xhat if buf is None else torch.mul(G, xhat, out=buf)
            s = _reduce(prod, n, shape, channel_dim).square().sum(0)
            w = s if w is None else w.add_(s)
        out["weight"] = w
        return out

    per_sample.__name__ = sq_sum.__name__ = name
    return per_sample, sq_sum


def _layer_norm_xhat(m, A):
    return F.layer_norm(A, m.normalized_shape, None, None, m.eps)


def _rms_norm_xhat(m, A):
    return F.rms_norm(A, m.normalized_shape, None, m.eps)


def _batch_norm_xhat(m, A):
    shape = [1, -1] + [1] * (A.dim() - 2)
    return (A - m.running_mean.view(shape)).mul_(torch.rsqrt(m.running_var.view(shape) + m.eps))


def batch_norm_applies(m) -> bool:
    # Eval mode with running statistics: each sample is normalised by fixed numbers. Without
    # them BatchNorm uses the batch's statistics, which mixes samples.
    return m.affine and not m.training and m.running_mean is not None and m.running_var is not None


def _group_norm_xhat(m, A):
    return F.group_norm(A, m.num_groups, None, None, m.eps)


_LAYER_NORM = _affine_rule("layernorm", _layer_norm_xhat, lambda m: m.normalized_shape, lambda m: m.bias is not None,
                           False)
_GROUP_NORM = _affine_rule("groupnorm", _group_norm_xhat, lambda m: (m.num_channels,), lambda m: True, True)
_BATCH_NORM = _affine_rule("batchnorm", _batch_norm_xhat, lambda m: (m.num_features,), lambda m: m.bias is not None,
                           True)
_RMS_NORM = _affine_rule("rmsnorm", _rms_norm_xhat, lambda m: m.normalized_shape, lambda m: False, False)

register_rule(nn.LayerNorm, _LAYER_NORM[0], name="layernorm", sq_sum=_LAYER_NORM[1],
              applies=lambda m: m.elementwise_affine, sequence=True)
register_rule(nn.GroupNorm, _GROUP_NORM[0], name="groupnorm", sq_sum=_GROUP_NORM[1], applies=lambda m: m.affine)
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, _BATCH_NORM[0], name="batchnorm", sq_sum=_BATCH_NORM[1], applies=batch_norm_applies)
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, _RMS_NORM[0], name="rmsnorm", sq_sum=_RMS_NORM[1], applies=lambda m: m.elementwise_affine,
                  sequence=True)


# -- RMSNorm-style modules of other libraries ----------------------------------------------------
def _rms_eps(m):
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _is_rms_style(m: nn.Module) -> bool:
    w = m._parameters.get("weight")
    # T5's layer norm (and its kin: MT5, LongT5, UMT5) is an RMSNorm by another name
    return (type(m).__name__.endswith(("RMSNorm", "T5LayerNorm")) and not isinstance(m, getattr(nn, "RMSNorm", ()))
            and w is not None and w.dim() == 1 and set(n for n, p in m._parameters.items() if p is not None) == {"weight"}
            and not any(True for _ in m.children()) and _rms_eps(m) is not None)


def rms_style_per_sample(m, A, G) -> dict:
    """``y = w * xhat`` with ``xhat = x / sqrt(mean(x^2) + eps)`` computed in float32 and cast back
    to the input's dtype (Llama's ``LlamaRMSNorm``; ``(1 + w)`` variants have the same gradient)."""
    h = A.to(torch.float32)
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(m))
    # Llama's kin scale the float32 copy; T5's scale the input itself (float64 stays float64)
    xhat = (A * scale if type(m).__name__.endswith("T5LayerNorm") else h * scale).to(A.dtype)
    return {"weight": (G * xhat).reshape(A.shape[0], -1, A.shape[-1]).sum(1)}


register_rule(_is_rms_style, rms_style_per_sample, name="rmsnorm_style", sequence=True)
