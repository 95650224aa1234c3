"""Per-sample gradients for what no rule covers: the vmap engine and the plain loop.

Both engines see the same per-sample problem (:mod:`.problem`): the model is called on a batch
of one sample, a scalar loss is formed, and the squared gradient w.r.t. the selected parameters
is accumulated.

* ``vmap``: ``torch.func.vmap(grad(loss))`` over a chunk of samples, through ``functional_call``
  (buffers passed along, so BatchNorm's running statistics are used). The chunk's per-sample
  gradients (``chunk x P`` numbers) are squared, summed over the chunk and freed before the next
  chunk: memory is bounded by the chunk, never by N.
* ``loop``: one forward and ``autograd.grad`` per sample, for models ``torch.func`` cannot
  transform (in-place ops on inputs, ``.item()``, data-dependent control flow).

Gradients are squared out of place, never in place: autograd and vmap may hand back one buffer
(or views of one) for two parameters (``torch.cat([cls.expand(...), x]) + pos`` gives ``cls``
a view of ``pos``'s gradient; ``nn.LSTM`` gives its two biases one tensor), and squaring one of
them in place would square the other too.

For ``kind="exact"`` the per-sample Fisher is formed from one forward: each column of
:func:`.problem.exact_columns` is a vector-Jacobian product of the same forward.
"""

from __future__ import annotations

import torch
from torch.func import grad, vjp, vmap

from ..errors import EWCInputError
from .batches import Batch
from .problem import (Problem, _batched, contiguous_norm_gradients, exact_columns, logits_of, one_sample_grads,
                      plain_attention, position_mask)


def bad_gradient(name: str, sample: int) -> EWCInputError:
    """The error for a NaN/Inf per-sample gradient, naming the parameter and the sample."""
    return EWCInputError(f"the gradient of parameter {name!r} is NaN/Inf for sample {sample} (counting from 0 "
                         f"in the data's order); check that sample and the loss")


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
            (g,) = vmap(pullback)(exact_columns(z, position_mask(z, _batched(x)), problem.top_k))
            return {n: (t * t).sum(0) for n, t in g.items()}
        return vmap(one, in_dims=(None, 0))(params, inputs)

    target = labels if labels is not None else batch.targets

    def loss(params, x, t):
        return problem.loss(problem.call(params, x), x, t)

    if target is None:
        g = vmap(grad(lambda p, x: loss(p, x, None)), in_dims=(None, 0))(params, inputs)
    else:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, target)
    # Out of place (see the module docstring): one parameter's block at a time, so the peak is the
    # chunk's gradients plus one squared block, and each gradient is freed once replaced.
    for n in list(g):
        g[n] = g[n] * g[n]
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
    with contiguous_norm_gradients(problem.model):
        _loop(problem, batch, labels, start, sums, check_each)


def _loop(problem, batch, labels, start, sums, check_each) -> None:
    names = list(problem.selected)
    plist = [problem.selected[n] for n in names]
    for i in range(batch.size):
        one = batch.slice(i, i + 1)
        x = {k: v[0] for k, v in one.inputs.items()} if one.is_dict else one.inputs[0]
        with torch.enable_grad():
            output = problem.call({}, x, functional=False)
            if problem.kind == "exact":
                z = logits_of(output)
                V = exact_columns(z, position_mask(z, one.inputs), problem.top_k)
                sq = [torch.zeros_like(p, dtype=sums[n].dtype) for n, p in zip(names, plist)]
                for k in range(V.shape[0]):
                    gs = one_sample_grads(z, plist, grad_outputs=V[k], retain_graph=True)
                    for a, g in zip(sq, gs):
                        if g is not None:
                            a.addcmul_(g, g)
            else:
                t = labels[i] if labels is not None else (one.targets[0] if one.targets is not None else None)
                gs = one_sample_grads(problem.loss(output, x, t), plist)
                sq = [None if g is None else g * g for g in gs]  # out of place: gs may share memory
        for n, q in zip(names, sq):
            if q is None:
                continue
            if check_each and not bool(torch.isfinite(q).all()):
                raise bad_gradient(n, start + i)
            sums[n].add_(q)
