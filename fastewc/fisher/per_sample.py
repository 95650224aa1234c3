"""Per-sample losses and gradients: the vmap engine and the plain loop behind ``estimate_fisher``.

Both engines see the same per-sample problem: the model is called on a batch of one sample, a
scalar loss is formed, and the squared gradient w.r.t. the selected parameters is accumulated.

* ``vmap``: ``torch.func.vmap(grad(loss))`` over a chunk of samples, through ``functional_call``
  (buffers passed along, so BatchNorm's running statistics are used). The chunk's per-sample
  gradients (``chunk x P`` numbers) are squared in place, summed over the chunk and freed before
  the next chunk: memory is bounded by the chunk, never by N.
* ``loop``: one forward and ``autograd.grad`` per sample, for models ``torch.func`` cannot
  transform (in-place ops on inputs, ``.item()``, data-dependent control flow).

For ``kind="exact"`` the per-sample Fisher ``sum_c p_c g_c^2`` is formed from one forward: the
gradient of cross-entropy with label ``c`` w.r.t. the logits is ``p - e_c``, so each ``g_c`` is a
vector-Jacobian product of the same forward with the cotangent ``(p - e_c) / T`` (T valid
positions of a sequence); the products are batched with ``vmap`` over classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .batches import Batch
from ..errors import EWCInputError

LossFn = Callable[[object, torch.Tensor], torch.Tensor]


def logits_of(output) -> torch.Tensor:
    """The logits in a model output: the tensor itself, or ``output.logits`` (Hugging Face)."""
    if isinstance(output, torch.Tensor):
        return output
    z = getattr(output, "logits", None)
    if z is None and isinstance(output, dict):
        z = output.get("logits")
    if not isinstance(z, torch.Tensor):
        raise EWCInputError(f"the model returned {type(output).__name__} without logits; kinds 'sampled' and "
                            f"'exact' need logits (a tensor, or an output with .logits)")
    return z


def token_cross_entropy(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over positions: ``z`` [1, C] or [1, T, C] logits, ``labels`` [1] / [1, T]
    (-100 = ignored), ``mask`` [1, T] (0 = padding, excluded) or None."""
    C = z.shape[-1]
    ce = F.cross_entropy(z.reshape(-1, C), labels.reshape(-1), ignore_index=-100, reduction="none")
    keep = (labels.reshape(-1) != -100).to(ce.dtype)
    if mask is not None:
        keep = keep * mask.reshape(-1).to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp_min(1)


