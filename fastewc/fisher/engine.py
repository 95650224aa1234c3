"""The rule engine: plan which parameters the per-layer rules cover, run one batched forward and
backward with hooks, apply the rules (``_rules.py``), and prove the plan on a probe.

``estimate_fisher`` uses it for ``method="rules"`` and ``"auto"``; the parameters it does not
cover go to the vmap engine (or the loop) in ``fisher.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import per_sample as ps
from .batches import Batch
from .rules import RULES, rule_for
from ..errors import EWCInputError

# Relative tolerance of the probe that checks the rules against the per-sample loop, by dtype:
# both sides are exact up to rounding (float32: sums of ~1e3 products differ by ~1e-6 relative;
# the 2-D shortcut on a sequence layer is off by 50-90%).
PROBE_RTOL = {torch.float64: 1e-7, torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
PROBE_SAMPLES = 3


@dataclass
class RulePlan:
    """Which module covers which selected parameter, and why the others are not covered."""

    modules: dict[str, tuple]                      # module name -> (module, rule name, rule, {attr: param name})
    leftover: list[str]                            # selected parameters for the vmap engine / loop
    reasons: dict[str, str] = field(default_factory=dict)   # leftover parameter -> why
    clone: set = field(default_factory=set)        # modules whose output a later op modifies in place

    def drop(self, mname: str, why: str) -> None:
        _, _, _, attrs = self.modules.pop(mname)
        for pname in attrs.values():
            self.leftover.append(pname)
            self.reasons[pname] = why

    def drop_all(self, why: str) -> None:
        for mname in list(self.modules):
            self.drop(mname, why)

    def absorb(self, trouble: dict[str, str]) -> None:
        """Act on what ``rules_pass`` reported: a module whose output is modified in place later
        is recorded with a copy from now on (once); any other trouble drops the module."""
        for mname, why in trouble.items():
            if why == "clone" and mname not in self.clone:
                self.clone.add(mname)
            else:
                self.drop(mname, why if why != "clone" else "its output is modified in place")

    @property
    def rule_names(self) -> dict[str, str]:
        return {mname: rname for mname, (_, rname, _, _) in self.modules.items()}


def make_plan(model: nn.Module, selected: dict[str, torch.Tensor]) -> RulePlan:
    """Structural plan: a selected parameter gets a rule when exactly one module owns it and a
    rule covers that module's type and configuration."""
    owners: dict[int, list] = {}
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, m, attr))
    plan = RulePlan({}, [])
    for pname, p in selected.items():
        own = owners.get(id(p), [])
        if len(own) != 1:
            plan.leftover.append(pname)
            plan.reasons[pname] = f"shared by {len(own)} modules (tied)"
            continue
        mname, m, attr = own[0]
        found = rule_for(m)
        if found is None:
            plan.leftover.append(pname)
            plan.reasons[pname] = f"no rule for {type(m).__name__}" + (" in this configuration" if type(m) in RULES else "")
            continue
        entry = plan.modules.setdefault(mname, (m, found[0], found[1], {}))
        entry[3][attr] = pname
    return plan


