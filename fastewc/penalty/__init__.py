"""Storing and applying the EWC penalty.

Reading order: :mod:`.regularizer` (the :class:`EWCRegularizer` facade) -> :mod:`.store` (the
collapsed buffers ``A``, ``m`` and constants: merging tasks, growing the layout; plain tensors)
-> :mod:`.binding` (laying the buffers out like a model) -> :mod:`.function` (the autograd
Function) -> :mod:`.backends` (the choice among the four ``backend=`` values: ``"auto"``, which
picks by capability, ``"torch"`` (stock PyTorch ops), ``"triton"`` (the fused GPU kernels) and
``"cpu"`` (the fused C kernel)) -> :mod:`.native` (compiling and loading that C kernel) ->
:mod:`.sharding` (FSDP2 pieces); :mod:`.packing` (the internal flat layout,
:class:`~fastewc.penalty.packing.FlatPacking`), :mod:`.selection` and :mod:`.validation` are the
helpers they share; :mod:`.saving` writes and reads files.
"""

from .regularizer import EWCRegularizer, OnlineEWC
from .saving import load_regularizer, save_regularizer

__all__ = ["EWCRegularizer", "OnlineEWC", "save_regularizer", "load_regularizer"]
