"""End of a task: estimate the Fisher, snapshot the optimum, register both.

The one module that joins the two halves of the library (:mod:`fastewc.fisher` estimates,
:mod:`fastewc.penalty` stores and applies); neither half imports it.
"""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from ._utils import unwrap_model
from .fisher import estimate_fisher


def consolidate(regularizer, model: nn.Module, data: Iterable, **estimate_fisher_kwargs):
    """Estimate the Fisher on ``data``, snapshot the current parameters as the optimum, and register
    both with ``regularizer``. Returns ``(fisher, optimal_params)``."""
    model = unwrap_model(model)
    fisher = estimate_fisher(model, data, **estimate_fisher_kwargs)
    optimum = {n: model.get_parameter(n).detach().clone() for n in fisher}
    regularizer.register_task(fisher, optimum)
    return fisher, optimum