class _Recorder:
    """Forward hooks on the planned modules: each call's input and output (kept unmodified)."""

    def __init__(self, plan: RulePlan):
        self.calls: dict[str, list] = {m: [] for m in plan.modules}
        self.handles = []
        for mname, (module, *_rest) in plan.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(mname, mname in plan.clone), with_kwargs=True))

    def _hook(self, mname, clone):
        def hook(module, args, kwargs, output):
            A = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
            ok = A is not None and isinstance(output, torch.Tensor)
            self.calls[mname].append((A, output, A._version if ok else None, output._version if ok else None, ok))
            if ok and clone:
                # A later op modifies this output in place: give it a copy, keep the original for
                # the gradient (autograd's gradient w.r.t. the original is the layer's G).
                return output.clone()
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def per_sample_ce(z: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` per-sample cross-entropy: ``z`` [N, C] or [N, T, C], labels [N] / [N, T] (-100 =
    ignored), mask [N, T] or None; a sequence sample's loss is the mean over its valid positions
    (as ``_per_sample.token_cross_entropy`` for one sample)."""
    N, C = z.shape[0], z.shape[-1]
    ce = F.cross_entropy(z.reshape(-1, C), labels.reshape(-1), ignore_index=-100, reduction="none").view(N, -1)
    keep = (labels.reshape(N, -1) != -100).to(ce.dtype)
    if mask is not None:
        keep = keep * mask.reshape(N, -1).to(ce.dtype)
    return (ce * keep).sum(1) / keep.sum(1).clamp_min(1)


def _batched_losses(problem: ps.Problem, output, batch: Batch, labels) -> torch.Tensor:
    """``[N]`` per-sample losses from one batched forward (the same numbers the per-sample engines
    form one sample at a time)."""
    mask = batch.inputs.get("attention_mask") if batch.is_dict else None
    target = labels if problem.kind == "sampled" else batch.targets
    if problem.loss_fn is not None:
        if not isinstance(output, torch.Tensor):
            raise _NotApplicable("a custom loss_fn on a non-tensor model output")
        return torch.stack([ps._check_scalar(problem.loss_fn(output[i : i + 1], target[i : i + 1]))
                            for i in range(batch.size)])
    return per_sample_ce(ps.logits_of(output), target, mask)


class _NotApplicable(Exception):
    """The rules cannot express this problem at all (e.g. an HF model's own loss)."""


def rules_pass(problem: ps.Problem, plan: RulePlan, batch: Batch, labels) -> tuple[dict, dict]:
    """One batched forward + backward over ``batch`` with hooks.

    Returns ``(sums, trouble)``: ``sums`` maps each planned parameter to the sum over the batch
    of its squared per-sample gradients (exact kind: per-sample Fisher); ``trouble`` maps module
    names that broke the plan's assumptions to ``"clone"`` (output modified in place later: run
    again with a copy) or a reason (drop the module). With any trouble, ``sums`` is empty.
    """
    rec = _Recorder(plan)
    params = {n: p.detach() for n, p in problem.frozen.items()}
    for n, p in problem.selected.items():
        params[n] = p.detach().requires_grad_(True)  # the graph must reach every planned layer's output
    try:
        with torch.enable_grad(), ps.plain_attention():
            if batch.is_dict:
                output = functional_call(problem.model, params, (), dict(batch.inputs))
            else:
                output = functional_call(problem.model, params, (batch.inputs,))
            trouble = {}
            for mname, calls in rec.calls.items():
                if len(calls) != 1:
                    trouble[mname] = f"its module is called {len(calls)} times per forward"
                    continue
                A, out, va, vo, ok = calls[0]
                if not ok:
                    trouble[mname] = "its module is called with keyword or non-tensor arguments"
                elif A._version != va:
                    trouble[mname] = "its module's input is modified in place after the call"
                elif out._version != vo:
                    trouble[mname] = "clone"
            if trouble:
                return {}, trouble
            mods = list(plan.modules)
            outs = [rec.calls[m][0][1] for m in mods]
            if problem.kind == "exact":
                z = ps.logits_of(output)
                if z.dim() != 2:
                    raise _NotApplicable("the exact Fisher of sequence outputs needs a column per position "
                                         "and class")
                cols = _exact_columns(z, problem.top_k)
                grads_per_col = _backward_columns(z, outs, cols)
            else:
                total = _batched_losses(problem, output, batch, labels).sum()
                grads_per_col = [torch.autograd.grad(total, outs, allow_unused=True)]
    finally:
        rec.remove()
    sums = {}
    with torch.no_grad():
        for j, mname in enumerate(mods):
            module, _, rule, attrs = plan.modules[mname]
            A, out = rec.calls[mname][0][:2]
            Gs = [g[j] if g[j] is not None else torch.zeros_like(out) for g in grads_per_col]
            got = rule(module, A.detach(), [G.detach() for G in Gs])
            for attr, pname in attrs.items():
                sums[pname] = got[attr]
    return sums, {}


def _exact_columns(z: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """``[K, N, C]`` cotangents: column k of sample n is ``sqrt(p_c) (p - e_c)`` for its k-th class
    c, so that ``sum_k (J^T v_k)^2 = sum_c p_c (J^T (p - e_c))^2``: the columns factor the
    output Hessian ``diag(p) - p p^T`` of softmax cross-entropy."""
    zt = z.detach()
    p = torch.softmax(zt.to(torch.float64 if zt.dtype == torch.float64 else torch.float32), -1).to(zt.dtype)
    C = p.shape[-1]
    k = C if top_k is None else min(top_k, C)
    if k == C:
        probs, classes = p, torch.arange(C, device=p.device).expand_as(p)
    else:
        probs, classes = torch.topk(p, k, -1)
    onehot = F.one_hot(classes, C).to(p.dtype)                    # [N, K, C]
    V = probs.sqrt().unsqueeze(-1) * (p.unsqueeze(1) - onehot)    # [N, K, C]
    return V.transpose(0, 1)


def _backward_columns(z, outs, cols) -> list:
    """Backward of every column; batched through autograd's vmap when it can, else one by one."""
    try:
        g = torch.autograd.grad(z, outs, cols, retain_graph=True, allow_unused=True, is_grads_batched=True)
        return [[None if t is None else t[k] for t in g] for k in range(cols.shape[0])]
    except RuntimeError:
        return [torch.autograd.grad(z, outs, cols[k], retain_graph=True, allow_unused=True)
                for k in range(cols.shape[0])]


def forward_is_per_sample(problem: ps.Problem, batch: Batch) -> str | None:
    """Check that the batched forward treats samples independently: its output equals the
    per-sample forward under vmap. None if so, else the reason (vmap failure or mismatch)."""
    params = {**{n: p.detach() for n, p in problem.frozen.items()},
              **{n: p.detach() for n, p in problem.selected.items()}}
    with torch.no_grad(), ps.plain_attention():
        if batch.is_dict:
            full = ps.logits_of(functional_call(problem.model, params, (), dict(batch.inputs)))
        else:
            full = ps.logits_of(functional_call(problem.model, params, (batch.inputs,)))
        try:
            one = vmap(lambda x: ps.logits_of(problem.call(params, x)).squeeze(0))(batch.inputs)
        except Exception as e:  # noqa: BLE001 - any transform failure means: cannot verify
            return f"torch.func cannot run the model per sample ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
    rtol = PROBE_RTOL.get(full.dtype, 1e-3)
    if full.shape != one.shape or not torch.allclose(full, one, rtol=rtol, atol=rtol * float(one.abs().max().clamp_min(1e-30))):
        return "the model's batched output differs from its per-sample output (it mixes samples in a batch)"
    return None


def probe_plan(problem: ps.Problem, plan: RulePlan, batch: Batch) -> None:
    """Prove the plan on the first samples of ``batch`` and shrink it where it fails: modules that
    break the hook assumptions or whose rule disagrees with the per-sample loop go to ``leftover``
    with the reason. Uses the empirical loss (dataset or arg-max labels) so that no random labels
    are drawn and no per-class loop is needed: the rules do not depend on the cotangent."""
    why = check_applicable_output(problem, batch) or forward_is_per_sample(problem, batch.slice(0, min(16, batch.size)))
    if why is not None:
        plan.drop_all(why)
        return
    part = batch.slice(0, min(PROBE_SAMPLES, batch.size))
    if problem.kind == "empirical":
        check, labels = problem, None
    else:
        with torch.no_grad():
            out = problem.model(**part.inputs) if part.is_dict else problem.model(part.inputs)
            labels = ps.logits_of(out).argmax(-1)
        check = ps.Problem(problem.model, "sampled", problem.loss_fn if problem.kind == "sampled" else None,
                           None, problem.selected, problem.frozen)
    for _ in range(3):
        if not plan.modules:
            return
        sums, trouble = rules_pass(check, plan, part, labels)
        if not trouble:
            break
        plan.absorb(trouble)
    else:
        plan.drop_all("the hooks did not settle")
        return
    ruled = {pname for (_, _, _, attrs) in plan.modules.values() for pname in attrs.values()}
    ref = {n: torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                          device=p.device) for n, p in problem.selected.items() if n in ruled}
    sub = ps.Problem(check.model, check.kind, check.loss_fn, None, {n: problem.selected[n] for n in ref},
                     {**problem.frozen, **{n: p.detach() for n, p in problem.selected.items() if n not in ref}})
    ps.loop_squared_sums(sub, part, labels, 0, ref)
    for mname in list(plan.modules):
        _, _, _, attrs = plan.modules[mname]
        for pname in attrs.values():
            a, b = sums[pname].to(ref[pname].dtype), ref[pname]
            rtol = PROBE_RTOL.get(problem.selected[pname].dtype, 1e-3)
            scale = float(b.abs().max()) if b.numel() else 0.0
            if b.numel() and float((a - b).abs().max()) > rtol * scale + 1e-30:
                plan.drop(mname, f"its rule disagreed with the per-sample loop on a probe (is {pname!r} used "
                                 f"outside its module's forward?)")
                break


def check_applicable_output(problem: ps.Problem, batch: Batch) -> str | None:
    """Reasons, found from one forward, why the rules cannot take the problem (None if they can)."""
    if batch.is_dict and problem.kind == "empirical":
        return "dict batches use the model's own loss (output.loss), which is not per sample"
    with torch.no_grad():
        part = batch.slice(0, 1)
        out = problem.model(**part.inputs) if part.is_dict else problem.model(part.inputs)
    if problem.loss_fn is not None and not isinstance(out, torch.Tensor):
        return "a custom loss_fn on a non-tensor model output"
    if problem.kind in ("sampled", "exact") or problem.loss_fn is None:
        try:
            z = ps.logits_of(out)
        except EWCInputError:
            return None  # the per-sample engines raise the clear error
        if problem.kind == "exact" and z.dim() != 2:
            return "the exact Fisher of sequence outputs needs a column per position and class"
    return None
