"""The penalty as a differentiable value: ``PenaltyFunction``, the autograd layer between the
backends (``backends/``) and the module (``EWCRegularizer.forward``). It runs a
:class:`~fastewc.penalty.binding.Binding`'s plans; how its gradient reaches the parameters is in
the class docstring.
"""

from __future__ import annotations

import torch

from .binding import Binding

__all__ = ["PenaltyFunction"]


def _accumulates_into_grad(binding: Binding, params) -> bool:
    """Whether the running backward will write each parameter's ``.grad`` (``backward()``, not
    ``torch.autograd.grad`` or ``backward(inputs=...)`` without all of them)."""
    for node in binding.grad_accumulators(params):
        try:
            if not torch._C._will_engine_execute_node(node):
                return False
        except RuntimeError:  # torch's answer for a parameter under torch.autograd.grad: no .grad written
            return False
    return True


class PenaltyFunction(torch.autograd.Function):
    """``(lambda/2)(sum A (theta - m)^2 + c)`` with the backend's gradient ``lambda A (theta - m)``.

    How the gradient reaches the parameters, cheapest first:

    * **Into** ``.grad`` **after the backward** (``Binding.defers``: CPU-side scale, no process
      group, no hooks on the parameters). Forward computes the value only; backward gives autograd
      no gradient for the parameters and queues a callback that runs when the whole backward is
      done, after autograd has written each task gradient into ``.grad``: it adds
      ``lambda * grad_out * A (theta - m)`` there in place, with the backends' ``accumulate_grad_``.
      A fresh parameter-sized gradient handed to autograd would cost an allocation (page faults
      on large models) and a pass of autograd's own to add it into ``.grad``. Used only when the
      backward writes every parameter's ``.grad`` (checked in backward).
    * **Handed to autograd**: ``torch.autograd.grad``, ``backward(inputs=...)``, distributed
      training (the reducers' hooks read ``.grad`` as autograd writes it) and parameters with
      hooks. With an eager backend the forward pass computes the gradient with the value and
      backward hands it over (theta, A and m read once); backward drops its reference first, so
      autograd can adopt the tensor as ``p.grad`` instead of copying it.
    * **Differentiable** (``create_graph=True``): ``lambda * grad_out * A (theta - m)`` from torch
      ops on the parameters, so double backward gets ``lambda A`` as the penalty's Hessian.

    The parameters are saved so that autograd raises if one is modified in place before backward;
    a second backward (``retain_graph=True``) recomputes from them.
    """

    @staticmethod
    def forward(ctx, binding: Binding, lam: float, *params):
        ctx.binding, ctx.lam = binding, lam
        ctx.save_for_backward(*params)
        ctx.defer = binding.defers(params)
        if binding.eager and not ctx.defer:
            value, ctx.grads = binding.value_and_grads(lam)
            return value
        ctx.grads = None
        return binding.value(lam)

    @staticmethod
    def backward(ctx, grad_out):
        params = ctx.saved_tensors  # raises if a parameter changed in place since forward
        grads, ctx.grads = ctx.grads, None
        binding, lam = ctx.binding, ctx.lam
        if torch.is_grad_enabled():  # create_graph=True
            return (None, None, *binding.differentiable_grads(params, grad_out * lam))
        if ctx.defer and _accumulates_into_grad(binding, params):
            scale = grad_out.detach()
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: binding.accumulate_into(params, lam, scale))
            return (None, None, *(None for _ in params))
        if grads is None and not binding.verified(params):  # replaced since forward (``p.data = ...``)
            with torch.no_grad():
                grads = binding.differentiable_grads(params, grad_out * lam)
        elif grads is None:
            binding.set_params(list(params))
            grads = binding.grads(grad_out * lam)
        elif not (grad_out.device.type == "cpu" and bool(grad_out == 1)):
            # Reading grad_out is free on the CPU (no device to wait for); elsewhere always scale.
            torch._foreach_mul_(grads, grad_out)
        return (None, None, *grads)
