"""Estimating the diagonal Fisher from true per-sample gradients.

Reading order: :mod:`.batches` (what a batch is) -> :mod:`.problem` (one sample's loss, logits and
exact-Fisher cotangents) -> :mod:`.engine` (plan which layers a rule covers, prove the plan on a
probe, run one batched pass with hooks) and :mod:`.rules` (one file per layer family, a public
registry) -> :mod:`.per_sample` (vmap and the loop, for what no rule covers) -> :mod:`.estimate`
(:func:`estimate_fisher`, which strings them together).
"""

from .engine import clear_plan_cache
from .estimate import FisherReport, estimate_fisher, select_parameters
from .rules import register_rule, unregister_rule
from .tracker import FisherTracker

__all__ = ["estimate_fisher", "FisherReport", "select_parameters", "register_rule", "unregister_rule",
           "clear_plan_cache", "FisherTracker"]
