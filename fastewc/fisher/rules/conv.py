"""``nn.Conv1d`` / ``nn.Conv2d``: the weight is shared over positions, so per-sample gradients are
formed from the unfolded input (``im2col``) chunk by chunk: ``g_n = G_n U_n^T`` per group."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import chunks, register_rule


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


def _im2col(A4: torch.Tensor, k, d, p, s) -> torch.Tensor:
    """``F.unfold(A4, k, dilation=d, padding=p, stride=s)``, ``[n, C*kh*kw, L]``, as one strided
    copy of the padded input's windows: the same values, without ``F.unfold``'s CPU kernel, which
    was most of the rule's time on the benchmarks' CNN (see the tracked-step table)."""
    if p[0] or p[1]:
        A4 = F.pad(A4, (p[1], p[1], p[0], p[0]))
    n, C = A4.shape[:2]
    w = A4.unfold(2, (k[0] - 1) * d[0] + 1, s[0]).unfold(3, (k[1] - 1) * d[1] + 1, s[1])  # [n, C, Ho, Wo, kh', kw']
    if d[0] > 1 or d[1] > 1:
        w = w[..., :: d[0], :: d[1]]
    return w.permute(0, 1, 4, 5, 2, 3).reshape(n, C * k[0] * k[1], w.shape[2] * w.shape[3])


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


def conv_sq_sum(m: nn.Module, A: torch.Tensor, Gs: list) -> dict:
    """The input is unfolded once per chunk and shared by every output gradient (the exact
    Fisher's columns)."""
    n, cout = A.shape[0], m.out_channels
    L = Gs[0][0].numel() // cout                                     # output positions per sample
    per = (m.weight.numel() + m.weight.numel() // cout * m.groups * L) * A.element_size()
    w = None
    for i, j in chunks(n, per):
        U = _unfolded(m, A[i:j])
        for G in Gs:
            b = _weight_grads(m, U, G[i:j])
            s = b.mul_(b).sum(0)  # b is this chunk's own einsum result: no one else's memory
            w = s if w is None else w.add_(s)
    out = {"weight": w}
    if m.bias is not None:
        out["bias"] = sum(G.reshape(n, cout, -1).sum(2).square().sum(0) for G in Gs)
    return out


def conv_applies(m: nn.Module) -> bool:
    return m.padding_mode in ("zeros", "reflect", "replicate", "circular")


register_rule(nn.Conv1d, conv_per_sample, name="conv1d", sq_sum=conv_sq_sum, applies=conv_applies)
register_rule(nn.Conv2d, conv_per_sample, name="conv2d", sq_sum=conv_sq_sum, applies=conv_applies)
