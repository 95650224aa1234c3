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
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from .._utils import require
from ..penalty import EWCRegularizer


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
        **estimate_fisher_kwargs: passed to :func:`fastewc.estimate_fisher` at consolidation
            (``num_samples``, ``loss_fn``, ``kind``, ...).
    """

    def __init__(self, ewc: EWCRegularizer, *, consolidate_data: Iterable | Callable[[], Iterable] | None = None,
                 log: bool = True, **estimate_fisher_kwargs: Any):
        super().__init__()
        if not isinstance(ewc, EWCRegularizer):
            raise TypeError(f"ewc must be a fastewc.EWCRegularizer; got {type(ewc).__name__}")
        self.ewc = ewc
        self.consolidate_data = consolidate_data
        self.log_penalty = log
        self.fisher_kwargs = estimate_fisher_kwargs

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.ewc.tasks_seen:
            return
        penalty = self.ewc.accumulate_grad_(pl_module)
        if self.log_penalty:
            pl_module.log("ewc_penalty", penalty, on_step=True, on_epoch=False, prog_bar=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.consolidate_data is None:
            return
        data = self.consolidate_data() if callable(self.consolidate_data) else self.consolidate_data
        self.ewc.consolidate(pl_module, data, **self.fisher_kwargs)
