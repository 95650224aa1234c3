"""What a penalty backend receives and must compute.

The regularizer binds its flat buffers to a model and hands each backend one ``GroupPlan`` per
(device, parameter dtype) group. A backend implements three operations over a plan, all in the
plan's compute dtype (float32, or float64 for float64 parameters):

* ``penalty_sum(plan)``: ``S = sum_i A_i (theta_i - m_i)^2`` as a 0-dim tensor on the group's device;
* ``penalty_grads(plan, scale)``: ``[scale * A * (theta - m)]`` per parameter, in the parameter's
  dtype and shape (``scale``: 0-dim tensor on the device, e.g. ``grad_out * lambda``);
* ``accumulate_grad_(plan, lam)``: ``p.grad += lam * A * (theta - m)`` for every parameter
  (allocating ``p.grad`` where it is ``None``), returning ``S`` as in ``penalty_sum``.

A backend whose ``eager_grads`` is true also implements
``penalty_sum_and_grads(plan, lam) -> (S, [lam * A * (theta - m)])`` in one pass; the autograd
forward then computes the gradient with the value and hands it over in backward, instead of
reading theta, A and m a second time.

A backend that sums on the host (``host_sums`` true: the CPU kernel) may return ``S`` as a Python
float (double precision) instead of a tensor; the binding folds such sums on the host.

``A`` (importance) and ``m`` (anchor) live in the storage dtype; the regularizer folds lambdas,
per-layer scales and tasks into them, so backends know nothing of EWC beyond this quadratic.
None of the three may synchronise the host with the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GroupPlan:
    device: torch.device
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    importance: torch.Tensor          # the group's whole flat buffer, storage dtype
    anchor: torch.Tensor              # idem
    names: tuple[str, ...]            # protected parameters of this group, in order
    offsets: tuple[int, ...]          # their element offsets in the flat buffers
    importance_views: list[torch.Tensor]  # per parameter, shaped like it (views)
    anchor_views: list[torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)  # the live parameters, set every step
    # Set with ``params``: an object that is the same between two steps only when ``params`` are
    # the same tensors at the same addresses, shapes and layouts (the binding checked them), so
    # a backend may reuse what it derived from them without looking; None: unchecked.
    params_token: object = None
    cache: dict = field(default_factory=dict)  # backend-private; lives as long as the binding

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(v.numel() for v in self.importance_views)

    def views_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the view of ``flat`` (a buffer laid out like ``importance``) shaped like it."""
        return [flat[o : o + v.numel()].view(v.shape) for o, v in zip(self.offsets, self.importance_views)]
