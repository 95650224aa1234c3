"""Hugging Face ``Trainer`` with the EWC penalty in its loss (extra ``hf``).

    from fastewc import EWCRegularizer
    from fastewc.integrations.transformers import EWCHFTrainer

    trainer = EWCHFTrainer(model=model, args=args, train_dataset=old_dataset, ewc=EWCRegularizer(1e3))
    trainer.train()                               # task 1: no penalty yet
    trainer.consolidate(old_dataset, num_samples=512)   # Fisher + optimum of task 1
    trainer.train_dataset = new_dataset
    trainer.train()                               # task 2: loss + EWC penalty

``EWCHFTrainer`` is ``transformers.Trainer`` plus :class:`EWCTrainerMixin`; mix the latter into
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
* **the Fisher from the training pass** (``track_fisher=True``): a
  :class:`~fastewc.FisherTracker` rides every training backward of ``train()``, and a following
  ``consolidate()`` registers that Fisher instead of estimating it in a second pass over the data.
  The model's own loss (batches with ``labels``) needs no declaration: the tracker reads each
  sample's share from the labels and the factor the Trainer put on ``output.loss`` (the division
  by the accumulation steps, ``num_items_in_batch``, the AMP scale) from the backward itself.
"""

from __future__ import annotations

import logging

import torch

from .._utils import require, unwrap_model
from ..errors import EWCInputError
from ..fisher.tracker import FisherTracker
from ..penalty import EWCRegularizer
from ..workflow import register_at_current
from ._tracking import tracker_options

_transformers = require("transformers", extra="hf")
_log = logging.getLogger("fastewc.integrations")

# Read from the Trainer: the model's own loss gives the reduction and, from the backward, the
# accumulation division; the accelerator holds the AMP scaler.
_TRACKER_OWNED = ("reduction", "accumulation_steps", "scaler")


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

    def __init__(self, *args, ewc: EWCRegularizer | None = None, track_fisher: bool | dict = False, **kwargs):
        options = tracker_options(track_fisher, _TRACKER_OWNED)  # before the Trainer's set-up: bad input fails fast
        super().__init__(*args, **kwargs)
        if ewc is not None and not isinstance(ewc, EWCRegularizer):
            raise TypeError(f"ewc must be a fastewc.EWCRegularizer; got {type(ewc).__name__}")
        if options is not None and (self.label_smoother is not None or self.compute_loss_func is not None):
            raise EWCInputError("track_fisher: with label smoothing or a compute_loss_func the Trainer's loss is not "
                                "the model's own, and how it weighs each sample is unknown to the tracker; turn them "
                                "off, or consolidate() with a dataset after train() instead")
        self.ewc = ewc if ewc is not None else EWCRegularizer()
        self._ewc_sum: torch.Tensor | None = None
        self._ewc_count = 0
        self._tracker_options = options
        self._tracker: FisherTracker | None = None      # active during train()
        self.tracked_fisher: FisherTracker | None = None  # the last train()'s, until consolidate() uses it

    def train(self, *args, **kwargs):
        if self._tracker_options is None:
            return super().train(*args, **kwargs)
        self._tracker, self.tracked_fisher = None, None
        try:
            out = super().train(*args, **kwargs)
        finally:
            tracker, self._tracker = self._tracker, None
            if tracker is not None:
                tracker.stop()
        self.tracked_fisher = tracker
        return out

    def training_step(self, model, inputs, *args, **kwargs):
        if self._tracker_options is not None and self._tracker is None:
            # Made at the first step, not in train(): the training loop may have built the model
            # anew (model_init) or wrapped it (DDP, torch.compile) by then.
            scaler = getattr(self.accelerator, "scaler", None)
            self._tracker = FisherTracker(_unwrap(model), scaler=scaler, **self._tracker_options).start()
        if self._tracker is not None and "labels" not in inputs:
            # Without labels the model computes no loss of its own, and the loss compute_loss
            # builds weighs the samples in a way the tracker cannot read.
            raise EWCInputError("track_fisher: the training batch has no 'labels', so the model computes no loss of "
                                "its own and the tracker cannot tell each sample's share of the loss; train on "
                                "batches with labels, or consolidate() with a dataset after train() instead")
        return super().training_step(model, inputs, *args, **kwargs)

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

        With ``track_fisher`` and no arguments, the Fisher tracked during the last ``train()`` is
        registered instead (no pass over the data), once; a dataset or keyword arguments ask for
        an estimate as above.
        """
        tracked, self.tracked_fisher = self.tracked_fisher, None
        if tracked is not None and dataset is None and not estimate_fisher_kwargs:
            fisher = tracked.fisher()  # under torch.distributed: summed over the ranks
            register_at_current(self.ewc, _unwrap(self.model), fisher)
            _log.info("EWCHFTrainer.consolidate: registered the Fisher tracked during train() (%d samples on this "
                      "rank, %d steps); no extra pass over the data", tracked.samples_seen, tracked.steps)
            return fisher
        if tracked is not None:
            _log.info("EWCHFTrainer.consolidate: estimating the Fisher on the data as asked; the one tracked during "
                      "train() is dropped")
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("consolidate needs a dataset: pass one or set trainer.train_dataset")
        model = _unwrap(self.model)
        loader = self.get_eval_dataloader(dataset)
        fisher, _ = self.ewc.consolidate(model, loader, **estimate_fisher_kwargs)
        return fisher


class EWCHFTrainer(EWCTrainerMixin, _transformers.Trainer):
    """``transformers.Trainer`` with the EWC penalty; constructor takes ``ewc=`` in addition.

    Named apart from :class:`fastewc.EWCTrainer` (the seed's two-phase trainer in
    :mod:`fastewc.compat`); ``EWCTrainer`` in this module is kept as an alias of this class, so
    ``from fastewc.integrations.transformers import EWCTrainer`` keeps working."""


EWCTrainer = EWCHFTrainer  # the earlier name of EWCHFTrainer, kept as an alias in this module only
