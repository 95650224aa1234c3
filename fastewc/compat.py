"""The original API that fastewc is a drop-in for, on the fast paths.

fastewc started from a reference EWC implementation (the "seed" code: a plain PyTorch
``EWCRegularizer`` with ``register_task(fisher, optimal_params)`` and ``forward(model)``, a
``FisherInformation`` helper, ``compute_fisher`` / ``compute_true_fisher`` functions and a simple
two-phase ``EWCTrainer``). "Seed-compatible" anywhere in fastewc means: the same names, arguments
and results as that reference code, so an existing training loop changes one import. The
reference algorithms themselves are kept, written plainly, in :mod:`fastewc.reference`.

This module is the one place those names live:

* :func:`compute_fisher` / :func:`compute_true_fisher`: empirical / sampled-label Fisher over
  ``num_samples`` samples (default 200, as in the reference).
* :class:`FisherInformation`: ``.compute(loader, criterion) -> (fisher, optimal_params)``.
* :class:`EWCTrainer` (``fastewc.EWCTrainer``): ``train_task`` then ``consolidate``, task after
  task. Not the Hugging Face ``Trainer`` subclass, which is
  :class:`fastewc.integrations.transformers.EWCHFTrainer`.
* ``EWCRegularizer({"ewc_lambda": ...})``, the config-dict constructor, and ``OnlineEWC`` with
  ``compute_penalty`` are accepted by :mod:`fastewc.penalty` itself.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fisher import estimate_fisher
from .penalty import EWCRegularizer

def compute_fisher(model: nn.Module, data_loader: Iterable, num_samples: int = 200, loss_fn=None,
                   **kwargs) -> dict[str, torch.Tensor]:
    """The reference's ``compute_fisher`` (empirical Fisher over ``num_samples`` samples), fast."""
    return estimate_fisher(model, data_loader, loss_fn=loss_fn, kind="empirical", num_samples=num_samples, **kwargs)


def compute_true_fisher(model: nn.Module, data_loader: Iterable, num_samples: int = 200, loss_fn=None,
                        generator: torch.Generator | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """The reference's ``compute_true_fisher`` (labels sampled from the model), fast."""
    return estimate_fisher(model, data_loader, loss_fn=loss_fn, kind="sampled", num_samples=num_samples,
                           generator=generator, **kwargs)


class FisherInformation:
    """The reference's ``FisherInformation(model, fisher_samples, empirical)``:
    ``.compute(data_loader, criterion=None) -> (fisher, optimal_params)``."""

    def __init__(self, model: nn.Module, fisher_samples: int = 200, empirical: bool = True, **estimate_kwargs):
        self.model = model
        self.fisher_samples = fisher_samples
        self.empirical = empirical
        self.estimate_kwargs = estimate_kwargs
        self.fisher: dict[str, torch.Tensor] | None = None
        self.optimal_params: dict[str, torch.Tensor] | None = None

    def compute(self, data_loader: Iterable, criterion: Callable | None = None):
        kind = "empirical" if self.empirical else "sampled"
        self.fisher = estimate_fisher(self.model, data_loader, loss_fn=criterion, kind=kind,
                                      num_samples=self.fisher_samples, **self.estimate_kwargs)
        self.optimal_params = {n: self.model.get_parameter(n).detach().clone() for n in self.fisher}
        return self.fisher, self.optimal_params


class EWCTrainer:
    """Train task after task with EWC; drop-in for the seed class (a plain loop, not the Hugging
    Face ``Trainer`` subclass ``fastewc.integrations.transformers.EWCHFTrainer``).

    Args:
        model: the model to train.
        fisher_samples: samples per Fisher estimate at :meth:`consolidate`.
        ewc_lambda: the penalty strength (``self.ewc.lambda_ewc``).
        learning_rate: Adam's learning rate when no ``optimizer`` is given.
        optimizer: an optimizer over ``model``'s parameters (default Adam).
        regularizer: an ``EWCRegularizer`` to use (default ``EWCRegularizer(ewc_lambda)``).
        empirical: Fisher with dataset labels (True, the seed's default) or sampled labels.
    """

    def __init__(self, model: nn.Module, fisher_samples: int = 200, ewc_lambda: float = 1000.0,
                 learning_rate: float = 1e-3, optimizer: torch.optim.Optimizer | None = None,
                 regularizer: EWCRegularizer | None = None, empirical: bool = True):
        self.model = model
        self.ewc = regularizer if regularizer is not None else EWCRegularizer(ewc_lambda)
        self.regularizer = self.ewc  # the seed's attribute name
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=learning_rate)
        self.fisher_computer = FisherInformation(model, fisher_samples=fisher_samples, empirical=empirical)

    def train_task(self, data_loader: Iterable, num_epochs: int = 10, criterion: Callable | None = None) -> list[float]:
        """Train on one task with the EWC penalty; returns the mean task loss of each epoch.

        The penalty's gradient is added with ``accumulate_grad_`` after ``backward()`` on the task
        loss: the same update as backpropagating ``task_loss + ewc(model)``, in one fused pass.
        """
        criterion = criterion or F.cross_entropy
        self.model.train()
        history = []
        for _ in range(num_epochs):
            total, batches = torch.zeros(()), 0
            for inputs, targets in data_loader:
                self.optimizer.zero_grad(set_to_none=True)
                loss = criterion(self.model(inputs), targets)
                loss.backward()
                if self.ewc.tasks_seen:
                    self.ewc.accumulate_grad_(self.model)
                self.optimizer.step()
                total += loss.detach().cpu()
                batches += 1
            history.append(float(total) / max(1, batches))
        return history

    def consolidate(self, data_loader: Iterable, criterion: Callable | None = None):
        """Estimate the Fisher on ``data_loader`` at the current parameters and register the task.
        Returns ``(fisher, optimal_params)``."""
        fisher, optimal = self.fisher_computer.compute(data_loader, criterion)
        self.ewc.register_task(fisher, optimal)
        return fisher, optimal
