"""``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2's projections: a Linear with its weight
stored transposed, ``y = x W + b``).

A weight applied to each sample separately has per-sample gradient ``g_n = G_n^T A_n`` (input
``A_n`` ``[T, in]``, output gradient ``G_n`` ``[T, out]``, T = 1 without a sequence axis). With
T = 1 no per-sample gradient is needed at all: ``sum_n (g_n a_n^T)^2 = (G^2)^T (A^2)``
elementwise. Over a sequence the cross terms ``t != s`` matter, so the per-sample gradients are
formed chunk by chunk (``bmm``), squared and summed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_rule


def _as_3d(A: torch.Tensor, G: torch.Tensor):
    n = A.shape[0]
    return A.reshape(n, -1, A.shape[-1]), G.reshape(n, -1, G.shape[-1])


def _per_sample(A, G, bias: bool, transposed: bool) -> dict:
    A3, G3 = _as_3d(A, G)
    w = torch.bmm(A3.transpose(1, 2), G3) if transposed else torch.bmm(G3.transpose(1, 2), A3)
    out = {"weight": w}
    if bias:
        out["bias"] = G3.sum(1)
    return out


def _sq_sum(A, Gs: list, bias: bool, transposed: bool, weight_numel: int) -> dict:
    out = {}
    if A.dim() == 2:
        # The K columns of the exact Fisher share A: their G^2 add up before the one product.
        G2 = Gs[0].square()
        for G in Gs[1:]:
            G2.addcmul_(G, G)
        out["weight"] = A.square().t() @ G2 if transposed else G2.t() @ A.square()
        if bias:
            out["bias"] = G2.sum(0)
        return out
    # One sample at a time into a reused buffer, squared into the sum while it is still in cache:
    # a [chunk, out, in] block would be written to memory and read back twice.
    total = None
    buf = None
    for G in Gs:
        A3, G3 = _as_3d(A, G)
        left, right = (A3.transpose(1, 2), G3) if transposed else (G3.transpose(1, 2), A3)
        for i in range(A.shape[0]):
            buf = torch.mm(left[i], right[i], out=buf)
            if total is None:
                total = buf.square()
            else:
                total.addcmul_(buf, buf)
    out["weight"] = total
    if bias:
        out["bias"] = sum(_as_3d(A, G)[1].sum(1).square().sum(0) for G in Gs)
    return out


def linear_per_sample(m: nn.Linear, A: torch.Tensor, G: torch.Tensor) -> dict:
    return _per_sample(A, G, m.bias is not None, False)


def linear_sq_sum(m: nn.Linear, A: torch.Tensor, Gs: list) -> dict:
    return _sq_sum(A, Gs, m.bias is not None, False, m.weight.numel())


register_rule(nn.Linear, linear_per_sample, name="linear", sq_sum=linear_sq_sum)


def _is_hf_conv1d(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2)


def conv1d_hf_per_sample(m, A: torch.Tensor, G: torch.Tensor) -> dict:
    return _per_sample(A, G, m.bias is not None, True)


def conv1d_hf_sq_sum(m, A: torch.Tensor, Gs: list) -> dict:
    return _sq_sum(A, Gs, m.bias is not None, True, m.weight.numel())


# Matched by name: transformers is optional and never imported here.
register_rule(_is_hf_conv1d, conv1d_hf_per_sample, name="hf_conv1d", sq_sum=conv1d_hf_sq_sum)
