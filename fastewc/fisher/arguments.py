"""What :func:`~fastewc.estimate_fisher` is given, checked before any gradient is taken.

:func:`select_parameters` turns ``params=`` (names, globs or a predicate) into the parameters to
estimate (:class:`~fastewc.FisherTracker` takes the same argument); :func:`_check_arguments`
checks every other keyword argument's type and range; :func:`_output_check` reads one forward of
the first sample to check that the model's output suits the loss and to learn what the dataset
labels index, which :meth:`_Labels.check` then checks batch by batch. Each refusal is an
:class:`~fastewc.EWCInputError` that names what is wrong and how to fix it.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import EWCInputError
from .batches import Batch, class_labels
from .engine import forward_inputs
from .problem import logits_of, model_head, problem_type

KINDS = ("empirical", "sampled", "exact")
METHODS = ("auto", "rules", "vmap", "loop", "batched")


def select_parameters(model: nn.Module, params=None) -> dict[str, nn.Parameter]:
    """The parameters to estimate, by name (tied parameters once, as ``named_parameters()`` gives).

    ``params``: None (every parameter with ``requires_grad``), a list of names and/or globs
    (``fnmatch``; a name may be frozen if named explicitly), or a predicate ``f(name, param)``.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif callable(params):
        chosen = {n: p for n, p in named.items() if params(n, p)}
    else:
        patterns = _patterns(params)
        unknown = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in named)]
        if unknown:
            raise EWCInputError(f"params: nothing in the model matches {unknown} "
                                f"(the model has {list(named)[:6]}{' ...' if len(named) > 6 else ''})")
        chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise EWCInputError("no parameters selected: the model has no parameter with requires_grad "
                            "(or params= matched none)")
    return chosen


def _patterns(params) -> list[str]:
    """``params`` given as names / globs: a list of strings, or :class:`EWCInputError`."""
    if isinstance(params, str):
        return [params]
    expected = ("params must be None, a parameter name or glob, a list of them (e.g. ['0.weight', 'head.*']), "
                "or a predicate f(name, param) -> bool")
    try:
        patterns = list(params)
    except TypeError:
        raise EWCInputError(f"{expected}; got {type(params).__name__}") from None
    odd = [p for p in patterns if not isinstance(p, str)]
    if odd:
        what = "tensors (pass names: [n for n, p in model.named_parameters() if ...])" \
            if isinstance(odd[0], torch.Tensor) else type(odd[0]).__name__
        raise EWCInputError(f"{expected}; got a {type(params).__name__} holding {what}")
    return patterns


def _check_arguments(loss_fn, kind, num_samples, method, chunk_size, max_memory, progress, generator, top_k,
                     return_info):
    """Each argument's type and range (those that need the model are checked where it is known).
    Returns ``num_samples, chunk_size, max_memory, top_k`` as plain Python numbers."""
    if loss_fn is not None and not callable(loss_fn):
        raise EWCInputError(f"loss_fn must be a callable loss_fn(output, target) -> scalar loss of one sample, or "
                            f"None for the default; got {type(loss_fn).__name__}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise EWCInputError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(method, str) or method not in METHODS:
        raise EWCInputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    num_samples = _positive_int("num_samples", num_samples, "or None for all the data")
    chunk_size = _positive_int("chunk_size", chunk_size, "or None to size chunks from max_memory")
    top_k = _positive_int("top_k", top_k, "or None for every class")
    if max_memory is not None:
        if (isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real)
                or not math.isfinite(max_memory) or max_memory <= 0):
            raise EWCInputError(f"max_memory must be a positive finite number of bytes (e.g. 2**30 for 1 GiB), or "
                                f"None for a quarter of free memory; got {max_memory!r}")
        max_memory = float(max_memory)
    for name, value in (("progress", progress), ("return_info", return_info)):
        if not isinstance(value, bool):
            raise EWCInputError(f"{name} must be True or False; got {value!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise EWCInputError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None; "
                            f"got {type(generator).__name__}")
    if top_k is not None and kind != "exact":
        raise EWCInputError(f"top_k={top_k!r} applies to kind='exact' only (got kind={kind!r})")
    if kind == "exact" and loss_fn is not None:
        raise EWCInputError("kind='exact' sums softmax cross-entropy over the classes; it cannot use a custom loss_fn")
    return num_samples, chunk_size, max_memory, top_k


