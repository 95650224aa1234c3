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

A fused backend runs only some dtypes; its ``takes(param_dtype, storage_dtype)`` says which, and
``select_backend`` gives it only groups it takes (the PyTorch backend runs the others), once per
binding: no operation checks the dtypes again.
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
    # The live parameters, handed over by the binding every step: always ones it verified against
    # its fingerprint (addresses, shapes, dtypes, contiguity), or stand-ins over that same storage.
    # A plan lives exactly as long as its binding, which binds anew (new plans) when the
    # fingerprint changes; so whatever a backend derives from the parameters holds for the plan's
    # whole life. Their gradients are not covered: a backend reads them at every call.
    params: list[torch.Tensor] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # backend-private; may hold what is derived from params

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(v.numel() for v in self.importance_views)

    def views_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the view of ``flat`` (a buffer laid out like ``importance``) shaped like it.

        Made by one call into torch's C++ (the helper distributed data parallel uses to unflatten
        buckets) over templates of the parameters and of the alignment gaps between them,
        cached on the plan: slicing and reshaping tensor by tensor from Python would cost two
        Python-level torch calls per parameter, every step (fresh gradients are new views each step)."""
        if _UNFLATTEN is None:
            return [flat[o : o + v.numel()].view(v.shape) for o, v in zip(self.offsets, self.importance_views)]
        layout = self.cache.get("flat-views")
        if layout is None:
            layout = self.cache["flat-views"] = _view_layout(self)
        templates, picks, empties = layout
        views = list(_UNFLATTEN(flat, templates))
        for i in empties:  # some torch versions hand back shape (0,) for an empty template
            views[i] = flat[:0].view(templates[i].shape)
        return views if picks is None else [views[i] for i in picks]


# torch's C++ unflatten (a list of shaped views of consecutive pieces of a flat tensor); the
# Python loop above where a build lacks it.
_UNFLATTEN = getattr(getattr(torch._C, "_nn", None), "unflatten_dense_tensors", None)


def _view_layout(plan: GroupPlan) -> tuple[list[torch.Tensor], list[int] | None, list[int]]:
    """Templates for ``_UNFLATTEN`` (each parameter's importance view, and a 1-D piece for each
    alignment gap before one), where the parameters' views land in its output (None: in order,
    no gaps), and which of those are empty."""
    templates, picks, pos = [], [], 0
    for offset, view in zip(plan.offsets, plan.importance_views):
        if view.numel() == 0:
            offset = pos  # an empty view takes no room; where it "starts" does not matter
        if offset > pos:
            templates.append(plan.importance[pos:offset])
        picks.append(len(templates))
        templates.append(view)
        pos = offset + view.numel()
    empties = [i for i in picks if templates[i].numel() == 0]
    return templates, (None if len(picks) == len(templates) else picks), empties
