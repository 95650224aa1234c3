"""What ``estimate_fisher(..., return_info=True)`` reports: :class:`FisherReport`.

Filled at the end of a call from the rule plan (:class:`~.plan.RulePlan`: which rule covered
which parameter, which went per sample and why, the probe's cost) and the per-sample engine
used; :meth:`FisherReport.summary` is the line ``estimate_fisher`` logs.
"""

from __future__ import annotations


class FisherReport:
    """What ``estimate_fisher(..., return_info=True)`` computed how.

    Attributes: ``method`` (as asked); ``rules`` ({module name: rule}, op-local uses under
    ``"<ops>"``); ``methods`` ({parameter: rule that covered it}); ``rule_params`` (parameters
    covered in the batched pass); ``vmap_params`` / ``loop_params`` (computed per sample, by
    vmap or the loop); ``reasons`` ({parameter: why it went per sample}); ``notes``
    ({parameter: why no hand-written rule covered it}); ``samples``; ``probe_seconds`` (time
    spent proving the plan in this call: 0 when the proven plan was cached); ``plan_cached``.
    """

    def __init__(self, method: str):
        self.method = method
        self.rules: dict[str, str] = {}
        self.methods: dict[str, str] = {}
        self.rule_params: list[str] = []
        self.vmap_params: list[str] = []
        self.loop_params: list[str] = []
        self.reasons: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.samples = 0
        self.probe_seconds = 0.0
        self.plan_cached = False

    def finish(self, plan, left, use, samples) -> None:
        if plan is not None:
            self.rules = plan.rule_names
            self.methods = plan.method_of
            self.rule_params = sorted(plan.covered)
            self.reasons = {n: plan.reasons[n] for n in left.selected if n in plan.reasons}
            self.notes = {n: w for n, w in plan.notes.items() if n in plan.covered}
            self.probe_seconds = 0.0 if self.plan_cached else plan.probe_seconds
        per_sample = list(left.selected)
        if use == "loop":
            self.loop_params = per_sample
        else:
            self.vmap_params = per_sample
        self.samples = samples

    def summary(self) -> str:
        """One line per (method, reason): counts and a few names; full texts in ``reasons``."""
        parts = [f"{self.samples} samples"]
        by_rule: dict[str, list] = {}
        for p, r in self.methods.items():
            by_rule.setdefault(r, []).append(p)
        for r, names in sorted(by_rule.items()):
            parts.append(f"{r}: {_few(names)}")
        for what, names in (("vmap", self.vmap_params), ("loop", self.loop_params)):
            by_reason: dict[str, list] = {}
            for n in names:
                by_reason.setdefault(self.reasons.get(n, "not covered by the rules"), []).append(n)
            for why, ns in by_reason.items():
                parts.append(f"{what}: {_few(ns)} ({why})")
        if self.probe_seconds:
            parts.append(f"probe {self.probe_seconds * 1e3:.0f} ms")
        elif self.plan_cached:
            parts.append("plan cached")
        return " | ".join(parts)

    def __repr__(self) -> str:
        return f"FisherReport({self.summary()})"


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return f"{len(names)} param{'s' if len(names) != 1 else ''} ({shown}{', ...' if len(names) > k else ''})"
