"""EWC without task boundaries: :class:`StreamingEWC`.

A stream has no "end of task" at which to estimate a Fisher. ``StreamingEWC`` tracks the exact
per-sample Fisher of the training steps themselves (:class:`~fastewc.FisherTracker`) and every
``every`` steps folds it into online EWC (``F~ <- gamma F~ + F``) with the current parameters as
the new anchor, then starts a fresh Fisher. Between consolidations the penalty of everything
folded so far is added to each step's gradient. Like :mod:`.workflow`, this joins the two halves
of the library; neither imports it.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from ._utils import unwrap_model
from .errors import EWCInputError
from .fisher import FisherTracker
from .penalty import OnlineEWC
from .workflow import register_at_current

__all__ = ["StreamingEWC"]


class StreamingEWC:
    """Online EWC on a stream without task boundaries, with the Fisher taken from the training pass.

    Use it around an ordinary loop; call :meth:`step` after ``backward()`` and before
    ``optimizer.step()``::

        stream = StreamingEWC(model, lambda_ewc=1e4, gamma=0.9, every=200)
        for x, y in stream_of_batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            stream.step()        # adds the penalty's gradient; consolidates every `every` steps
            opt.step()

    Args:
        model: the model being trained.
        lambda_ewc, gamma: as in :class:`~fastewc.OnlineEWC`.
        every: steps between consolidations (the anchor moves and the tracked Fisher is folded in).
        **tracker_kwargs: passed to :class:`~fastewc.FisherTracker` (``reduction``, ``fraction``,
            ``accumulation_steps``, ``scaler``, ``params``, ...).

    Attributes:
        ewc: the :class:`~fastewc.OnlineEWC` regularizer (save it with its ``state_dict``).
        tracker: the :class:`~fastewc.FisherTracker`.
        consolidations: how many times the Fisher was folded in.
    """

    def __init__(self, model: nn.Module, *, lambda_ewc: float = 1000.0, gamma: float = 1.0, every: int = 100,
                 **tracker_kwargs):
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise EWCInputError(f"every must be a positive int (steps between consolidations); got {every!r}")
        self.model = unwrap_model(model)
        self.every = int(every)
        self.ewc = OnlineEWC(lambda_ewc, gamma)
        self.tracker = FisherTracker(self.model, **tracker_kwargs).start()
        self.steps = 0
        self.consolidations = 0

    def step(self) -> torch.Tensor:
        """After ``backward()``: add the penalty's gradient into ``.grad`` (nothing before the first
        consolidation) and, every ``every`` steps, consolidate. Returns the penalty value (detached)."""
        value = self.ewc.accumulate_grad_(self.model)
        self.steps += 1
        if self.steps % self.every == 0:
            self.consolidate()
        return value

    def consolidate(self) -> None:
        """Fold the Fisher tracked since the last consolidation into the online EWC, anchored at the
        current parameters, and start a new one. Does nothing when no step was tracked."""
        if self.tracker.samples_seen == 0:
            return
        register_at_current(self.ewc, self.model, self.tracker.fisher(), model=self.model)
        self.tracker.reset()
        self.consolidations += 1

    def close(self) -> None:
        """Remove the tracker's hooks (the regularizer stays usable)."""
        self.tracker.stop()

    def __enter__(self) -> "StreamingEWC":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
