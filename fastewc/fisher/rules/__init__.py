"""Per-layer Fisher rules: one file per layer family, all registered in :mod:`.registry`.

* :mod:`.linear`: ``nn.Linear`` and Hugging Face's ``Conv1D`` (:mod:`.outer_cpu`: its fused CPU
  kernel over sequences);
* :mod:`.conv`: ``nn.Conv1d`` / ``nn.Conv2d``;
* :mod:`.embedding`: ``nn.Embedding``;
* :mod:`.norm`: LayerNorm, RMSNorm (and RMSNorm-style modules of other libraries), GroupNorm,
  BatchNorm in eval mode;
* :mod:`.attention`: ``nn.MultiheadAttention`` computed in the open, or replayed once batched;
* :mod:`.rnn`: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, their recurrence rerun for a chunk of samples;
* :mod:`.local`: the module-local rule for any other module (``torch.func`` over that module
  alone), and the op-local rule for parameters used outside any module;
* :mod:`.replay`: which layers the module-local rule records and replays their own way;
* :mod:`.tied_head`: a weight shared by a Linear head and embedding lookups of its rows.

Add a rule for your own layer with :func:`register_rule`.
"""

from . import conv, embedding, linear, norm
from .registry import BLOCK_BYTES, Rule, add_sq_sums, chunks, register_rule, rule_for, sq_sum_of, unregister_rule

BUILTIN = (linear, conv, embedding, norm)  # importing them registered the built-in rules

__all__ = ["Rule", "register_rule", "unregister_rule", "rule_for", "chunks", "sq_sum_of", "add_sq_sums", "BLOCK_BYTES"]
