"""Hugging Face ``Trainer`` with the EWC penalty in its loss (extra ``hf``).

    from fastewc import EWCRegularizer
    from fastewc.integrations.transformers import EWCTrainer

    trainer = EWCTrainer(model=model, args=args, train_dataset=old_dataset, ewc=EWCRegularizer(1e3))
    trainer.train()                               # task 1: no penalty yet
    trainer.consolidate(old_dataset, num_samples=512)   # Fisher + optimum of task 1
    trainer.train_dataset = new_dataset
    trainer.train()                               # task 2: loss + EWC penalty

``EWCTrainer`` is ``transformers.Trainer`` plus :class:`EWCTrainerMixin`; mix the latter into
your own ``Trainer`` subclass the same way (it must come first in the bases).

What the mixin takes care of:

* **gradient accumulation**: the Trainer divides a micro-batch loss by the accumulation steps
  unless the loss was already normalised over the accumulated batch (``model_accepts_loss_kwargs``
  with ``num_items_in_batch``, or a ``compute_loss_func``). The mixin adds the penalty so that
  every optimizer step carries it exactly once in either case.
* **AMP / loss scaling**: the penalty is part of the loss the accelerator scales, so its gradient
  is scaled and unscaled with the task gradient.
* **logging**: the mean penalty since the last log appears as ``ewc_penalty`` next to ``loss``
  (kept as a device tensor between logs: no host sync per step).
"""

from __future__ import annotations


import torch

from .._utils import require, unwrap_model
from ..penalty import EWCRegularizer

_transformers = require("transformers", extra="hf")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / DataParallel / accelerate / DeepSpeed wrappers keep the user's module in .module,
    # torch.compile (Trainer's torch_compile=True) in ._orig_mod: parameter names inside are the
    # ones the Fisher was registered under.
    while True:
        inner = unwrap_model(model)
        if inner is model and isinstance(getattr(model, "module", None), torch.nn.Module):
            inner = model.module
        if inner is model:
            return model
        model = inner


class EWCTrainerMixin:
    """Adds ``ewc(model)`` to ``compute_loss``; see the module docstring. Keyword ``ewc=`` (an
    :class:`EWCRegularizer`; default ``EWCRegularizer()``) is taken out of the constructor's
    arguments before the Trainer sees them."""

    def __init__(self, *args, ewc: EWCRegularizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if ewc is not None and not isinstance(ewc, EWCRegularizer):
            raise TypeError(f"ewc must be a fastewc.EWCRegularizer; got {type(ewc).__name__}")
        self.ewc = ewc if ewc is not None else EWCRegularizer()
        self._ewc_sum: torch.Tensor | None = None
        self._ewc_count = 0

    def _loss_is_normalised_over_accumulation(self, num_items_in_batch) -> bool:
        # The rule Trainer.training_step uses to decide whether it divides by the GA steps.
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        loss, outputs = out if return_outputs else (out, None)
        if self.ewc.tasks_seen and model.training:
            penalty = self.ewc(_unwrap(model))
            if self._loss_is_normalised_over_accumulation(num_items_in_batch):
                steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                penalty_in_loss = penalty / steps
            else:
                penalty_in_loss = penalty  # the Trainer divides the whole loss by the GA steps
            loss = loss + penalty_in_loss.to(loss.dtype)
            d = penalty.detach()
            self._ewc_sum = d if self._ewc_sum is None else self._ewc_sum + d
            self._ewc_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._ewc_count:
            logs = dict(logs)
            logs["ewc_penalty"] = round(float(self._ewc_sum) / self._ewc_count, 6)  # one sync per log
            self._ewc_sum, self._ewc_count = None, 0
        super().log(logs, *args, **kwargs)

    def consolidate(self, dataset=None, **estimate_fisher_kwargs) -> dict[str, torch.Tensor]:
        """Estimate the Fisher on ``dataset`` (default: the current ``train_dataset``), snapshot the
        current parameters as the optimum, and register both with ``self.ewc``.

        Batches come from ``get_eval_dataloader(dataset)`` (the Trainer's collator, no shuffling),
        so HF dict batches with ``labels`` work as they do in training. Keyword arguments go to
        :func:`fastewc.estimate_fisher` (``num_samples``, ``kind``, ``params``, ...). Returns the
        Fisher.
        """
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("consolidate needs a dataset: pass one or set trainer.train_dataset")
        model = _unwrap(self.model)
        loader = self.get_eval_dataloader(dataset)
        fisher, _ = self.ewc.consolidate(model, loader, **estimate_fisher_kwargs)
        return fisher


class EWCTrainer(EWCTrainerMixin, _transformers.Trainer):
    """``transformers.Trainer`` with the EWC penalty; constructor takes ``ewc=`` in addition."""
