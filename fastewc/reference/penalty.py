"""The reference EWC penalty: the original per-task, per-parameter loop, and its regularizers."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn

from ..penalty.selection import ParamSelection


def layer_scales(
    names: Iterable[str],
    layer_lambdas: Mapping[str, float] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, float]:
    """Per-parameter multiplier of ``lambda_ewc`` (0 = not protected); see ``ParamSelection``.

    The glob rule is policy, not arithmetic, so the reference uses the library's one rule.
    """
    sel = ParamSelection.build(layer_lambdas, include, exclude)
    return {name: sel.scale(name) for name in names}


def ewc_penalty_loop(
    model: nn.Module,
    task_fishers: list[Mapping[str, torch.Tensor]],
    task_params: list[Mapping[str, torch.Tensor]],
    lambda_ewc: float,
    scales: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """The original ``EWCRegularizer.forward``: ``(lambda/2) sum_t sum_i s_i F_t,i (theta_i - theta*_t,i)^2``.

    Loops over tasks and parameters; only parameters with ``requires_grad`` count (as in the
    original code's forward). ``scales`` (name -> multiplier, default 1) is the per-layer
    lambda (``layer_lambdas``, ``include`` / ``exclude``; see ``docs/design.md``). Returns a
    differentiable 0-dim tensor in the parameters' dtype (0. as a tensor when nothing is
    registered).
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    loss = torch.zeros((), device=device, dtype=first.dtype if first is not None else None)
    for task_fisher, task_param in zip(task_fishers, task_params):
        for name, param in model.named_parameters():
            if name in task_fisher and param.requires_grad:
                s = 1.0 if scales is None else scales.get(name, 1.0)
                if s == 0.0:
                    continue
                fisher = task_fisher[name].to(param.device)
                optimal = task_param[name].to(param.device)
                loss = loss + s * (fisher * (param - optimal).pow(2)).sum()
    return (lambda_ewc / 2.0) * loss


class ReferenceEWC(nn.Module):
    """The original ``EWCRegularizer``: a list of per-task dicts, looped over at every step."""

    def __init__(self, lambda_ewc: float = 1000.0, scales: Mapping[str, float] | None = None):
        super().__init__()
        self.lambda_ewc = lambda_ewc
        self.scales = scales
        self.task_fishers: list[dict[str, torch.Tensor]] = []
        self.task_params: list[dict[str, torch.Tensor]] = []

    def register_task(self, fisher: Mapping[str, torch.Tensor], optimal_params: Mapping[str, torch.Tensor]):
        self.task_fishers.append({k: v.clone() for k, v in fisher.items()})
        self.task_params.append({k: v.clone() for k, v in optimal_params.items()})

    def forward(self, model: nn.Module) -> torch.Tensor:
        return ewc_penalty_loop(model, self.task_fishers, self.task_params, self.lambda_ewc, self.scales)


class ReferenceOnlineEWC:
    """The original ``OnlineEWC`` plus the decay ``gamma``: ``F~ <- gamma F~ + F_t``, anchor <- latest.

    A name absent from a later task keeps its old anchor, and its accumulated Fisher decays.
    """

    def __init__(self, lambda_ewc: float = 1000.0, gamma: float = 1.0, scales: Mapping[str, float] | None = None):
        self.lambda_ewc = lambda_ewc
        self.gamma = gamma
        self.scales = scales
        self.accumulated_fisher: dict[str, torch.Tensor] | None = None
        self.optimal_params: dict[str, torch.Tensor] | None = None

    def register_task(self, task_fisher: Mapping[str, torch.Tensor], task_params: Mapping[str, torch.Tensor]):
        if self.accumulated_fisher is None:
            self.accumulated_fisher = {k: v.clone() for k, v in task_fisher.items()}
            self.optimal_params = {k: v.clone() for k, v in task_params.items()}
            return
        for name in self.accumulated_fisher:
            self.accumulated_fisher[name] = self.gamma * self.accumulated_fisher[name]
        for name, f in task_fisher.items():
            old = self.accumulated_fisher.get(name)
            self.accumulated_fisher[name] = f.clone() if old is None else old + f
            self.optimal_params[name] = task_params[name].clone()

    def compute_penalty(self, model: nn.Module) -> torch.Tensor:
        if self.accumulated_fisher is None:
            return ewc_penalty_loop(model, [], [], self.lambda_ewc)
        return ewc_penalty_loop(
            model, [self.accumulated_fisher], [self.optimal_params], self.lambda_ewc, self.scales
        )
