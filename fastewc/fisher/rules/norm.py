"""Normalisation layers: their affine parameters act elementwise, ``y = xhat * w + b``, so a
sample's gradient is ``G * xhat`` (and ``G``) summed over every axis that shares the parameter.

Covers ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*`` in eval mode (each
sample normalised by the running statistics) and RMSNorm-style scales of other libraries
(Llama's ``LlamaRMSNorm`` and its kin: a class named ``*RMSNorm`` with a 1-D ``weight`` and an
epsilon, normalising in float32 as those modules do; the probe checks each one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_rule


def _affine(xhat: torch.Tensor, G: torch.Tensor, shape, bias: bool, channel_dim: bool) -> dict:
    n = xhat.shape[0]

    def reduce(t):
        if not channel_dim:  # the parameter covers the trailing dims
            return t.reshape(n, -1, *shape).sum(1)
        return t.reshape(n, shape[0], -1).sum(2)  # per channel (dim 1)

    out = {"weight": reduce(G * xhat)}
    if bias:
        out["bias"] = reduce(G)
    return out


def layer_norm_per_sample(m: nn.LayerNorm, A, G) -> dict:
    xhat = F.layer_norm(A, m.normalized_shape, None, None, m.eps)
    return _affine(xhat, G, m.normalized_shape, m.bias is not None, False)


def rms_norm_per_sample(m, A, G) -> dict:
    xhat = F.rms_norm(A, m.normalized_shape, None, m.eps)
    return _affine(xhat, G, m.normalized_shape, False, False)


def batch_norm_per_sample(m: nn.modules.batchnorm._BatchNorm, A, G) -> dict:
    shape = [1, -1] + [1] * (A.dim() - 2)
    xhat = (A - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    return _affine(xhat, G, (m.num_features,), m.bias is not None, True)


def batch_norm_applies(m) -> bool:
    # Eval mode with running statistics: each sample is normalised by fixed numbers. Without
    # them BatchNorm uses the batch's statistics, which mixes samples.
    return m.affine and not m.training and m.running_mean is not None and m.running_var is not None


def group_norm_per_sample(m: nn.GroupNorm, A, G) -> dict:
    xhat = F.group_norm(A, m.num_groups, None, None, m.eps)
    return _affine(xhat, G, (m.num_channels,), True, True)


register_rule(nn.LayerNorm, layer_norm_per_sample, name="layernorm", applies=lambda m: m.elementwise_affine)
register_rule(nn.GroupNorm, group_norm_per_sample, name="groupnorm", applies=lambda m: m.affine)
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, batch_norm_per_sample, name="batchnorm", applies=batch_norm_applies)
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, rms_norm_per_sample, name="rmsnorm", applies=lambda m: m.elementwise_affine)


# -- RMSNorm-style modules of other libraries ----------------------------------------------------
def _rms_eps(m):
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _is_rms_style(m: nn.Module) -> bool:
    w = m._parameters.get("weight")
    return (type(m).__name__.endswith("RMSNorm") and not isinstance(m, getattr(nn, "RMSNorm", ()))
            and w is not None and w.dim() == 1 and set(n for n, p in m._parameters.items() if p is not None) == {"weight"}
            and not any(True for _ in m.children()) and _rms_eps(m) is not None)


def rms_style_per_sample(m, A, G) -> dict:
    """``y = w * xhat`` with ``xhat = x / sqrt(mean(x^2) + eps)`` computed in float32 and cast back
    to the input's dtype (Llama's ``LlamaRMSNorm``; ``(1 + w)`` variants have the same gradient)."""
    h = A.to(torch.float32)
    xhat = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _rms_eps(m))).to(A.dtype)
    return {"weight": (G * xhat).reshape(A.shape[0], -1, A.shape[-1]).sum(1)}


register_rule(_is_rms_style, rms_style_per_sample, name="rmsnorm_style")