def _check_scalar(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise EWCInputError(f"the loss of one sample must be a scalar; loss_fn returned {shape}. "
                            f"loss_fn(output, target) receives a batch of one sample: reduce over it "
                            f"(e.g. reduction='mean' or 'sum')")
    return loss.reshape(())


@dataclass
class Problem:
    """What one per-sample loss is: the model, the kind, the loss and the selected parameters."""

    model: torch.nn.Module
    kind: str                      # "empirical" | "sampled" | "exact"
    loss_fn: LossFn | None         # user loss (empirical / sampled), or None for the default
    top_k: int | None
    selected: dict[str, torch.Tensor]  # name -> parameter (differentiated)
    frozen: dict[str, torch.Tensor]    # the model's other parameters and buffers

    # -- the model on one sample ----------------------------------------------------------------
    def call(self, params: dict, inputs, functional: bool = True):
        """Model output for one sample (``inputs`` without the batch axis; one is added)."""
        if isinstance(inputs, dict):
            args, kwargs = (), {k: v.unsqueeze(0) for k, v in inputs.items()}
        else:
            args, kwargs = (inputs.unsqueeze(0),), {}
        if functional:
            return functional_call(self.model, {**self.frozen, **params}, args, kwargs)
        return self.model(*args, **kwargs)

    def loss(self, output, inputs, target) -> torch.Tensor:
        """Scalar loss of one sample; ``target`` without the batch axis (sampled labels for
        kind 'sampled'), or None for dict batches (the model's ``output.loss``)."""
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if self.kind == "sampled":
            if self.loss_fn is not None:
                return _check_scalar(self.loss_fn(output, target.unsqueeze(0)))
            return token_cross_entropy(logits_of(output), target.unsqueeze(0), None if mask is None else mask.unsqueeze(0))
        if self.loss_fn is not None:
            t = target.unsqueeze(0) if target is not None else (inputs.get("labels").unsqueeze(0) if isinstance(inputs, dict) and "labels" in inputs else None)
            return _check_scalar(self.loss_fn(output, t))
        if isinstance(inputs, dict):
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if loss is None:
                raise EWCInputError("dict batch: the model output has no .loss (pass 'labels' in the batch, "
                                    "or give loss_fn)")
            return _check_scalar(loss)
        return token_cross_entropy(logits_of(output), target.unsqueeze(0))

    def exact_cotangents(self, z: torch.Tensor, inputs):
        """For logits ``z`` [1, C] / [1, T, C] of one sample: cotangents ``V`` [K, *z.shape] and
        weights ``W`` [K] such that the sample's exact Fisher is ``sum_k W_k (J^T V_k)^2``."""
        C = z.shape[-1]
        zt = z.detach().reshape(-1, C)                        # [T, C]
        T = zt.shape[0]
        p = torch.softmax(zt.to(torch.float64 if zt.dtype == torch.float64 else torch.float32), -1).to(zt.dtype)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        w = torch.ones(T, dtype=zt.dtype, device=zt.device) if mask is None else mask.reshape(-1).to(zt.dtype)
        w = w / w.sum().clamp_min(1)                          # 1/T per valid position
        k = C if self.top_k is None else min(self.top_k, C)
        probs, classes = (p, torch.arange(C, device=zt.device).expand(T, C)) if k == C else torch.topk(p, k, -1)
        # V[t, j] = w_t (p_t - e_{c_tj}) placed at position t, zeros elsewhere.
        onehot = F.one_hot(classes, C).to(zt.dtype)           # [T, k, C]
        rows = (p.unsqueeze(1) - onehot) * w.view(T, 1, 1)    # [T, k, C]
        eye = torch.eye(T, dtype=zt.dtype, device=zt.device)  # position t -> row t
        V = eye.view(T, 1, T, 1) * rows.unsqueeze(2)          # [T, k, T, C]
        return V.reshape(T * k, *z.shape), probs.reshape(T * k)


@contextlib.contextmanager
def plain_attention():
    """Attention as plain batched matmuls and softmax, which ``vmap`` and hooks can see through.

    scaled_dot_product_attention's fused CPU kernels have no vmap batching rule, and PyTorch's
    fused TransformerEncoderLayer / MultiheadAttention "fast path" (taken when the layer's own
    parameters do not require grad, e.g. when only some parameters are differentiated) has none
    either: torch falls back to a per-sample loop, with a warning. Measured on the benchmark
    Transformer: the fast path made the per-sample pass for its attention weights several times
    slower."""
    flag = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(flag)


# -- vmap engine --------------------------------------------------------------------------------
def vmap_squared_grads(problem: Problem, batch: Batch, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{name: [n, *shape]}``: per-sample squared gradients (exact kind: per-sample Fisher) of the
    ``n`` samples of ``batch``, by ``vmap``. ``labels``: sampled labels (kind 'sampled') or None."""
    with plain_attention():
        return _vmap_squared_grads(problem, batch, labels)


def _vmap_squared_grads(problem: Problem, batch: Batch, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in problem.selected.items()}
    inputs = batch.inputs
    if problem.kind == "exact":
        def one(params, x):
            z, pullback = vjp(lambda p: logits_of(problem.call(p, x)), params)
            V, W = problem.exact_cotangents(z, x)
            (g,) = vmap(pullback)(V)
            return {n: torch.einsum("k,k...->...", W, t * t) for n, t in g.items()}
        return vmap(one, in_dims=(None, 0))(params, inputs)

    target = labels if labels is not None else batch.targets

    def loss(params, x, t):
        return problem.loss(problem.call(params, x), x, t)

    if target is None:
        g = vmap(grad(lambda p, x: loss(p, x, None)), in_dims=(None, 0))(params, inputs)
    else:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, target)
    for t in g.values():
        t.mul_(t)  # squared in place: no second N x P buffer
    return g


# -- loop engine --------------------------------------------------------------------------------
def loop_squared_sums(problem: Problem, batch: Batch, labels: torch.Tensor | None, start: int,
                      sums: dict[str, torch.Tensor], check_each: bool = False) -> None:
    """Add the squared gradients of ``batch``'s samples to ``sums`` in place, one ``autograd.grad``
    per sample (and per class for the exact kind); memory is one gradient, not one per sample.

    ``check_each``: test every sample's gradient for NaN/Inf and raise naming the parameter and
    the sample (``start`` = index of the batch's first sample in the data). Off in the normal
    pass, where the caller checks the sums once per chunk and re-runs the chunk with it on only
    when they are not finite (a per-sample check costs a pass over P and a sync per parameter)."""
    names = list(problem.selected)
    plist = [problem.selected[n] for n in names]
    for i in range(batch.size):
        one = batch.slice(i, i + 1)
        x = {k: v[0] for k, v in one.inputs.items()} if one.is_dict else one.inputs[0]
        with torch.enable_grad():
            output = problem.call({}, x, functional=False)
            if problem.kind == "exact":
                z = logits_of(output)
                V, W = problem.exact_cotangents(z, x)
                sq = [torch.zeros_like(p, dtype=sums[n].dtype) for n, p in zip(names, plist)]
                for k in range(V.shape[0]):
                    gs = torch.autograd.grad(z, plist, grad_outputs=V[k], retain_graph=True, allow_unused=True)
                    for a, g in zip(sq, gs):
                        if g is not None:
                            a.add_(W[k] * g * g)
            else:
                t = labels[i] if labels is not None else (one.targets[0] if one.targets is not None else None)
                gs = torch.autograd.grad(problem.loss(output, x, t), plist, allow_unused=True)
                sq = [None if g is None else g.mul_(g) for g in gs]  # autograd's fresh buffers, squared in place
        for n, q in zip(names, sq):
            if q is None:
                continue
            if check_each and not bool(torch.isfinite(q).all()):
                raise EWCInputError(f"the gradient of parameter {n!r} is NaN/Inf for sample {start + i} (counting "
                                    f"from 0 in the data's order); check that sample and the loss")
            sums[n].add_(q)


@torch.no_grad()
def sample_labels(problem: Problem, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution, one per sample (one per position for
    sequence outputs), in data order: ``multinomial(softmax(logits.double()), 1, generator)`` per
    sample, as the reference loop draws them."""
    if batch.is_dict:
        output = problem.model(**batch.inputs)
    else:
        output = problem.model(batch.inputs)
    z = logits_of(output).double()
    labels = []
    for i in range(batch.size):
        p = torch.softmax(z[i], -1)  # [C], or [T, C] for a sequence: one draw per row
        labels.append(torch.multinomial(p, 1, generator=generator)[..., 0])
    return torch.stack(labels)
