"""Which parameters ``FisherTracker`` can track on a model, found on one step: :func:`check_tracking`.

The tracker refuses, by name, a parameter whose per-sample gradient it cannot read from the
training step (a bare ``nn.Parameter``, a table that meets the batch in a product, a projection
used both on the batch and on such a table), one refusal at a time, in the order the forward
reaches them. A model with several (DeBERTa-v3: its relative embeddings, their norm, and every
layer's query and key projections) would take as many edits of ``params=`` and reruns. This
runs the given step under a tracker, leaves out what it refuses, and runs it again, until the
step tracks; the model's gradients, buffers and random state are as they were before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._utils import unwrap_model
from ..errors import EWCInputError, UntrackableParameters
from .arguments import select_parameters
from .tracker import FisherTracker


@dataclass
class TrackingCheck:
    """What :func:`check_tracking` found: ``params``, the names ``FisherTracker(model,
    params=check.params)`` tracks; ``left_out``, each parameter it refused, with the refusal's
    message (one message for the parameters refused together)."""

    params: list = field(default_factory=list)
    left_out: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"FisherTracker tracks {len(self.params)} of {len(self.params) + len(self.left_out)} parameters"]
        reasons: dict[str, list] = {}
        for name, why in self.left_out.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            lines.append(f"left out {names}: {why}")
        return "\n".join(lines)


def check_tracking(model: nn.Module, step, *, params=None, reduction: str = "mean") -> TrackingCheck:
    """Find, on one training step, which parameters :class:`~fastewc.FisherTracker` can track.

    ``step()`` runs the forward and returns the loss your training loop back-propagates (e.g.
    ``lambda: F.cross_entropy(model(x), y)`` or ``lambda: model(**batch).loss``); it is called
    under a tracker of ``params`` (default: every parameter that requires grad) and its loss
    back-propagated, without an optimizer step. Each parameter the tracker refuses
    (:class:`~fastewc.errors.UntrackableParameters`) is left out and the step run again, until it
    tracks::

        check = fastewc.check_tracking(model, lambda: model(**batch).loss)
        print(check)                       # what is left out, and why
        tracker = FisherTracker(model, params=check.params)

    Parameters left out have no tracked Fisher: ``estimate_fisher(model, data,
    params=list(check.left_out))`` estimates them after training, in a pass of its own.
    Refusals that leaving parameters out cannot mend (BatchNorm on batch statistics, a loss the
    tracker cannot read) are raised as they are. The model's parameter gradients, its buffers and
    the random number generators are restored after each run, so the check changes nothing the
    training sees. It checks this step's inputs: a later batch of another shape can still be
    refused. Call it on the model before wrapping it in DistributedDataParallel (each run would
    reduce gradients across ranks).
    """
    if not callable(step):
        raise EWCInputError(f"step must be a callable that runs the forward and returns the loss; got "
                            f"{type(step).__name__}")
    inner = unwrap_model(model)
    names = list(select_parameters(inner, params))
    left_out: dict[str, str] = {}
    saved = _Saved(inner)
    try:
        while True:
            keep = [n for n in names if n not in left_out]
            if not keep:
                return TrackingCheck([], left_out)
            try:
                with saved.rng():
                    tracker = FisherTracker(model, params=keep, reduction=reduction)
                    with tracker:
                        loss = step()
                        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
                            raise EWCInputError(f"step() must return the scalar loss to back-propagate; got "
                                                f"{_describe(loss)}")
                        loss.backward()
                return TrackingCheck(keep, left_out)
            except UntrackableParameters as e:
                new = [n for n in e.params if n in keep]
                if not new:  # nothing left to leave out: the refusal stands
                    raise
                left_out.update(dict.fromkeys(new, e.reason))
            finally:
                saved.restore()
    finally:
        saved.restore(grads=True)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}" + ("" if x.requires_grad else " that does not require grad")
    return type(x).__name__


class _Saved:
    """The model's state a dry step changes: its parameters' gradients, its buffers, the random
    number generators (dropout draws)."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.grads = [p.grad for p in self.params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.devices = sorted({t.device.index or 0 for t in [*self.params, *model.buffers()] if t.device.type == "cuda"})
        for p in self.params:
            p.grad = None

    def rng(self):
        return torch.random.fork_rng(devices=self.devices)

    def restore(self, grads: bool = False) -> None:
        with torch.no_grad():
            for b, copy in self.buffers:
                b.copy_(copy)
        for p, g in zip(self.params, self.grads):
            p.grad = g if grads else None
