"""The module-local rule's shortcuts for layers it cannot take generically, in one place.

A module without a hand rule is recorded by :func:`.local.record` and replayed per sample by
:func:`.local.module_blocks`. Some layer families need more, all registered here:

* ``nn.MultiheadAttention`` has one batched replay instead of one per sample (:mod:`.attention`);
  a sequence-first one is recorded with its samples moved to axis 0;
* the recurrent layers are recorded the same way and rerun in Python (:mod:`.rnn`);
* ``nn.EmbeddingBag`` is recorded with its bags laid out samples-first (:mod:`.embedding_bag`).

In a tracked training step an attention call needs no replay at all: its own backward hands
over what the sums need (:func:`observe_call`).

Both the rule engine and the tracker go through :func:`record_call` and :func:`local_blocks`, so
a layer added here serves both. Where a layer's parameters have no other use,
:func:`local_sq_sums` gives their sums of squares without per-sample blocks where the family has
such a route (the attention's projections summed like Linear layers, the bags' rows grouped by
sample and token).
"""

from __future__ import annotations

import torch.nn as nn

from .attention import mha_blocks, mha_record, mha_sq_sums, observe_projections
from .embedding_bag import bag_blocks, bag_record, bag_sq_sums
from .local import Recorded, module_blocks, record
from .rnn import rnn_blocks, rnn_record

# module type -> f(module, args, kwargs, output, n) -> (record, to_module) or None
RECORDS = {nn.LSTM: rnn_record, nn.GRU: rnn_record, nn.RNN: rnn_record, nn.MultiheadAttention: mha_record,
           nn.EmbeddingBag: bag_record}
# module type -> f(module, attrs, recorded call, output gradients, i, j) -> blocks or None
LOCAL_REPLAYS = {nn.MultiheadAttention: mha_blocks, nn.LSTM: rnn_blocks, nn.GRU: rnn_blocks, nn.RNN: rnn_blocks,
                 nn.EmbeddingBag: bag_blocks}
# module type -> f(module, attrs, recorded call, output gradients) -> sums of squares or None
LOCAL_SQ_SUMS = {nn.MultiheadAttention: mha_sq_sums, nn.EmbeddingBag: bag_sq_sums}
# module type -> f(module, args, kwargs, output) -> an observed call or None: in a tracked training
# step, what the sums need read from the step's own backward, so that no replay runs
OBSERVERS = {nn.MultiheadAttention: observe_projections}


def record_call(module: nn.Module, args, kwargs, output, n: int, folds: bool = False, axis: int = 0):
    """``(record, to_module)``: the call as its layer family records it, and ``to_module(k, t)``
    giving the rest of the model recorded output ``k`` when the recorder hands on ``t`` in its
    place (None: ``t`` itself, the generic record)."""
    special = RECORDS.get(type(module))
    got = special(module, args, kwargs, output, n) if special is not None else None
    return got if got is not None else (record(args, kwargs, output, n, folds, axis), None)


def local_blocks(module: nn.Module, attrs: list[str], rec: Recorded, grads: list, i: int, j: int) -> dict:
    """Per-sample blocks ``{attr: [j - i, *shape]}`` of one recorded call: the layer family's
    replay where it covers the call, else ``torch.func`` over the module per sample."""
    replay = LOCAL_REPLAYS.get(type(module))
    got = replay(module, attrs, rec, grads, i, j) if replay is not None else None
    return got if got is not None else module_blocks(module, attrs, rec, grads, i, j)


def local_sq_sums(module: nn.Module, attrs: list[str], rec: Recorded, grads: list) -> dict | None:
    """``{attr: sum over the samples of the squared per-sample gradient}`` of one recorded call
    whose parameters have no other use, where the layer family has such a route; else None
    (:func:`local_blocks` then serves)."""
    route = LOCAL_SQ_SUMS.get(type(module))
    return None if route is None or rec.fold != 1 else route(module, attrs, rec, grads)


def observe_call(module: nn.Module, args, kwargs, output):
    """The call observed in its own backward where the layer family can be (an object with
    ``sq_sums(module, attrs, G, tracked, scaled)``), else None: it is replayed."""
    observe = OBSERVERS.get(type(module))
    return None if observe is None else observe(module, args, kwargs, output)