def _positive_int(name: str, value, none_means: str) -> int | None:
    """``value`` as an int when it is a positive integer (numpy ones included), None for None;
    else :class:`EWCInputError` naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise EWCInputError(f"{name} must be a positive int ({none_means}); got {value!r}")
    return int(value)


@dataclass
class _Labels:
    """What the dataset labels index, found from the model's output on the first sample:
    ``classes`` (None: the labels are not checked), the ``loss`` that uses them (for messages),
    ``one_per_sample`` (the logits have no position axis), ``shift`` (a causal LM's label t is
    position t-1's target: the first label is never used) and ``head`` (a Hugging Face head)."""

    classes: int | None = None
    loss: str = ""
    one_per_sample: bool = False
    shift: bool = False
    head: str | None = None
    config: object = None

    def check(self, batch: Batch, start: int) -> Batch:
        """``batch`` with its labels checked (and made torch.long), or :class:`EWCInputError`
        naming the batch, the sample and the valid range. ``start``: the data index of its first
        sample."""
        labels = batch.labels
        if self.classes is None or labels is None:
            return batch
        if self.head == "sequence_classification":
            # As the model's own loss decides (model_loss_per_sample): class indices only for a
            # single-label problem; regression and multi-label targets are floats.
            if problem_type(self.config, labels, self.classes) != "single_label_classification":
                return batch
        if self.one_per_sample and labels[0].numel() != 1:
            raise EWCInputError(
                f"batch {batch.index}: the labels have shape {tuple(labels.shape)}, but {self.loss} takes one class "
                f"index per sample, shape ({batch.size},); pass loss_fn for one-hot or soft targets")
        class_labels(labels[..., 1:] if self.shift else labels, self.classes, batch.index, start, self.loss)
        # int32 / int16 / uint8 indices name the same classes; cross-entropy takes int64 only
        return batch if labels.dtype == torch.long else batch.with_labels(labels.long())


def _output_check(model: nn.Module, one: Batch, kind: str, loss_fn) -> _Labels:
    """Check, from one forward of the first sample ``one``, that the model's output suits the
    loss: logits where the softmax cross-entropy needs them, and more than one class (softmax
    over one class is constant, so every gradient and the Fisher would be zero). Returns what
    the dataset labels index, for :meth:`_Labels.check` on every batch. No forward (and nothing
    to check) when a user loss_fn takes the labels."""
    softmax = kind != "empirical" or (loss_fn is None and not one.is_dict)
    head = model_head(model) if kind == "empirical" and loss_fn is None and one.is_dict else None
    if not softmax and head is None:
        return _Labels()
    args, kwargs = forward_inputs(model, one)
    with torch.no_grad():
        out = model(*args, **kwargs)
    try:
        z = logits_of(out)
    except EWCInputError:
        got = f"the model returned a {type(out).__name__} (not a tensor, and no .logits)"
        if kind == "empirical":
            raise EWCInputError(
                f"kind='empirical' with the default loss (softmax cross-entropy on the logits) needs logits, but {got}: "
                f"pass loss_fn(output, target) computing one sample's loss from this output, e.g. "
                f"loss_fn=lambda out, y: F.cross_entropy(out[0], y)") from None
        raise EWCInputError(
            f"kind={kind!r} {'draws labels from' if kind == 'sampled' else 'sums over the classes of'} the softmax "
            f"of the logits, so it needs logits, but {got}: return the logits (a tensor, or an output with "
            f".logits), or use kind='empirical' with loss_fn(output, target)") from None
    if z.dim() < 2:
        raise EWCInputError(f"the model's logits for one sample have shape {tuple(z.shape)}; softmax cross-entropy "
                            f"needs a class axis, [N, C] or [N, T, C] (pass loss_fn with kind='empirical' for other "
                            f"outputs)")
    classes = z.shape[-1]
    if softmax and classes == 1:
        # Raised, not warned: the result is known before any gradient is taken and no use of an
        # all-zero Fisher (a penalty of zero) or of labels that are all 0 is meant.
        why = {"exact": "the exact Fisher would be zero for every parameter",
               "empirical": "the default loss (cross-entropy) is 0 for every sample and the Fisher would be zero",
               "sampled": ("every drawn label would be class 0 whatever the model predicts" if loss_fn is not None
                           else "every drawn label is class 0 and the Fisher would be zero")}[kind]
        raise EWCInputError(
            f"kind={kind!r} on a model with one output per sample (logits of shape {tuple(z.shape)}): softmax over "
            f"one class is constant (p = 1), so {why}; for a single-logit binary classifier or a regression model "
            f"pass a loss_fn (e.g. F.binary_cross_entropy_with_logits or F.mse_loss) with kind='empirical', or give "
            f"the model two logits (one per class)")
    if kind != "empirical" or loss_fn is not None:
        return _Labels()
    if head is None:
        return _Labels(classes, "the default loss (cross-entropy on the model's logits)", z.dim() == 2)
    name = type(model).__name__
    if head == "sequence_classification":
        config = getattr(model, "config", None)
        n = getattr(config, "num_labels", classes)
        return _Labels(n, f"{name}'s own loss (cross-entropy)", True, head=head, config=config)
    return _Labels(classes, f"{name}'s own loss (cross-entropy on its logits)", shift=head == "causal_lm", head=head)
