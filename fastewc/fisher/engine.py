"""The rule engine: one batched forward and backward with hooks gives every selected parameter's
sum of squared per-sample gradients.

1. :func:`make_plan` finds where each selected parameter is used: a module with a per-layer rule
   (:mod:`.rules`), any other module (the module-local rule), or operations outside any module
   (the op-local rule, for a bare ``nn.Parameter`` used in ``forward``). A tied parameter has
   several such sites.
2. :func:`rules_pass` runs the batched forward with the parameters detached (so autograd computes
   only activation gradients), recording each site's inputs and outputs, forms the per-sample
   losses (:mod:`.problem`), sums them and takes one backward to the recorded outputs. Because
   samples do not mix in the forward pass, each sample's slice of an output gradient is that
   sample's own gradient; the rules turn it into per-sample parameter gradients. Where a
   parameter has one use, its rule's fast sum of squares serves; where it has several (tied
   weights, a module called twice), the per-sample gradients of every use are added before
   squaring.
3. :func:`probe_plan` proves the plan once on the first samples against a plain per-sample
   autograd loop of its own (:func:`_plain_truth`, deliberately not the loop engine) and sends
   what fails (with the reason) to the per-sample engines; :func:`cached_plan` remembers a
   proven plan per model structure and input signature.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batches import Batch
from .functional import call_once
from .problem import Problem, SampledLabels, exact_columns, logits_of, model_head, model_loss_per_sample, plain_attention, position_mask
from .rules import BLOCK_BYTES, chunks, rule_for, sq_sum_of
from .rules.attention import LOCAL_REPLAYS, RecordingAttention
from .rules.local import ParamLeaf, Recorded, module_blocks, op_blocks, record

# Relative tolerance of the probe that checks the plan against the per-sample loop, by dtype:
# both sides are exact up to rounding (float32 sums of ~1e3 products differ by ~1e-6 relative;
# float64 models that normalise in float32, as Llama's RMSNorm does, by ~1e-7),
# while a wrong rule (the 2-D shortcut on a sequence layer, a missed use) is off by far more.
PROBE_RTOL = {torch.float64: 1e-5, torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
PROBE_SAMPLES = 2
OPS = "<ops>"  # the site of parameters used by operations outside any module


@dataclass
class Site:
    """Where selected parameters are used: a module (with a rule, or module-local) or operations."""

    key: str                       # "rule:<module>", "local:<module>" or OPS
    module_name: str
    module: nn.Module | None
    rule: object | None            # a rules.Rule for rule sites
    params: dict[str, str] = field(default_factory=dict)   # attr (relative name) -> selected name
    batch_free: bool = False       # called on inputs without a batch axis (position tables): its
                                   # output is followed into the operations that meet the batch

    @property
    def label(self) -> str:
        if self.rule is not None:
            return self.rule.name
        return "op-local" if self.key == OPS else "module-local"


@dataclass
class RulePlan:
    """Which sites cover which selected parameters; the others go per sample, with the reason."""

    sites: dict[str, Site]
    leftover: list[str]                                      # parameters for vmap / the loop
    reasons: dict[str, str] = field(default_factory=dict)    # leftover parameter -> why
    notes: dict[str, str] = field(default_factory=dict)      # covered parameter -> why no hand rule
    clone: set = field(default_factory=set)                  # sites whose output a later op modifies in place
    probe_seconds: float = 0.0
    root: nn.Module | None = None                            # the model

    def copy(self) -> "RulePlan":
        sites = {k: Site(s.key, s.module_name, s.module, s.rule, dict(s.params), s.batch_free)
                 for k, s in self.sites.items()}
        return RulePlan(sites, list(self.leftover), dict(self.reasons), dict(self.notes), set(self.clone),
                        self.probe_seconds, self.root)

    @property
    def covered(self) -> set[str]:
        return {p for s in self.sites.values() for p in s.params.values()}

    def drop_param(self, pname: str, why: str) -> None:
        for key in list(self.sites):
            site = self.sites[key]
            site.params = {a: p for a, p in site.params.items() if p != pname}
            if not site.params:
                del self.sites[key]
        if pname not in self.leftover:
            self.leftover.append(pname)
            self.reasons[pname] = why

    def drop_site(self, key: str, why: str) -> None:
        for pname in list(self.sites[key].params.values()) if key in self.sites else []:
            self.drop_param(pname, why)

    def drop_all(self, why: str) -> None:
        for pname in sorted(self.covered):
            self.drop_param(pname, why)

    def to_local(self, key: str, why: str) -> None:
        """A rule site whose calls the rule cannot read (keyword arguments, several tensors) goes
        module-local."""
        site = self.sites.pop(key)
        new = self.sites.setdefault("local:" + site.module_name,
                                    Site("local:" + site.module_name, site.module_name, site.module, None))
        new.params.update(site.params)
        for p in site.params.values():
            self.notes[p] = why

    def to_parent(self, key: str, why: str) -> None:
        """A module that is never called: its parent's forward uses the parameters directly
        (MultiheadAttention's ``out_proj``, say), so the parent's module-local rule takes them;
        under the root, the operations that use them (op-local)."""
        site = self.sites[key]
        if site.module_name == "":
            self.drop_site(key, why)
            return
        del self.sites[key]
        parent_name, _, child = site.module_name.rpartition(".")
        parent = self.root.get_submodule(parent_name)
        key2 = OPS if parent_name == "" and any(True for _ in parent.children()) else "local:" + parent_name
        new = self.sites.setdefault(key2, Site(key2, parent_name, parent if key2 != OPS else None, None))
        for attr, p in site.params.items():
            new.params[p if key2 == OPS else f"{child}.{attr}"] = p
            self.notes[p] = why

    def absorb(self, trouble: dict[str, tuple[str, str]]) -> None:
        """Act on what :func:`rules_pass` reported: ``(action, reason)`` per site key."""
        for key, (action, why) in trouble.items():
            if key not in self.sites:
                continue
            if action == "clone" and key not in self.clone:
                self.clone.add(key)
            elif action == "local":
                self.to_local(key, why)
            elif action == "parent":
                self.to_parent(key, why)
            elif action == "batch_free":
                self.sites[key].batch_free = True
                for p in self.sites[key].params.values():
                    self.notes.setdefault(p, why)
            else:
                self.drop_site(key, why)

    @property
    def rule_names(self) -> dict[str, str]:
        """``{module name: rule}`` for the module sites (op-local sites under ``"<ops>"``)."""
        return {s.module_name if s.key != OPS else OPS: s.label for s in self.sites.values()}

    @property
    def method_of(self) -> dict[str, str]:
        """``{parameter: rule}``: ``"a+b"`` for a parameter used at several sites."""
        out: dict[str, list] = {}
        for s in self.sites.values():
            for p in s.params.values():
                out.setdefault(p, []).append(s.label)
        return {p: "+".join(sorted(set(v))) for p, v in out.items()}


def make_plan(model: nn.Module, selected: dict[str, torch.Tensor]) -> RulePlan:
    """Structural plan: every use of every selected parameter gets a site."""
    owners: dict[int, list] = {}
    seen: set = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            # One module placed at two paths is one site (its hook sees both calls); a site per
            # path would hook the same module twice and count every call twice.
            if p is not None and (id(m), attr) not in seen:
                seen.add((id(m), attr))
                owners.setdefault(id(p), []).append((mname, m, attr))
    plan = RulePlan({}, [], root=model)
    root_has_children = any(True for _ in model.children())
    for pname, p in selected.items():
        uses = owners.get(id(p), [])
        # A module that holds the parameter only to pass it to a child that owns it too (a head's
        # bias tied to its decoder's) is not a use of its own.
        uses = [u for u in uses if not any(v[0] != u[0] and (u[0] == "" or v[0].startswith(u[0] + "."))
                                           for v in uses)]
        for mname, m, attr in uses:
            rule, why = rule_for(m)
            if rule is not None:
                key = "rule:" + mname
                site = plan.sites.setdefault(key, Site(key, mname, m, rule))
                site.params[attr] = pname
            elif mname == "" and root_has_children:
                site = plan.sites.setdefault(OPS, Site(OPS, "", None, None))
                site.params[pname] = pname
                plan.notes[pname] = "used outside any module"
            else:
                key = "local:" + mname
                site = plan.sites.setdefault(key, Site(key, mname, m, None))
                site.params[attr] = pname
                plan.notes[pname] = why
        if len(uses) > 1:
            plan.notes[pname] = f"tied: used by {len(uses)} modules (" + ", ".join(u[0] or "<root>" for u in uses) + ")"
    return plan


# -- recording ---------------------------------------------------------------------------------
@dataclass
class _Call:
    rec: Recorded
    ok_for_rule: bool              # one positional tensor argument, a tensor output
    versions_in: list              # of the per-sample inputs, at the call
    versions_out: list             # of the outputs differentiated, at the call


def _prepare_outputs(outputs: list, clone: bool) -> tuple[list, dict]:
    """``(targets, handed)``: the tensors to differentiate the loss with respect to, and the
    replacements (by position) the rest of the model gets instead of the module's outputs.

    * An output computed from nothing that requires grad (the first layer's, with the parameters
      detached) becomes a leaf that does; the model continues with a copy, so that a later
      in-place op does not touch the leaf.
    * With several outputs, each is differentiated through its own alias (a view): one output
      may be computed from another inside the module (``h`` and ``h.square().mean()``), and the
      gradient w.r.t. ``h`` itself would then include the path through the other output, which
      the module's own vector-Jacobian product adds again.
    * ``clone``: a later op modifies the output in place: the model continues with a copy.
    """
    targets, handed = [], {}
    for k, t in enumerate(outputs):
        copy = clone
        if not t.requires_grad:
            t.requires_grad_(True)
            copy = True
        target = t.view_as(t) if len(outputs) > 1 else t
        targets.append(target)
        if copy:
            handed[k] = target.clone()
        elif target is not t:
            handed[k] = target
    return targets, handed


class _Recorder:
    """Forward hooks on the module sites and, for the op site, a torch-function mode that records
    every operation using the watched parameters."""

    def __init__(self, plan: RulePlan, n: int, values: dict[str, torch.Tensor]):
        self.n = n
        self.calls: dict[str, list[_Call]] = {k: [] for k in plan.sites if k != OPS}
        self.handles = []
        self.ops: list[Recorded] = []
        ops = plan.sites.get(OPS)
        needs_ops = ops is not None or any(s.batch_free for s in plan.sites.values())
        watched = {id(values[p]): p for p in ops.params.values()} if ops is not None else {}
        self.mode = _OpRecorder(self, watched) if needs_ops else None
        self.attention: dict[str, RecordingAttention] = {}
        for key, site in plan.sites.items():
            if key == OPS:
                continue
            hook = self._batch_free_hook(site) if site.batch_free else self._hook(key, key in plan.clone)
            self.handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
            if site.rule is None and not site.batch_free and type(site.module) is nn.MultiheadAttention:
                self.attention[key] = RecordingAttention(site.module)
                site.module.forward = self.attention[key].forward  # this instance, for this pass only

    def _hook(self, key, clone):
        def hook(module, args, kwargs, output):
            rec = record(args, kwargs, output, self.n)
            ok = (len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
                  and args[0].dim() > 0 and args[0].shape[0] == self.n and len(rec.outputs) == 1)
            versions_in = [rec.leaves[k]._version for k in rec.batched]
            rec.outputs, replaced = _prepare_outputs(rec.outputs, clone)
            self.calls[key].append(_Call(rec, ok, versions_in, [t._version for t in rec.outputs]))
            if not replaced:
                return None
            if isinstance(output, torch.Tensor):
                return replaced[0]
            leaves, spec = tree_flatten(output)
            for k, t in replaced.items():
                leaves[rec.out_index[k]] = t
            return tree_unflatten(leaves, spec)
        return hook

    def _batch_free_hook(self, site: Site):
        """The module's output has no batch axis: follow it into the operations that use it,
        rebuilding it from the parameters by calling the module again."""
        def hook(module, args, kwargs, output):
            leaves, _ = tree_flatten(output)
            for k, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    def build(p, k=k):
                        mine = {a: p[n] for a, n in site.params.items()}
                        return tree_flatten(call_once(module, mine, args, kwargs))[0][k]
                    self.mode.watch(t, build, set(site.params.values()))
            return None
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        for att in self.attention.values():
            del att.m.forward  # back to the class's forward


class _OpRecorder(TorchFunctionMode):
    """Records the operations that use watched tensors (parameters used outside any module, and
    tensors derived from them without a batch axis)."""

    def __init__(self, recorder: _Recorder, watched: dict[int, str]):
        super().__init__()
        self.recorder = recorder
        self.builders = {i: ParamLeaf(name) for i, name in watched.items()}
        self.sources = {i: {name} for i, name in watched.items()}
        self.keep = []  # keeps derived tensors alive so that their ids stay unique
        self.op_trouble: str | None = None

    def watch(self, t: torch.Tensor, build, sources: set) -> None:
        self.builders[id(t)] = build
        self.sources[id(t)] = sources
        self.keep.append(t)

    def _touches_watched(self, args, kwargs) -> bool:
        """Whether a watched tensor is among the arguments (one level of lists and tuples deep,
        as torch's operations take them): every operation of the forward passes through here."""
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor):
                if id(x) in self.builders:
                    return True
            elif isinstance(x, (list, tuple)):
                if any(isinstance(y, torch.Tensor) and id(y) in self.builders for y in x):
                    return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._touches_watched(args, kwargs):
            return out
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        slots = {k: self.builders[id(x)] for k, x in enumerate(leaves)
                 if isinstance(x, torch.Tensor) and id(x) in self.builders}
        if not slots or not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        n = self.recorder.n
        sources = set().union(*(self.sources[id(leaves[k])] for k in slots))
        batched_in = any(isinstance(x, torch.Tensor) and k not in slots and x.dim() > 0 and x.shape[0] == n
                         for k, x in enumerate(leaves))
        if not batched_in and not (out.dim() > 0 and out.shape[0] == n and any(
                leaves[k].dim() > 0 and leaves[k].shape[0] == n for k in slots)):
            # No batch axis yet (pos[:T], scale * 2): remember how to rebuild it from the parameters.
            # A batch axis made by broadcasting (cls.expand(B, -1, -1): stride 0, every row the same
            # memory) is rebuilt with one row, as a sample replayed alone sees it; a size that only
            # equals the batch size is not taken for one.
            spread = n > 1 and out.dim() > 0 and out.shape[0] == n and out.stride(0) == 0

            def build(p, func=func, leaves=list(leaves), spec=spec, slots=slots, spread=spread):
                ls = list(leaves)
                for k, b in slots.items():
                    ls[k] = b(p)
                a, kw = tree_unflatten(ls, spec)
                y = func(*a, **kw)
                return y[:1] if spread else y
            self.watch(out, build, sources)
            return out
        if out.dim() == 0 or out.shape[0] != n:
            self.op_trouble = f"used in {getattr(func, '__name__', func)!s} whose result has no batch axis"
            return out
        rec = Recorded(leaves, spec, [out], [0], n, slots, func, sources)
        rec.versions_in = [rec.leaves[k]._version for k in rec.batched]
        rec.outputs, replaced = _prepare_outputs(rec.outputs, False)
        self.recorder.ops.append(rec)
        return replaced.get(0, out)


# -- the batched pass --------------------------------------------------------------------------
def forward_inputs(model: nn.Module, batch: Batch):
    """``(args, kwargs)`` of the batched forward. Hugging Face models get ``use_cache=False``: a
    key/value cache is of no use here and would be shared by every replayed call."""
    if not batch.is_dict:
        return (batch.inputs,), {}
    kwargs = dict(batch.model_inputs)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        kwargs.setdefault("use_cache", False)
    return (), kwargs


def rules_pass(problem: Problem, plan: RulePlan, batch: Batch, labels) -> tuple[dict, dict]:
    """One batched forward + backward over ``batch`` with hooks.

    ``labels``: for kind 'sampled', the drawn labels or a :class:`SampledLabels` that draws them
    from this pass's own logits; else None.

    Returns ``(sums, trouble)``: ``sums`` maps each covered parameter to the sum over the batch of
    its squared per-sample gradients (exact kind: of the per-sample Fisher); ``trouble`` maps
    site keys that broke the plan's assumptions to ``(action, reason)``, an action of
    :meth:`RulePlan.absorb` (``"clone"``, ``"local"``, ``"parent"``, ``"batch_free"`` or
    ``"drop"``). With any trouble, ``sums`` is empty.
    """
    n = batch.size
    values = {k: v.detach() for k, v in {**problem.frozen, **problem.selected}.items()}
    rec = _Recorder(plan, n, values)
    try:
        with torch.enable_grad():
            args, kwargs = forward_inputs(problem.model, batch)
            if rec.mode is not None:
                with rec.mode:
                    output = call_once(problem.model, values, args, kwargs)
            else:
                output = call_once(problem.model, values, args, kwargs)
            if isinstance(labels, SampledLabels):
                labels = labels.of(output)  # drawn once, kept for a retry after trouble
            trouble = _check_calls(plan, rec)
            if trouble:
                return {}, trouble
            outs, where = _outputs(plan, rec)
            if problem.kind == "exact":
                z = logits_of(output)
                cols = exact_columns(z, position_mask(z, batch.inputs), problem.top_k)
                grads_per_col = _backward_columns(z, outs, cols)
            else:
                total = problem.batched_losses(output, batch, labels).sum()
                grads_per_col = [list(torch.autograd.grad(total, outs, allow_unused=True))]
    finally:
        rec.remove()
    grads_per_col = [[torch.zeros_like(o) if g is None else g.detach() for g, o in zip(col, outs)]
                     for col in grads_per_col]
    with torch.no_grad(), plain_attention():
        return _sums(problem, plan, rec, where, grads_per_col, values), {}


def _check_calls(plan: RulePlan, rec: _Recorder) -> dict:
    trouble = {}
    for key, calls in rec.calls.items():
        site = plan.sites[key]
        if site.batch_free:
            continue
        if calls and all(not c.rec.batched and not c.rec.outputs for c in calls):
            trouble[key] = ("batch_free", f"{site.module_name} is called without a batch axis: followed into "
                                          f"the operations that use its output")
            continue
        if not calls:
            trouble[key] = ("parent", f"{site.module_name or '<root>'} is never called: its parent's forward "
                                     f"uses the parameters directly")
            continue
        if site.rule is not None and not all(c.ok_for_rule for c in calls):
            trouble[key] = ("local", f"{type(site.module).__name__} is called with keyword, several or non-tensor "
                                     f"arguments")
            continue
        for c in calls:
            if any(c.rec.leaves[k]._version != v for k, v in zip(c.rec.batched, c.versions_in)):
                trouble[key] = ("drop", "its module's input is modified in place after the call")
                break
            if any(t._version != v for t, v in zip(c.rec.outputs, c.versions_out)):
                trouble[key] = ("clone", "its output is modified in place")
                break
    if rec.mode is not None:
        bad = rec.mode.op_trouble
        if bad is None and any(any(r.leaves[k]._version != v for k, v in zip(r.batched, r.versions_in))
                               for r in rec.ops):
            bad = "an input of an operation using it is modified in place afterwards"
        if bad is not None:
            for key, site in plan.sites.items():
                if key == OPS or site.batch_free:
                    trouble[key] = ("drop", bad)
    return trouble


def _outputs(plan: RulePlan, rec: _Recorder):
    """The recorded outputs to differentiate, and where each call's outputs sit in that list."""
    outs, where = [], {}
    for key, calls in rec.calls.items():
        att = rec.attention.get(key)
        for c, call in enumerate(calls):
            # attention computed in the open: its projections' outputs follow its own outputs
            extra = att.calls[c]["P"] if att is not None and c < len(att.calls) and att.calls[c] else []
            where[(key, c)] = list(range(len(outs), len(outs) + len(call.rec.outputs) + len(extra)))
            outs.extend(call.rec.outputs)
            outs.extend(extra)
    for c, r in enumerate(rec.ops):
        where[(OPS, c)] = [len(outs)]
        outs.append(r.outputs[0])
    return outs, where


def _backward_columns(z, outs, cols) -> list:
    """One backward of the batched graph per exact-Fisher column (the columns are shared by all
    samples). Batching the columns through autograd's vmap (``is_grads_batched``) was slower on
    the CPU for both the MLP and the CNN of the benchmarks, and holds every column at once."""
    return [list(torch.autograd.grad(z, outs, cols[k], retain_graph=k + 1 < cols.shape[0], allow_unused=True))
            for k in range(cols.shape[0])]


def _uses(plan: RulePlan, rec: _Recorder) -> dict[str, list]:
    """``{parameter: [(site key, call index), ...]}``: every recorded use of every covered parameter."""
    uses: dict[str, list] = {}
    for c, r in enumerate(rec.ops):
        for p in r.sources:
            uses.setdefault(p, []).append((OPS, c))
    for key, site in plan.sites.items():
        if key == OPS or site.batch_free:
            continue
        for c in range(len(rec.calls[key])):
            for p in site.params.values():
                uses.setdefault(p, []).append((key, c))
    return uses


def _blocks(plan, rec, values, key, c, grads, i, j) -> dict:
    """Per-sample gradient blocks ``{parameter: [j - i, *shape]}`` of one use, for one column."""
    if key == OPS:
        r = rec.ops[c]
        return op_blocks(r, {p: values[p] for p in r.sources}, grads, i, j)
    site = plan.sites[key]
    call = rec.calls[key][c]
    if site.rule is not None:
        A = call.rec.leaves[0]
        got = site.rule.per_sample(site.module, A[i:j].detach(), grads[0][i:j])
    else:
        n_out = len(call.rec.outputs)
        att = rec.attention.get(key)
        got = att.blocks(c, list(site.params), grads[0], grads[n_out:], i, j) if att is not None else None
        if got is None:
            replay = LOCAL_REPLAYS.get(type(site.module))
            got = replay(site.module, list(site.params), call.rec, grads[:n_out], i, j) if replay else None
        if got is None:
            got = module_blocks(site.module, list(site.params), call.rec, grads[:n_out], i, j)
    return {site.params[a]: t for a, t in got.items() if a in site.params}


class SiteFailed(RuntimeError):
    """One use's per-sample blocks could not be formed (a module that ``torch.func`` cannot
    replay, such as ``nn.LSTM``'s fused kernel): the probe sends its parameters per sample and
    keeps the rules of the others."""

    def __init__(self, key: str, params: list[str], error: Exception):
        first = (str(error).splitlines() or [""])[0][:160]
        super().__init__(f"the per-sample replay of {key} failed ({type(error).__name__}: {first})")
        self.params = params


def _sums(problem, plan, rec, where, grads_per_col, values) -> dict:
    sums: dict[str, torch.Tensor] = {}
    uses = _uses(plan, rec)
    # One use of a rule site: the rule's own sum of squares (often without per-sample blocks).
    for key, site in plan.sites.items():
        if site.rule is None or site.batch_free or len(rec.calls[key]) != 1:
            continue
        fast = {a: p for a, p in site.params.items() if len(uses.get(p, [])) == 1}
        if not fast:
            continue
        A = rec.calls[key][0].rec.leaves[0].detach()
        got = sq_sum_of(site.rule, site.module, A, [col[where[(key, 0)][0]] for col in grads_per_col])
        for a, p in fast.items():
            sums[p] = got[a]
    # One use of attention computed in the open, every parameter used there only: its
    # projections summed like Linear layers.
    for key, att in rec.attention.items():
        site = plan.sites[key]
        if len(rec.calls[key]) != 1 or any(len(uses.get(p, [])) != 1 for p in site.params.values()):
            continue
        idx = where[(key, 0)]
        n_out = len(rec.calls[key][0].rec.outputs)
        got = att.sq_sums(0, list(site.params), [col[idx[0]] for col in grads_per_col],
                          [[col[k] for k in idx[n_out:]] for col in grads_per_col])
        if got is not None:
            for a, p in site.params.items():
                sums[p] = got[a]
    # Everything else: per-sample blocks of every use, added up, squared, summed.
    rest = {p: u for p, u in uses.items() if p not in sums}
    for p in plan.covered - uses.keys():
        sums[p] = torch.zeros_like(problem.selected[p])  # never used in this forward: no gradient
    if not rest:
        return sums
    n = rec.n
    per = sum(problem.selected[p].numel() * problem.selected[p].element_size() for p in rest)
    # Uses whose rule can add into another use's block come last, when that block exists.
    users = sorted({u for us in rest.values() for u in us}, key=lambda u: (_adds_into(plan, u[0]), str(u)))
    for col in grads_per_col:
        # Small chunks: a few samples' blocks stay in cache between being added up and squared.
        for i, j in chunks(n, per, BLOCK_BYTES // 4):
            acc: dict[str, torch.Tensor] = {}
            for key, c in users:
                grads = [col[k] for k in where[(key, c)]]
                try:
                    if _add_into(plan, rec, key, c, grads, i, j, acc, rest):
                        continue
                    blocks = _blocks(plan, rec, values, key, c, grads, i, j)
                except Exception as e:  # noqa: BLE001 - named with its parameters, so that it costs those only
                    names = rec.ops[c].sources if key == OPS else plan.sites[key].params.values()
                    raise SiteFailed(key, sorted(names), e) from e
                for p, b in blocks.items():
                    if p in rest:
                        if p in acc:
                            acc[p].add_(b)
                        elif b._is_view() or any(_overlaps(b, a) for a in acc.values()):
                            # Later uses add into it in place: it must own its memory, neither a
                            # view of a recorded gradient nor a buffer that a vjp also handed to
                            # another parameter (one tensor for two biases), or the add would
                            # land in the other parameter's block too.
                            acc[p] = b.clone()
                        else:
                            acc[p] = b
            for p, b in acc.items():
                total = sums.get(p)
                if total is None:
                    total = sums[p] = torch.zeros(b.shape[1:], dtype=b.dtype, device=b.device)
                if b.shape[0] <= 4:  # large blocks, few samples: no squared copy of the block
                    for one in b.unbind(0):
                        total.addcmul_(one, one)
                else:
                    total.add_(b.square().sum(0))
    return sums


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (the same storage: conservative for disjoint views)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _adds_into(plan: RulePlan, key: str) -> bool:
    site = plan.sites.get(key) if key != OPS else None
    return site is not None and site.rule is not None and site.rule.add_into is not None


def _add_into(plan, rec, key, c, grads, i, j, acc, rest) -> bool:
    """Add one use's per-sample gradients into the blocks already formed for every parameter it
    uses (rules with ``add_into``); False when it cannot, and the caller forms its blocks."""
    if not _adds_into(plan, key):
        return False
    site = plan.sites[key]
    mine = {a: p for a, p in site.params.items() if p in rest}
    if not mine or any(p not in acc for p in mine.values()):
        return False
    A = rec.calls[key][c].rec.leaves[0]
    return bool(site.rule.add_into(site.module, A[i:j].detach(), grads[0][i:j], {a: acc[p] for a, p in mine.items()}))


# -- proving the plan --------------------------------------------------------------------------
def check_forward(problem: Problem, batch: Batch) -> tuple[str | None, torch.Tensor | None]:
    """One batched forward over ``batch`` and one forward per sample: why the rules cannot take
    the problem (None if they can), and the batched logits (None without logits).

    The rules need a batched forward that treats samples independently (each row of every
    per-sample output equals that sample's output alone), logits for the sampled and exact
    kinds, and, for a dict batch with the model's own loss, per-sample losses from the batched
    logits equal to ``model(**sample).loss`` of each sample alone."""
    model, n = problem.model, batch.size
    own_loss = batch.is_dict and problem.kind == "empirical" and problem.loss_fn is None
    head = model_head(model) if own_loss else None
    if own_loss and head is None:
        return (f"{type(model).__name__}'s own loss has no per-sample form here (known heads: causal LM, "
                f"sequence / token classification, masked LM); pass loss_fn to use the rules"), None

    def rows(out, size):
        leaves, _ = tree_flatten(out)
        return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0
                and t.shape[0] == size]

    with torch.no_grad():
        args, kwargs = forward_inputs(model, batch)
        out = model(*args, **kwargs)
        try:
            z = logits_of(out)
        except Exception:  # noqa: BLE001 - the per-sample engines raise the clear error where logits are needed
            z = None
        if z is None and (problem.kind != "empirical" or not batch.is_dict):
            return "the model output has no logits", None
        full = rows(out, n)
        mine = model_loss_per_sample(model, head, z, batch.labels) if own_loss else None
        for i in range(n):
            one = batch.slice(i, i + 1)
            args, kwargs = forward_inputs(model, one)
            if own_loss:
                kwargs["labels"] = one.labels  # the model's own loss of this sample alone
            out1 = model(*args, **kwargs)
            alone = rows(out1, 1)
            for f, o in zip(full, alone):
                rtol = PROBE_RTOL.get(f.dtype, 1e-3)
                if f[i : i + 1].shape != o.shape or not torch.allclose(
                        f[i : i + 1], o, rtol=rtol, atol=rtol * float(o.abs().max().clamp_min(1e-30))):
                    return "the model's batched output differs from its per-sample output (it mixes samples in a batch)", z
            if own_loss:
                ref = getattr(out1, "loss", None)
                if ref is None or not torch.allclose(mine[i].to(ref.dtype), ref.reshape(()), rtol=1e-4, atol=1e-6):
                    return (f"the model's own loss of one sample ({None if ref is None else float(ref):.6g}) differs "
                            f"from its {head} loss per sample ({float(mine[i]):.6g}); pass loss_fn"), z
    return None, z


def _plain_truth(problem: Problem, batch: Batch, labels, names) -> dict[str, torch.Tensor]:
    """``{name: sum over batch's samples of the squared gradient}`` for ``names``, by the plainest
    loop: per sample, one forward of the model on that sample alone, its loss, one
    ``torch.autograd.grad``, each gradient squared out of place into a sum of its own.

    Kept plain on purpose, and apart from :mod:`.per_sample`: this is what the probe proves the
    rules against, so it must not share a defect with the engines the probe chooses between. A
    shared defect (squaring in place a buffer that autograd handed to two parameters) would make
    the probe agree with the wrong engine and reject the right rule. Only the definition of one
    sample's input and loss (:class:`.problem.Problem`'s ``call`` and ``loss``, which every engine
    differentiates) is shared. ``labels``: the probe's labels for kind 'sampled', or None."""
    params = [problem.selected[n] for n in names]
    # float64 sums for float64 parameters, float32 otherwise: the truth rounds no worse than the rules
    dtypes = [torch.float64 if p.dtype == torch.float64 else torch.float32 for p in params]
    total = [torch.zeros(p.shape, dtype=d, device=p.device) for p, d in zip(params, dtypes)]
    for i in range(batch.size):
        if batch.is_dict:
            x = {k: v[i] for k, v in batch.inputs.items()}
        else:
            x = batch.inputs[i]
        if labels is not None:
            target = labels[i]
        else:
            target = None if batch.targets is None else batch.targets[i]
        with torch.enable_grad():
            loss = problem.loss(problem.call({}, x, functional=False), x, target)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
        for k, g in enumerate(gs):
            if g is not None:
                g = g.detach().to(dtypes[k])
                total[k] = total[k] + g * g
    return dict(zip(names, total))


def probe_plan(problem: Problem, plan: RulePlan, batch: Batch) -> None:
    """Prove the plan on the first samples of ``batch`` and shrink it where it fails: sites that
    break the hook assumptions, whose per-sample replay fails (that site only) or whose
    parameters disagree with a plain per-sample loop (:func:`_plain_truth`) go to ``leftover``
    with the reason. Uses the empirical loss (dataset or arg-max labels) so that no random labels
    are drawn and no per-class loop is needed: the rules do not depend on the cotangent."""
    t0 = time.perf_counter()
    try:
        _probe(problem, plan, batch)
    finally:
        plan.probe_seconds += time.perf_counter() - t0


def _probe(problem: Problem, plan: RulePlan, batch: Batch) -> None:
    why, z = check_forward(problem, batch.slice(0, min(4, batch.size)))
    if why is not None:
        plan.drop_all(why)
        return
    part = batch.slice(0, min(PROBE_SAMPLES, batch.size))
    if problem.kind == "empirical":
        check, labels = problem, None
    else:
        labels = z[: part.size].argmax(-1)
        check = Problem(problem.model, "sampled", problem.loss_fn if problem.kind == "sampled" else None,
                        None, problem.selected, problem.frozen)
    for _ in range(6 + len(plan.sites)):  # each failed site leaves the plan smaller
        if not plan.sites:
            return
        try:
            sums, trouble = rules_pass(check, plan, part, labels)
        except SiteFailed as e:  # one use the replay cannot take: the others keep their rules
            covered = plan.covered
            if not any(p in covered for p in e.params):  # nothing left to drop: it would fail again
                plan.drop_all(str(e))
                return
            for pname in e.params:
                plan.drop_param(pname, str(e))
            continue
        except Exception as e:  # noqa: BLE001 - any failure of the hooked pass: go per sample, say why
            plan.drop_all(f"the batched pass with hooks failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
            return
        if not trouble:
            break
        plan.absorb(trouble)
    else:
        plan.drop_all("the hooks did not settle")
        return
    covered = plan.covered
    # A Hugging Face head computes its own loss in float32 (logits.float()), also for a float64
    # model: then both sides agree to float32 rounding only.
    own_loss_fp32 = batch.is_dict and problem.kind == "empirical" and problem.loss_fn is None
    ref = _plain_truth(check, part, labels, [n for n in problem.selected if n in covered])
    # Entries far below the model's largest (a key bias, whose gradient attention's softmax
    # cancels to rounding noise) are compared on an absolute scale of rtol^2 x that largest entry.
    largest = max((float(t.abs().max()) for t in ref.values() if t.numel()), default=0.0)
    for pname in sorted(ref):
        a, b = sums[pname].to(ref[pname].dtype), ref[pname]
        rtol = PROBE_RTOL.get(torch.float32 if own_loss_fp32 else problem.selected[pname].dtype, 1e-3)
        scale = float(b.abs().max()) if b.numel() else 0.0
        if b.numel() and float((a - b).abs().max()) > rtol * scale + rtol * rtol * largest + 1e-30:
            plan.drop_param(pname, f"its rule disagreed with the per-sample loop on a probe (is {pname!r} used "
                                   f"outside its module's forward?)")


# -- proven plans, cached ----------------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _signature(problem: Problem, batch: Batch) -> tuple:
    """What a proven plan depends on: the module tree, the selected parameters (identity, shape,
    dtype), the kind and loss, and the input's structure (keys, dtypes, ranks; not the sizes)."""
    model = problem.model
    modules = tuple((n, id(m), type(m), m.training) for n, m in model.named_modules())
    params = tuple((n, id(p), tuple(p.shape), p.dtype) for n, p in problem.selected.items())
    inputs = batch.inputs.items() if batch.is_dict else [("", batch.inputs)]
    sig_in = tuple((k, v.dtype, v.dim()) for k, v in inputs)
    return modules, params, problem.kind, id(problem.loss_fn), problem.top_k, sig_in, batch.targets is None


def cached_plan(problem: Problem, batch: Batch, probe: bool) -> tuple[RulePlan, bool]:
    """``(plan, from_cache)``: the plan proven for this model and input signature, or a new one
    (probed when ``probe``)."""
    try:
        per_model = _CACHE.setdefault(problem.model, {})
    except TypeError:  # a model that cannot be weakly referenced: no cache
        per_model = {}
    sig = _signature(problem, batch)
    if sig in per_model:
        return per_model[sig].copy(), True
    plan = make_plan(problem.model, problem.selected)
    if probe and plan.sites:
        probe_plan(problem, plan, batch)
    per_model.clear()  # one proven plan per model: the latest structure
    per_model[sig] = plan.copy()
    return plan, False


def clear_plan_cache() -> None:
    """Forget every proven plan (the next ``estimate_fisher`` call probes again)."""
    _CACHE.clear()
