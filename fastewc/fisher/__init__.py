"""Estimating the diagonal Fisher from true per-sample gradients.

Reading order: :mod:`.batches` (what a batch is) -> :mod:`.problem` (one sample's loss, logits and
exact-Fisher cotangents) -> the rule engine: :mod:`.plan` (which layers a rule covers),
:mod:`.recording` (the hooks of the batched forward), :mod:`.engine` (one batched pass: the
per-sample sums of squares), :mod:`.probe` (prove the plan on the first samples, cache it) and
:mod:`.rules` (one file per layer family, a public registry) -> :mod:`.per_sample` (vmap and the
loop, for what no rule covers) -> :mod:`.estimate` (:func:`estimate_fisher`, which strings them
together, with its arguments checked in :mod:`.arguments` and its :class:`FisherReport` in
:mod:`.report`). :class:`FisherTracker` (:mod:`.tracker`, its per-step hooks in
:mod:`.tracked_step`) applies the same rules inside the user's own training steps;
:func:`check_tracking` (:mod:`.tracked_check`) finds on one step which parameters it can track.
"""

from .arguments import select_parameters
from .estimate import estimate_fisher
from .probe import clear_plan_cache
from .report import FisherReport
from .rules import register_rule, unregister_rule
from .tracked_check import TrackingCheck, check_tracking
from .tracker import FisherTracker

__all__ = ["estimate_fisher", "FisherReport", "select_parameters", "register_rule", "unregister_rule",
           "clear_plan_cache", "FisherTracker", "check_tracking", "TrackingCheck"]
