"""``nn.Conv1d`` / ``nn.Conv2d``: the weight is shared over positions, so per-sample gradients are
formed from the unfolded input (``im2col``) chunk by chunk: ``g_n = G_n U_n^T`` per group.

Without groups, a convolution is a linear map applied at each of its L output positions to that
position's window of the input. Over few positions (a vision transformer's patch embedding, a
CNN's late layers) its sums then go to the fused CPU kernel of the linear rule, which squares
each sample's gradient in registers instead of forming it in memory."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import outer_cpu
from .linear import KERNEL_MAX_T
from .registry import chunks, register_rule, select_samples

_AUTO = object()


def _conv_input(m: nn.Module, A: torch.Tensor):
    """Input padded as the module pads it, as 4-D, with the 2-D geometry for ``unfold``."""
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        A = F.pad(A, m._reversed_padding_repeated_twice, mode=mode)
        pad = (0,) * len(m.kernel_size)
    else:
        pad = m.padding
    if isinstance(m, nn.Conv1d):
        return A.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]), (0, pad[0]), (1, m.stride[0])
    return A, m.kernel_size, m.dilation, pad, m.stride


def _windows(A4: torch.Tensor, k, d, p, s) -> torch.Tensor:
    """The padded input's windows as a strided view ``[n, C, Ho, Wo, kh, kw]``."""
    if p[0] or p[1]:
        A4 = F.pad(A4, (p[1], p[1], p[0], p[0]))
    w = A4.unfold(2, (k[0] - 1) * d[0] + 1, s[0]).unfold(3, (k[1] - 1) * d[1] + 1, s[1])  # [n, C, Ho, Wo, kh', kw']
    if d[0] > 1 or d[1] > 1:
        w = w[..., :: d[0], :: d[1]]
    return w


def _im2col(A4: torch.Tensor, k, d, p, s) -> torch.Tensor:
    """``F.unfold(A4, k, dilation=d, padding=p, stride=s)``, ``[n, C*kh*kw, L]``, as one strided
    copy of the padded input's windows: the same values, without ``F.unfold``'s CPU kernel, which
    was most of the rule's time on the benchmarks' CNN (see the tracked-step table)."""
    w = _windows(A4, k, d, p, s)
    n, C, Ho, Wo = w.shape[:4]
    return w.permute(0, 1, 4, 5, 2, 3).reshape(n, C * k[0] * k[1], Ho * Wo)


def _im2rows(A4: torch.Tensor, k, d, p, s) -> torch.Tensor:
    """The same windows a row per output position, ``[n, L, C*kh*kw]`` (the transpose of
    ``_im2col``'s, laid out for the linear kernel: columns contiguous)."""
    w = _windows(A4, k, d, p, s)
    n, C, Ho, Wo = w.shape[:4]
    return w.permute(0, 2, 3, 1, 4, 5).reshape(n, Ho * Wo, C * k[0] * k[1])


def _unfolded(m: nn.Module, A: torch.Tensor):
    n, g = A.shape[0], m.groups
    A4, k, d, p, s = _conv_input(m, A)
    cols = m.weight.numel() // m.out_channels                        # (C_in / groups) * prod(kernel)
    U = _im2col(A4, k, d, p, s)                                      # [n, C_in*K, L]
    return U.view(n, g, cols, U.shape[-1])


def _weight_grads(m: nn.Module, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    n, g = U.shape[0], m.groups
    Gb = G.reshape(n, g, m.out_channels // g, -1)                    # [n, g, C_out/g, L]
    return torch.einsum("bgol,bgil->bgoi", Gb, U).reshape(n, *m.weight.shape)


def conv_per_sample(m: nn.Module, A: torch.Tensor, G: torch.Tensor) -> dict:
    out = {"weight": _weight_grads(m, _unfolded(m, A), G)}
    if m.bias is not None:
        out["bias"] = G.reshape(A.shape[0], m.out_channels, -1).sum(2)
    return out


def conv_sq_sum(m: nn.Module, A: torch.Tensor, Gs: list, *, kernel=_AUTO, into: dict | None = None,
                alpha: float = 1.0, picks: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> dict:
    """The input is unfolded once per chunk and shared by every output gradient (the exact
    Fisher's columns). ``kernel``: the fused CPU kernel to use where it applies (default: this
    process's, ``outer_cpu.kernel()``), or None for the batched products only. ``into``,
    ``alpha``, ``picks`` and ``weights``: as ``linear.sq_sum_linear``'s (the picked samples are
    copied here: the input is unfolded anyway)."""
    A, Gs = select_samples(A, Gs, picks, weights)
    n, cout = A.shape[0], m.out_channels
    L = math.prod(Gs[0].shape[2:])                                   # output positions per sample
    cols = m.weight.numel() // cout
    if kernel is _AUTO:
        kernel = outer_cpu.kernel() if A.device.type == "cpu" else None
    out = dict(into) if into is not None else {"weight": None, "bias": None} if m.bias is not None else {"weight": None}
    for attr, shape in (("weight", m.weight.shape), ("bias", (cout,))):
        if attr in out and out[attr] is None:
            out[attr] = torch.zeros(shape, dtype=A.dtype, device=A.device)
    w = out["weight"].view(cout, cols) if "weight" in out else None
    biased = "bias" in out
    if w is None:
        pass  # the bias only
    elif kernel is not None and kernel.supports(A) and m.groups == 1 and L <= KERNEL_MAX_T:
        for i, j in chunks(n, cols * L * A.element_size()):
            A4, k, d, p, s = _conv_input(m, A[i:j])
            U = _im2rows(A4, k, d, p, s)                             # [chunk, L, cols]
            for G in Gs:  # the kernel sums the bias's squares too
                kernel(G[i:j].reshape(j - i, cout, L).transpose(1, 2), U, w, bias=out.get("bias"), alpha=alpha)
        biased = False
    else:
        for i, j in chunks(n, (m.weight.numel() + cols * m.groups * L) * A.element_size()):
            U = _unfolded(m, A[i:j])
            for G in Gs:
                b = _weight_grads(m, U, G[i:j])
                w.add_(b.mul_(b).sum(0).view(cout, cols), alpha=alpha)  # b is this chunk's own einsum result
    if biased:
        for G in Gs:
            out["bias"].add_(G.reshape(n, cout, L).sum(2).square().sum(0), alpha=alpha)
    return out


def conv_applies(m: nn.Module) -> bool:
    return m.padding_mode in ("zeros", "reflect", "replicate", "circular")


register_rule(nn.Conv1d, conv_per_sample, name="conv1d", sq_sum=conv_sq_sum, applies=conv_applies, sums_into=True)
register_rule(nn.Conv2d, conv_per_sample, name="conv2d", sq_sum=conv_sq_sum, applies=conv_applies, sums_into=True)
