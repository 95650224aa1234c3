"""``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2's projections: a Linear with its weight
stored transposed, ``y = x W + b``).

A weight applied to each sample separately has per-sample gradient ``g_n = G_n^T A_n`` (input
``A_n`` ``[T, in]``, output gradient ``G_n`` ``[T, out]``, T = 1 without a sequence axis). With
T = 1 no per-sample gradient is needed at all: ``sum_n (g_n a_n^T)^2 = (G^2)^T (A^2)``
elementwise. Over a sequence the cross terms ``t != s`` matter, so the per-sample gradients are
formed chunk by chunk (``bmm``), squared and summed; on the CPU, over sequences up to
``KERNEL_MAX_T`` positions, the fused kernel of ``outer_cpu`` does the same without forming them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import outer_cpu
from .registry import register_rule, select_samples


# Per-sample weight gradients up to this size are formed a chunk at a time, in chunks of about
# _CHUNK_BYTES (a size that stays in a core's L2 cache); larger ones one sample at a time.
_SMALL_BLOCK_BYTES = 256 * 2**10
_CHUNK_BYTES = 2 * 2**20
# Up to this many positions the fused CPU kernel beats the batched product, whose inner dimension
# is then too short to run at the BLAS's speed; beyond it the product is as fast and its own
# threads serve (benchmarks/bench_outer_sq.py measures both).
KERNEL_MAX_T = 128
_AUTO = object()


def _as_3d(A: torch.Tensor, G: torch.Tensor):
    """``[n, T, in]`` and ``[n, T, out]``, T the product of the positional axes (also for n = 0)."""
    n, T = A.shape[0], math.prod(A.shape[1:-1])
    return A.reshape(n, T, A.shape[-1]), G.reshape(n, T, G.shape[-1])


def _per_sample(A, G, bias: bool, transposed: bool) -> dict:
    A3, G3 = _as_3d(A, G)
    w = torch.bmm(A3.transpose(1, 2), G3) if transposed else torch.bmm(G3.transpose(1, 2), A3)
    out = {"weight": w}
    if bias:
        out["bias"] = G3.sum(1)
    return out


def sq_sum_linear(A: torch.Tensor, Gs: list, bias: bool, transposed: bool = False, *, kernel=_AUTO,
                  into: dict | None = None, alpha: float = 1.0, picks: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None) -> dict:
    """``{"weight": [out, in] (or [in, out] when ``transposed``), "bias": [out]}``: sum over the
    samples and the columns ``Gs`` of the squared per-sample gradients of a linear map applied
    to input ``A`` ``[n, ..., in]`` with output gradients ``Gs[k]`` ``[n, ..., out]`` (same
    dtype as ``A``), times ``alpha``. ``kernel``: the fused CPU kernel to use where it applies
    (default: this process's, ``outer_cpu.kernel()``), or None for the batched products only.

    ``into``: running sums to add into in place (contiguous, ``A``'s dtype), for the attributes
    it holds only (``{"weight": w}`` computes no bias), returned; by default fresh sums are.
    ``picks``: the samples to sum (int64 indices; default all), the kernel reading them where
    they are; ``weights``: one per summed sample, scaling its gradient (its loss's share)."""
    if kernel is _AUTO:
        kernel = outer_cpu.kernel() if A.device.type == "cpu" else None
    if weights is not None:
        weights = weights.to(A.dtype).contiguous()
    fused = kernel is not None and kernel.supports(A) and A.dim() > 2 and math.prod(A.shape[1:-1]) <= KERNEL_MAX_T
    if not fused:  # the plain twin sums every sample it is given: the picked ones, each scaled
        A, Gs = select_samples(A, Gs, picks, weights)
        picks = weights = None
    w_shape = (A.shape[-1], Gs[0].shape[-1]) if transposed else (Gs[0].shape[-1], A.shape[-1])
    if into is None:
        out = {"weight": None, "bias": None} if bias else {"weight": None}
    else:
        out = dict(into)
    if A.dim() == 2:
        # The K columns of the exact Fisher share A: their G^2 add up before the one product.
        G2 = Gs[0].square()
        for G in Gs[1:]:
            G2.addcmul_(G, G)
        if "weight" in out:
            left, right = (A.square().t(), G2) if transposed else (G2.t(), A.square())
            if out["weight"] is None:  # a fresh product: no zeros written first and read back
                out["weight"] = torch.mm(left, right)
                if alpha != 1.0:
                    out["weight"].mul_(alpha)
            else:
                out["weight"].addmm_(left, right, alpha=alpha)
        if "bias" in out:
            _add(out, "bias", G2.sum(0), alpha)
        return out
    n = A.shape[0]
    block = w_shape[0] * w_shape[1] * A.element_size()
    for attr, shape in (("weight", w_shape), ("bias", Gs[0].shape[-1:])):
        if attr in out and out[attr] is None:
            out[attr] = torch.zeros(shape, dtype=A.dtype, device=A.device)
    total = out.get("weight")
    biased = "bias" in out
    if fused:
        how = {"alpha": alpha, "picks": picks, "weights": weights}
        for G in Gs:
            A3, G3 = _as_3d(A, G)
            if total is not None and not transposed:  # the kernel sums the bias's squares too
                kernel(G3, A3, total, bias=out.get("bias"), **how)
                continue
            if total is not None:  # total[i, o]: the roles of input and output swap
                kernel(A3, G3, total, **how)
            if biased:  # the bias alone, from the output gradients where they are
                kernel(G3, A3, None, bias=out["bias"], **how)
        biased = False
    elif total is None:
        pass  # the bias only
    elif block <= _SMALL_BLOCK_BYTES:
        # Small per-sample gradients: a product per sample would be dominated by its call
        # overhead. A chunk's gradients at once into a buffer that stays in cache, squared in
        # place and summed over the chunk by one matrix-vector product.
        step = max(1, _CHUNK_BYTES // block)
        buf = torch.empty((min(step, n), *w_shape), dtype=A.dtype, device=A.device)
        ones = torch.ones(min(step, n), dtype=A.dtype, device=A.device)
        flat = total.view(-1)
        for G in Gs:
            A3, G3 = _as_3d(A, G)
            left, right = (A3.transpose(1, 2), G3) if transposed else (G3.transpose(1, 2), A3)
            for i in range(0, n, step):
                j = min(n, i + step)
                b = torch.bmm(left[i:j], right[i:j], out=buf[: j - i])
                b.square_()
                flat.addmv_(b.view(j - i, -1).t(), ones[: j - i], alpha=alpha)
    else:
        # One sample at a time into a reused buffer, squared into the sum while it is still in
        # cache: a [chunk, out, in] block of large gradients would go to memory and back.
        buf = None
        for G in Gs:
            A3, G3 = _as_3d(A, G)
            left, right = (A3.transpose(1, 2), G3) if transposed else (G3.transpose(1, 2), A3)
            for lt, rt in zip(left.unbind(0), right.unbind(0)):
                buf = torch.mm(lt, rt, out=buf)
                total.addcmul_(buf, buf, value=alpha)
    if biased:  # the products' paths: the samples were selected and scaled above
        for G in Gs:
            out["bias"].add_(_as_3d(A, G)[1].sum(1).square().sum(0), alpha=alpha)
    return out


def _add(out: dict, attr: str, t: torch.Tensor, alpha: float) -> None:
    """``out[attr] += alpha * t`` in place, or ``alpha * t`` where ``out[attr]`` is still None."""
    if out[attr] is None:
        out[attr] = t.mul_(alpha) if alpha != 1.0 else t
    else:
        out[attr].add_(t, alpha=alpha)


def linear_per_sample(m: nn.Linear, A: torch.Tensor, G: torch.Tensor) -> dict:
    return _per_sample(A, G, m.bias is not None, False)


def linear_sq_sum(m: nn.Linear, A: torch.Tensor, Gs: list, **into) -> dict:
    return sq_sum_linear(A, Gs, m.bias is not None, **into)


register_rule(nn.Linear, linear_per_sample, name="linear", sq_sum=linear_sq_sum, sequence=True, sums_into=True)


def _is_hf_conv1d(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2)


def conv1d_hf_per_sample(m, A: torch.Tensor, G: torch.Tensor) -> dict:
    return _per_sample(A, G, m.bias is not None, True)


def conv1d_hf_sq_sum(m, A: torch.Tensor, Gs: list, **into) -> dict:
    return sq_sum_linear(A, Gs, m.bias is not None, transposed=True, **into)


# Matched by name: transformers is optional and never imported here.
register_rule(_is_hf_conv1d, conv1d_hf_per_sample, name="hf_conv1d", sq_sum=conv1d_hf_sq_sum, sequence=True,
              sums_into=True)
