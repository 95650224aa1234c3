"""End of a task: estimate the Fisher, snapshot the optimum, register both.

Joins the two halves of the library (:mod:`fastewc.fisher` estimates, :mod:`fastewc.penalty`
stores and applies), as :mod:`fastewc.streaming` does for streams. Neither half imports it when
it is imported; ``EWCRegularizer.consolidate`` reaches it at call time.
"""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from ._utils import unwrap_model
from .errors import EWCInputError
from .fisher import estimate_fisher


def consolidate(regularizer, model: nn.Module, data: Iterable, **estimate_fisher_kwargs):
    """Estimate the Fisher on ``data``, snapshot the current parameters as the optimum, and register
    both with ``regularizer``. Returns ``(fisher, optimal_params)``."""
    if not callable(getattr(regularizer, "register_task", None)):
        raise EWCInputError(f"regularizer must be an EWCRegularizer or OnlineEWC (anything with register_task); "
                            f"got {type(regularizer).__name__}")
    # estimate_fisher unwraps too; the optimum must be read from the same module, by the same names
    model = unwrap_model(model)
    fisher = estimate_fisher(model, data, **estimate_fisher_kwargs)
    return fisher, register_at_current(regularizer, model, fisher)


def register_at_current(regularizer, model: nn.Module, fisher, /, **register_kwargs) -> dict:
    """Register ``fisher`` with a snapshot of ``model``'s current parameters (read by the
    Fisher's names from the unwrapped model) as the optimum; returns that snapshot."""
    model = unwrap_model(model)
    optimum = {n: model.get_parameter(n).detach().clone() for n in fisher}
    regularizer.register_task(fisher, optimum, **register_kwargs)
    return optimum
