"""Reading the batches ``estimate_fisher`` accepts, and cutting them to an exact sample count.

Accepted batch formats:

* ``(inputs, targets)`` tuple or list: ``model(inputs)``; targets for the empirical kind;
* ``(inputs,)``: no labels (kinds ``"sampled"`` and ``"exact"`` only);
* a ``dict`` of tensors, Hugging Face style: ``model(**batch)``; ``batch["labels"]`` is what the
  model's own ``output.loss`` uses.

The first dimension of every tensor is the sample axis. A sample is row ``i`` of every tensor, and
the model is always called on a batch of one (per-sample semantics, as the reference loops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import EWCInputError

ACCEPTED = ("accepted: (inputs, targets) or (inputs,) tuples/lists of tensors with the samples on "
            "dim 0, or a dict of such tensors (Hugging Face style, called as model(**batch))")


@dataclass
class Batch:
    """One batch, normalised. ``inputs``: a tensor (positional) or a dict of tensors (keyword);
    ``targets``: labels tensor or None. ``size``: the number of samples."""

    inputs: torch.Tensor | dict
    targets: torch.Tensor | None
    size: int
    index: int = 0  # which batch of the data this is (what error messages name)

    @property
    def is_dict(self) -> bool:
        return isinstance(self.inputs, dict)

    def take(self, n: int) -> "Batch":
        """The first ``n`` samples."""
        if n >= self.size:
            return self
        if self.is_dict:
            return Batch({k: v[:n] for k, v in self.inputs.items()}, None, n, self.index)
        return Batch(self.inputs[:n], None if self.targets is None else self.targets[:n], n, self.index)

    def slice(self, i: int, j: int) -> "Batch":
        if self.is_dict:
            return Batch({k: v[i:j] for k, v in self.inputs.items()}, None, j - i, self.index)
        return Batch(self.inputs[i:j], None if self.targets is None else self.targets[i:j], j - i, self.index)

    def pick(self, rows: list[int]) -> "Batch":
        """The samples at ``rows``, in that order."""
        if self.is_dict:
            return Batch({k: v[rows] for k, v in self.inputs.items()}, None, len(rows), self.index)
        return Batch(self.inputs[rows], None if self.targets is None else self.targets[rows], len(rows), self.index)

    def to(self, device: torch.device) -> "Batch":
        if self.is_dict:
            return Batch({k: v.to(device) for k, v in self.inputs.items()}, None, self.size, self.index)
        t = None if self.targets is None else self.targets.to(device)
        return Batch(self.inputs.to(device), t, self.size, self.index)

    def with_labels(self, labels: torch.Tensor) -> "Batch":
        """The same batch with its dataset labels replaced (``targets``, or ``inputs["labels"]``)."""
        if self.is_dict:
            return Batch({**self.inputs, "labels": labels}, None, self.size, self.index)
        return Batch(self.inputs, labels, self.size, self.index)

    @property
    def model_inputs(self):
        """What the batched passes call the model with: a dict batch without ``labels`` (the
        per-sample losses are formed from the logits, so the model's batch-mean loss is not
        needed), or the positional inputs."""
        if self.is_dict:
            return {k: v for k, v in self.inputs.items() if k != "labels"}
        return self.inputs

    @property
    def labels(self) -> torch.Tensor | None:
        """Dataset labels: ``targets``, or ``inputs["labels"]`` for dict batches."""
        return self.inputs.get("labels") if self.is_dict else self.targets


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_describe(x) if isinstance(x, torch.Tensor) else type(x).__name__ for x in obj[:4])
        return f"a {type(obj).__name__} of {len(obj)} ({inner})"
    if isinstance(obj, Mapping):
        return f"a dict with keys {list(obj)[:6]}"
    return f"a {type(obj).__name__}"


def read_batch(batch, index: int) -> Batch:
    """Normalise one batch, or raise :class:`EWCInputError` saying what it got and what it accepts."""
    if isinstance(batch, Mapping):
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not tensors or len(tensors) != len(batch):
            raise EWCInputError(f"batch {index} is {_describe(batch)} with non-tensor values; {ACCEPTED}")
        sizes = {v.shape[0] if v.dim() else None for v in tensors.values()}
        if len(sizes) != 1 or None in sizes:
            raise EWCInputError(f"batch {index}: dict tensors disagree on the sample dimension "
                                f"({ {k: tuple(v.shape) for k, v in tensors.items()} }); {ACCEPTED}")
        return Batch(dict(tensors), None, sizes.pop(), index)
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and all(isinstance(x, torch.Tensor) for x in batch):
        inputs = batch[0]
        targets = batch[1] if len(batch) == 2 else None
        if inputs.dim() == 0 or (targets is not None and (targets.dim() == 0 or targets.shape[0] != inputs.shape[0])):
            raise EWCInputError(f"batch {index} is {_describe(batch)}: inputs and targets need the same "
                                f"sample dimension 0; {ACCEPTED}")
        return Batch(inputs, targets, inputs.shape[0], index)
    raise EWCInputError(f"batch {index} is {_describe(batch)}; {ACCEPTED}")


# The label cross-entropy skips (PyTorch's and Hugging Face's ignore_index): padding, prompt tokens.
IGNORE_INDEX = -100


def class_labels(labels: torch.Tensor, classes: int, batch: int, start: int, loss: str) -> None:
    """Raise :class:`EWCInputError` naming the batch, the sample and the valid range unless
    ``labels`` are integer class indices in ``[0, classes)`` (``IGNORE_INDEX`` allowed).
    ``batch``: the batch's index in the data; ``start``: the data index of its first sample;
    ``loss``: what needs the class indices (for the message).

    Called before the labels move to the model's device: on host labels the check costs no
    device sync, and on device labels one (the ``any``) per batch; locating the culprit is paid
    only when there is one."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise EWCInputError(
            f"batch {batch}: the labels are {labels.dtype}, but {loss} needs integer class indices in "
            f"[0, {classes - 1}] (torch.long); convert them with .long(), or pass loss_fn for one-hot, soft or "
            f"regression targets")
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= classes)
    if bool(bad.any()):
        rows = bad.reshape(labels.shape[0], -1)
        i = int(rows.any(1).nonzero()[0, 0])
        value = int(labels.reshape(labels.shape[0], -1)[i][rows[i]][0])
        raise EWCInputError(
            f"batch {batch}, sample {i} (sample {start + i} of the data): label {value} is out of range; {loss} "
            f"indexes {classes} classes, so labels must be in [0, {classes - 1}] (or {IGNORE_INDEX}, ignored)")


