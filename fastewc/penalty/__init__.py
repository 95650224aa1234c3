"""Storing and applying the EWC penalty.

Reading order: :mod:`.regularizer` (the :class:`EWCRegularizer` facade) -> :mod:`.store` (the
collapsed buffers ``A``, ``m`` and constants: merging tasks, growing the layout; plain tensors)
-> :mod:`.binding` (laying the buffers out like a model, the autograd Function) ->
:mod:`.backends` (the PyTorch and Triton launchers) -> :mod:`.sharding` (FSDP2 pieces);
:mod:`.packing`, :mod:`.selection` and :mod:`.validation` are the helpers they share;
:mod:`.saving` writes and reads files.
"""

from .packing import FlatPacking
from .regularizer import EWCRegularizer, OnlineEWC
from .saving import load_regularizer, save_regularizer

__all__ = ["EWCRegularizer", "OnlineEWC", "FlatPacking", "save_regularizer", "load_regularizer"]
