"""Per-layer rules: the Fisher diagonal from ONE batched forward and backward (issue 6).

For a layer whose weight is applied to each sample separately, the sum over samples of squared
per-sample gradients follows from the layer's input ``A`` and the gradient ``G`` of the summed
per-sample losses w.r.t. its output: in eval mode sample ``n``'s loss depends on sample ``n``
only, so ``G[n]`` is the gradient of ``loss_n`` alone. A Linear layer with 2-D input needs no
per-sample gradient at all: ``sum_n (G_n A_n^T)^2 = (G^2)^T (A^2)`` elementwise. Layers that
share a weight across a sequence or spatial axis do need ``g_n = sum_t G_nt A_nt^T`` before
squaring (the 2-D shortcut would drop the cross terms ``t != s``), so their rules form per-sample
gradients chunk by chunk (``bmm`` / ``unfold``), square and sum them.

A rule applies to a parameter only when the engine can prove it sees every use of it: the
parameter belongs to exactly one module, that module is of a ruled type with the stock
``forward`` and a supported configuration, it was called exactly once in the forward pass, with
its input positional and not modified in place afterwards. Everything else goes to the vmap
engine (only those parameters are differentiated there), so coverage is always complete. On
top, the engine checks the whole plan once against the per-sample loop
(``_rule_engine.probe_plan``).

Each rule maps ``(module, A, [G_1 .. G_K])`` to ``{attr: sum_k sum_n g_nk^2}``; K > 1 for the
exact Fisher, where ``G_k`` is the backward of the k-th column of the factor of the output
Hessian.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# A rule that forms per-sample gradients keeps one chunk's block under this many bytes (see
# fisher.LARGEST_BLOCK_BYTES for the measurement behind the figure).
BLOCK_BYTES = 32 * 2**20

Rule = Callable[[nn.Module, torch.Tensor, list], dict]


def _chunks(n: int, per_sample_bytes: int):
    step = max(1, BLOCK_BYTES // max(1, per_sample_bytes))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _sq_sum_blocks(make_block, n: int, per_sample_bytes: int, Gs: list) -> torch.Tensor:
    """``sum_k sum_n block(n, k)^2`` where ``make_block(G, i, j)`` gives the per-sample gradients
    ``[j - i, *shape]`` of samples ``i..j`` for the output gradient ``G``."""
    total = None
    for G in Gs:
        for i, j in _chunks(n, per_sample_bytes):
            b = make_block(G, i, j)
            s = b.mul_(b).sum(0) if b.is_contiguous() else b.square().sum(0)
            total = s if total is None else total.add_(s)
    return total


# -- Linear -------------------------------------------------------------------------------------
def linear_rule(m: nn.Linear, A: torch.Tensor, Gs: list) -> dict:
    out = {}
    if A.dim() == 2:
        # No per-sample gradient needed: sum_n (g_n a_n^T)^2 = (G^2)^T (A^2). For the exact Fisher
        # the K columns share A, so their G^2 add up before the one matrix product.
        G2 = Gs[0].square()
        for G in Gs[1:]:
            G2.addcmul_(G, G)
        out["weight"] = G2.t() @ A.square()
        if m.bias is not None:
            out["bias"] = G2.sum(0)
        return out
    n = A.shape[0]
    A3 = A.reshape(n, -1, A.shape[-1])
    G3s = [G.reshape(n, -1, G.shape[-1]) for G in Gs]
    per = m.weight.numel() * A.element_size()
    out["weight"] = _sq_sum_blocks(lambda G, i, j: torch.bmm(G[i:j].transpose(1, 2), A3[i:j]), n, per, G3s)
    if m.bias is not None:
        out["bias"] = sum(G.sum(1).square().sum(0) for G in G3s)
    return out


def linear_ok(m: nn.Linear) -> bool:
    return True


# -- Conv1d / Conv2d ----------------------------------------------------------------------------
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


def conv_rule(m: nn.Module, A: torch.Tensor, Gs: list) -> dict:
    n, g = A.shape[0], m.groups
    A4, k, d, p, s = _conv_input(m, A)
    cout = m.out_channels
    cols = m.weight.numel() // cout  # (C_in / groups) * prod(kernel)

    def block(G, i, j):
        U = F.unfold(A4[i:j], k, dilation=d, padding=p, stride=s)           # [b, C_in*K, L]
        U = U.view(j - i, g, cols, U.shape[-1])
        Gb = G[i:j].reshape(j - i, g, cout // g, -1)                         # [b, g, C_out/g, L]
        return torch.einsum("bgol,bgil->bgoi", Gb, U).reshape(j - i, *m.weight.shape)

    L = Gs[0][0].numel() // cout  # output positions: the unfolded input has C_in*K x L per sample
    out = {"weight": _sq_sum_blocks(block, n, (m.weight.numel() + g * cols * L) * A.element_size(), Gs)}
    if m.bias is not None:
        out["bias"] = sum(G.reshape(n, cout, -1).sum(2).square().sum(0) for G in Gs)
    return out


def conv_ok(m: nn.Module) -> bool:
    return m.padding_mode in ("zeros", "reflect", "replicate", "circular")


# -- Embedding ----------------------------------------------------------------------------------
def embedding_rule(m: nn.Embedding, A: torch.Tensor, Gs: list) -> dict:
    """Sample n's gradient adds G rows into the rows of the tokens it holds: group (sample, token)
    pairs, sum their rows, square, and add into the table. Memory O(tokens x dim), not O(N x V)."""
    n, V = A.shape[0], m.num_embeddings
    idx = A.reshape(n, -1)
    keys = (torch.arange(n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    if m.padding_idx is not None:
        keep = idx.reshape(-1) != m.padding_idx  # the padding row gets no gradient
    else:
        keep = None
    uniq, inv = torch.unique(keys, return_inverse=True)
    rows = uniq % V
    table = torch.zeros_like(m.weight, dtype=Gs[0].dtype)
    for G in Gs:
        Gf = G.reshape(-1, m.embedding_dim)
        if keep is not None:
            Gf = Gf * keep.unsqueeze(1).to(Gf.dtype)
        per_pair = torch.zeros(uniq.numel(), m.embedding_dim, dtype=Gf.dtype, device=Gf.device).index_add_(0, inv, Gf)
        table.index_add_(0, rows, per_pair.square_())
    return {"weight": table}


def embedding_ok(m: nn.Embedding) -> bool:
    # max_norm renormalises the table in place during forward; scale_grad_by_freq scales by the
    # token counts of the whole batch, not of one sample: neither has a per-sample rule here.
    return m.max_norm is None and not m.scale_grad_by_freq


# -- normalisation layers (affine parameters) ---------------------------------------------------
def _affine(xhat: torch.Tensor, Gs: list, n: int, shape, bias: bool, channel_dim: int | None) -> dict:
    """Per-sample gradients of an elementwise affine ``y = xhat * w + b``: sum ``G * xhat`` (and
    ``G``) over every axis that shares the parameter, then square and sum over samples."""
    def reduce(t):
        if channel_dim is None:  # parameter covers the trailing dims
            return t.reshape(n, -1, *shape).sum(1)
        return t.reshape(n, shape[0], -1).sum(2)  # per channel (dim 1)

    out = {"weight": sum(reduce(G * xhat).square().sum(0) for G in Gs)}
    if bias:
        out["bias"] = sum(reduce(G).square().sum(0) for G in Gs)
    return out


def layer_norm_rule(m: nn.LayerNorm, A, Gs) -> dict:
    xhat = F.layer_norm(A, m.normalized_shape, None, None, m.eps)
    return _affine(xhat, Gs, A.shape[0], m.normalized_shape, m.bias is not None, None)


def layer_norm_ok(m: nn.LayerNorm) -> bool:
    return m.elementwise_affine


def rms_norm_rule(m, A, Gs) -> dict:
    xhat = F.rms_norm(A, m.normalized_shape, None, m.eps)
    return _affine(xhat, Gs, A.shape[0], m.normalized_shape, False, None)


def rms_norm_ok(m) -> bool:
    return m.elementwise_affine


def batch_norm_rule(m: nn.modules.batchnorm._BatchNorm, A, Gs) -> dict:
    shape = [1, -1] + [1] * (A.dim() - 2)
    xhat = (A - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    return _affine(xhat, Gs, A.shape[0], (m.num_features,), m.bias is not None, 1)


def batch_norm_ok(m) -> bool:
    # Eval mode with running statistics: each sample is normalised by fixed numbers. Without
    # them BatchNorm uses the batch's statistics, which mixes samples.
    return m.affine and not m.training and m.running_mean is not None and m.running_var is not None


def group_norm_rule(m: nn.GroupNorm, A, Gs) -> dict:
    xhat = F.group_norm(A, m.num_groups, None, None, m.eps)
    return _affine(xhat, Gs, A.shape[0], (m.num_channels,), True, 1)


def group_norm_ok(m: nn.GroupNorm) -> bool:
    return m.affine


# type -> (rule name, rule, configuration check). The module's class must use the listed type's
# own forward (a subclass that overrides forward computes something else).
RULES: dict[type, tuple[str, Rule, Callable[[nn.Module], bool]]] = {
    nn.Linear: ("linear", linear_rule, linear_ok),
    nn.Conv1d: ("conv1d", conv_rule, conv_ok),
    nn.Conv2d: ("conv2d", conv_rule, conv_ok),
    nn.Embedding: ("embedding", embedding_rule, embedding_ok),
    nn.LayerNorm: ("layernorm", layer_norm_rule, layer_norm_ok),
    nn.BatchNorm1d: ("batchnorm", batch_norm_rule, batch_norm_ok),
    nn.BatchNorm2d: ("batchnorm", batch_norm_rule, batch_norm_ok),
    nn.BatchNorm3d: ("batchnorm", batch_norm_rule, batch_norm_ok),
    nn.GroupNorm: ("groupnorm", group_norm_rule, group_norm_ok),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = ("rmsnorm", rms_norm_rule, rms_norm_ok)


def rule_for(m: nn.Module):
    """``(name, rule)`` for module ``m``, or None when no rule covers it as configured."""
    for cls, (name, rule, ok) in RULES.items():
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return (name, rule) if ok(m) else None
    return None
