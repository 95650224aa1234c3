"""Penalty implementations a user could write by hand, kept as benchmark baselines.

Neither is used by the library itself; they exist so that benchmarks compare fastewc against the
best obvious alternatives, not only against the per-parameter loop in :mod:`fastewc.reference`:

* :class:`ForeachEWC`: the reference code's per-task sum with ``torch._foreach_*`` multi-tensor ops (a few
  launches per task instead of ~5 per parameter per task), differentiable through autograd.
* :func:`compiled_reference`: ``torch.compile`` of the reference loop (opt-in in benchmarks: it
  compiles for a long time on large models).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ..reference import ReferenceEWC


class ForeachEWC(nn.Module):
    """``(lambda/2) sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` with one foreach op chain per task.

    Stores every task's Fisher and anchor like the reference code (memory 2P per task); parameters named in
    the first task's Fisher and requiring grad are protected.
    """

    def __init__(self, lambda_ewc: float = 1000.0):
        super().__init__()
        self.lambda_ewc = lambda_ewc
        self.tasks: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def register_task(self, fisher: Mapping[str, torch.Tensor], optimal_params: Mapping[str, torch.Tensor]):
        self.tasks.append(({k: v.clone() for k, v in fisher.items()}, {k: v.clone() for k, v in optimal_params.items()}))

    def forward(self, model: nn.Module) -> torch.Tensor:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        total = torch.zeros((), device=named[0][1].device if named else None)
        for fisher, anchor in self.tasks:
            keep = [(n, p) for n, p in named if n in fisher]
            params = [p for _, p in keep]
            diff = torch._foreach_sub(params, [anchor[n] for n, _ in keep])
            weighted = torch._foreach_mul(torch._foreach_mul(diff, diff), [fisher[n] for n, _ in keep])
            total = total + torch.stack([w.sum() for w in weighted]).sum()
        return (self.lambda_ewc / 2.0) * total


def compiled_reference(ref: ReferenceEWC, **compile_kwargs):
    """``torch.compile`` of the reference loop's forward, called as ``fn(model)``."""
    return torch.compile(ref.forward, **compile_kwargs)
