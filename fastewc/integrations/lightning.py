"""Lightning callback that adds the EWC penalty's gradient each optimizer step (extra ``lightning``).

    from fastewc import EWCRegularizer
    from fastewc.integrations.lightning import EWCCallback

    ewc = EWCRegularizer(1e3)
    trainer = L.Trainer(callbacks=[EWCCallback(ewc, consolidate_data=task1_loader)], ...)
    trainer.fit(module, task1_loader)    # at the end: Fisher + optimum of task 1 registered
    trainer = L.Trainer(callbacks=[EWCCallback(ewc)], ...)
    trainer.fit(module, task2_loader)    # every step: grad += penalty gradient

The gradient is added in ``on_before_optimizer_step``: Lightning calls it once per optimizer
step (after all accumulated micro-batches) and, under mixed precision, after the gradient scaler
has unscaled the gradients, so the penalty needs no scaling of its own. The penalty value is
logged as ``ewc_penalty``. Automatic optimization only; with manual optimization call
``ewc.accumulate_grad_(self)`` before ``opt.step()`` yourself, or put ``self.ewc(self)`` in the
loss.

With ``track_fisher=True`` a :class:`~fastewc.FisherTracker` rides every training backward of
``fit`` and the Fisher it sums is registered at the end of ``fit``, with no second pass over the
data::

    trainer = L.Trainer(callbacks=[EWCCallback(ewc, track_fisher=True)], ...)
    trainer.fit(module, task1_loader)    # at the end: the tracked Fisher + optimum registered

The loss ``training_step`` returns is taken as a mean over the batch of each sample's loss
(``track_fisher={"reduction": "sum"}`` for a sum); Lightning's division by
``accumulate_grad_batches`` and its mixed-precision scaler are read from the trainer. A Hugging
Face model called with ``labels`` whose ``output.loss`` is returned needs nothing declared.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from .._utils import require
from ..errors import EWCInputError
from ..fisher.tracker import FisherTracker
from ..penalty import EWCRegularizer
from ..workflow import register_at_current
from ._tracking import tracker_options

_log = logging.getLogger("fastewc.integrations")
# Read from the Lightning trainer: the accumulation division and the mixed-precision scaler.
_TRACKER_OWNED = ("accumulation_steps", "scaler")


def _lightning():
    try:
        return require("lightning.pytorch", extra="lightning", package="lightning")
    except ImportError:
        return require("pytorch_lightning", extra="lightning", package="lightning")


_pl = _lightning()


class EWCCallback(_pl.Callback):
    """Adds ``lambda F (theta - theta*)`` to every protected ``p.grad`` before each optimizer step.

    Args:
        ewc: the regularizer (tasks registered so far; it may have none yet).
        consolidate_data: when given (an iterable of batches, or a callable returning one), at the
            end of ``fit`` the Fisher is estimated on it and registered with the current parameters
            as the task's optimum (:meth:`EWCRegularizer.consolidate`).
        log: log the penalty value as ``ewc_penalty`` (per step, on the progress bar off).
        track_fisher: True, or a dict of :class:`~fastewc.FisherTracker` keyword arguments
            (``reduction``, ``params``, ``fraction``, ``seed``, ``decay``): track the Fisher during
            ``fit``'s training steps and register it at the end of ``fit`` (instead of
            ``consolidate_data``). The steps must call the module itself (``self(x)``), whose
            forward the tracker hooks.
        **estimate_fisher_kwargs: passed to :func:`fastewc.estimate_fisher` at consolidation
            (``num_samples``, ``loss_fn``, ``kind``, ...).
    """

    def __init__(self, ewc: EWCRegularizer, *, consolidate_data: Iterable | Callable[[], Iterable] | None = None,
                 log: bool = True, track_fisher: bool | dict = False, **estimate_fisher_kwargs: Any):
        super().__init__()
        if not isinstance(ewc, EWCRegularizer):
            raise TypeError(f"ewc must be a fastewc.EWCRegularizer; got {type(ewc).__name__}")
        options = tracker_options(track_fisher, _TRACKER_OWNED)
        if options is not None and (consolidate_data is not None or estimate_fisher_kwargs):
            raise EWCInputError("EWCCallback: track_fisher registers the Fisher tracked during fit; consolidate_data "
                                "and estimate_fisher arguments ask for an estimate instead. Give one or the other")
        self.ewc = ewc
        self.consolidate_data = consolidate_data
        self.log_penalty = log
        self.fisher_kwargs = estimate_fisher_kwargs
        self._tracker_options = options
        self.tracker: FisherTracker | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self._tracker_options is None:
            return
        # Here, not in __init__: the module is on its device and the precision plugin set up.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.tracker = FisherTracker(pl_module, accumulation_steps=trainer.accumulate_grad_batches, scaler=scaler,
                                     **self._tracker_options).start()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.tracker is not None:
            self.tracker.stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.tracker is not None:
            self.tracker.stop()  # leave no hooks on the module of a failed fit

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.ewc.tasks_seen:
            return
        penalty = self.ewc.accumulate_grad_(pl_module)
        if self.log_penalty:
            pl_module.log("ewc_penalty", penalty, on_step=True, on_epoch=False, prog_bar=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            try:
                # under torch.distributed: summed over the ranks, so every rank raises or none does
                fisher = tracker.fisher()
            except EWCInputError as e:
                raise EWCInputError("EWCCallback(track_fisher=True): no training step was tracked; the tracker opens "
                                    "a step at the LightningModule's own forward, so training_step must call self(...) "
                                    "rather than a submodule") from e
            register_at_current(self.ewc, pl_module, fisher)
            _log.info("EWCCallback: registered the Fisher tracked during fit (%d samples on this rank, %d steps); no "
                      "extra pass over the data", tracker.samples_seen, tracker.steps)
            return
        if self.consolidate_data is None:
            return
        data = self.consolidate_data() if callable(self.consolidate_data) else self.consolidate_data
        self.ewc.consolidate(pl_module, data, **self.fisher_kwargs)