def iter_batches(data: Iterable, num_samples: int | None) -> Iterator[Batch]:
    """Normalised batches holding exactly ``num_samples`` samples in all (all of ``data`` when None);
    the last one is cut mid-batch when needed. Raises when ``data`` yields no samples."""
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples <= 0):
        raise EWCInputError(f"num_samples must be a positive int (or None for all the data); got {num_samples!r}")
    if isinstance(data, Mapping):
        raise EWCInputError(f"data must be an iterable of batches (a DataLoader, a list of batches); got "
                            f"{_describe(data)}: one dict batch goes in a list, [batch]")
    if isinstance(data, (torch.Tensor, str, bytes)):
        raise EWCInputError(f"data must be an iterable of batches (a DataLoader, a list of batches); "
                            f"got {_describe(data)}")
    try:
        iterator = iter(data)
    except TypeError:
        raise EWCInputError(f"data must be an iterable of batches (a DataLoader, a list of batches); "
                            f"got {_describe(data)}") from None
    seen = 0
    for i, raw in enumerate(iterator):
        if num_samples is not None and seen >= num_samples:
            break
        b = read_batch(raw, i)
        if num_samples is not None:
            b = b.take(num_samples - seen)
        if b.size == 0:
            continue
        seen += b.size
        yield b
    if seen == 0:
        raise EWCInputError("the data yielded no samples (empty DataLoader or dataset?)")
