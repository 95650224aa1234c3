"""The rule engine's batched pass: one batched forward and backward with hooks gives every
covered parameter's sum of squared per-sample gradients.

:func:`rules_pass` runs the batched forward with the parameters detached (so autograd computes
only activation gradients), recording each site's inputs and outputs (:mod:`.recording`), forms
the per-sample losses (:mod:`.problem`), sums them and takes one backward to the recorded
outputs. Because samples do not mix in the forward pass, each sample's slice of an output
gradient is that sample's own gradient; the rules turn it into per-sample parameter gradients
(:func:`_sums`). Where a parameter has one use, its rule's fast sum of squares serves; where it
has several (tied weights, a module called twice), the per-sample gradients of every use are
added before squaring.

Which sites there are comes from :mod:`.plan`; the plan is proven (and cached) by :mod:`.probe`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from .batches import Batch
from .functional import swapped
from .plan import OPS, PARAM, RulePlan
from .problem import (Problem, SampledLabels, contiguous_norm_gradients, exact_columns, logits_of, plain_attention,
                      position_mask)
from .recording import _Recorder
from .rules import add_sq_sums, chunks, sq_sum_of
from .rules.embedding import lookup_rows
from .rules.local import from_the_batch, op_blocks
from .rules.replay import local_blocks, local_sq_sums
from .rules.tied_head import head_and_rows_sq_sum, tied_uses
from .sums import squares_of_uses


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


def _from_the_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The batch's floating inputs as copies that require grad. The parameters are detached in
    the rules pass, so what requires grad is then exactly what descends from the batch: how a
    module or operation fed the samples on another axis than the first (``x.transpose(0, 1)``)
    is told from a position table, also where it is the model's first. Copies, because a model
    may modify its input in place. Masks are left as they are: attention would form a gradient
    for a mask that requires one."""
    def mark(key, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad and "mask" not in str(key):
            return x.detach().requires_grad_().clone()
        return x
    return tuple(mark(k, a) for k, a in enumerate(args)), {k: mark(k, v) for k, v in kwargs.items()}


def rules_pass(problem: Problem, plan: RulePlan, batch: Batch, labels, into: dict | None = None) -> tuple[dict, dict]:
    """One batched forward + backward over ``batch`` with hooks.

    ``labels``: for kind 'sampled', the drawn labels or a :class:`SampledLabels` that draws them
    from this pass's own logits; else None. ``into``: running sums (name -> tensor) that rules
    adding into running sums (``Rule.sums_into``) add this batch's squares to in place; such a
    parameter's entry of ``sums`` is then that running sum itself, already added to.

    Returns ``(sums, trouble)``: ``sums`` maps each covered parameter to the sum over the batch of
    its squared per-sample gradients (exact kind: of the per-sample Fisher); ``trouble`` maps
    site keys that broke the plan's assumptions to ``(action, reason)``, an action of
    :meth:`RulePlan.absorb` (``"clone"``, ``"local"``, ``"parent"``, ``"unused"``, ``"batch_free"``, ``"split=..."``,
    or ``"drop"``). With any trouble, ``sums`` is empty.
    """
    n = batch.size
    values = {k: v.detach() for k, v in {**problem.frozen, **problem.selected}.items()}
    rec = _Recorder(plan, n, values)
    try:
        # forward and backward under one swap: a checkpointed block recomputes in the backward
        # (a batch of one sample meets PyTorch's batch norm backward defect: contiguous_norm_gradients)
        one = contiguous_norm_gradients(problem.model) if n == 1 else nullcontext()
        with torch.enable_grad(), swapped(problem.model, rec.values), one:
            args, kwargs = _from_the_batch(*forward_inputs(problem.model, batch))
            with rec.recording():
                output = problem.model(*args, **kwargs)
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
        return _sums(problem, plan, rec, where, grads_per_col, values, into), {}


def _check_calls(plan: RulePlan, rec: _Recorder) -> dict:
    trouble = {}
    for key, calls in rec.calls.items():
        site = plan.sites[key]
        if site.batch_free:
            continue
        others = {c.other_axis for c in calls}
        if plan.proving and calls and len(others) == 1 and None not in others:
            # Fed [T, N, d]: the samples on an inner axis. Taken only while the probe proves the
            # plan against the per-sample loop, never in a pass that nothing checks.
            a = others.pop()
            trouble[key] = (f"axis={a}", f"{site.module_name} takes its samples on axis {a}")
            continue
        if any(not c.rec.outputs and from_the_batch(c.rec.leaves) for c in calls):
            # No output with the samples first, yet an input descends from the batch: the samples
            # are on another axis ([T, N, d] throughout XLNet), not absent. Taken for a position
            # table, its output would be rebuilt from the whole batch for every sample.
            trouble[key] = ("drop", f"{site.module_name} takes the samples on another axis than the first")
            continue
        unproven = next((c.unproven for c in calls if c.unproven), None)
        if unproven is not None:
            trouble[key] = ("drop", unproven)   # per sample: nothing proved this call's layout
            continue
        if calls and all(not c.rec.outputs for c in calls):
            # Its output has no batch axis and its inputs do not come from the batch (a position
            # table): the same for every sample, so it is followed into the operations that meet
            # the batch; proved on the probe. A module that shows no batch axis only in a later pass
            # goes per sample: nothing compared that with the loop.
            if plan.proving:
                trouble[key] = ("batch_free", f"{site.module_name} returns no batch axis: followed into "
                                              f"the operations that use its output")
            else:
                trouble[key] = ("drop", f"{site.module_name} returned no batch axis in a pass after the probe")
            continue
        if not calls:
            if all(any(p in other.params.values() and (k2 == OPS or rec.calls.get(k2))
                       for k2, other in plan.sites.items() if k2 != key) for p in site.params.values()):
                # A tied parameter's holder that is never called (an encoder-decoder's `shared`
                # embedding, its weight used through each stack's own embedding): no use here.
                trouble[key] = ("unused", f"{site.module_name} is never called; its parameters' other uses cover them")
            else:
                trouble[key] = ("parent", f"{site.module_name or '<root>'} is never called: its parent's forward "
                                         f"uses the parameters directly")
            continue
        if any(not c.rec.outputs for c in calls):
            if plan.proving and site.rule is not None and not site.free_calls:
                # The calls without one (a projection of a position table) are followed into the
                # operations that meet the batch, beside the rule's own calls; which calls they are
                # is taken from the probe, whose batch size no table's rows can be taken for.
                free = ",".join(str(c) for c, call in enumerate(calls) if not call.rec.outputs)
                trouble[key] = (f"split={free}", f"{site.module_name} returns no batch axis in some calls: those are "
                                                 f"followed into the operations that use their output")
            else:
                trouble[key] = ("drop", f"{site.module_name} returns a batch axis in some calls and none in others")
            continue
        if site.rule is not None and not all(c.ok_for_rule for c in calls):
            trouble[key] = ("local", f"{type(site.module).__name__} is called with keyword, several or non-tensor "
                                     f"arguments, or without the samples on the axis its rule reads")
            continue
        if site.rule is not None and site.rule.fits is not None:
            why = next(filter(None, (site.rule.fits(site.module, c.rec.samples(c.rec.leaves[0].detach(), 0, 1))
                                     for c in calls)), None)
            if why is not None:
                trouble[key] = ("local", why)
                continue
        for c in calls:
            if any(c.rec.leaves[k]._version != v for k, v in zip(c.rec.batched, c.versions_in)):
                trouble[key] = ("drop", "its module's input is modified in place after the call")
                break
            if any(t._version != v for t, v in zip(c.rec.outputs, c.versions_out)):
                trouble[key] = ("clone", "its output is modified in place")
                break
    if rec.mode is not None:
        # what the op recorder could not follow costs those parameters only
        bad = dict(rec.mode.op_trouble)
        modified = "the result of an operation using it is modified in place later"
        for r in rec.ops:
            if any(r.leaves[k]._version != v for k, v in zip(r.batched, r.versions_in)):
                for p in r.sources:
                    bad.setdefault(p, "an input of an operation using it is modified in place afterwards")
            if any(t._version != v for t, v in zip(r.outputs, r.versions_out)):
                # Modified in place through a view (Funnel's `positional_attn *= cls_mask`), a result
                # is no longer the tensor the loss depends on, and its gradient would read as zero:
                # the model continues with copies; where it already did, these go per sample.
                if OPS not in plan.clone:
                    trouble[OPS] = ("clone", modified)
                else:
                    for p in r.sources:
                        bad.setdefault(p, modified)
        for p, why in bad.items():
            trouble[PARAM + p] = ("drop", why)
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
        got = _rule_blocks(site, call.rec, grads[0], i, j)
    else:
        n_out = len(call.rec.outputs)
        att = rec.attention.get(key)
        got = att.blocks(c, list(site.params), grads[0], grads[n_out:], i, j) if att is not None else None
        if got is None:
            got = local_blocks(site.module, list(site.params), call.rec, grads[:n_out], i, j)
    return {site.params[a]: t for a, t in got.items() if a in site.params}


class SiteFailed(RuntimeError):
    """One use's per-sample blocks could not be formed (a module that ``torch.func`` cannot
    replay, such as a module that reads a tensor's value in Python): the probe sends its parameters per sample and
    keeps the rules of the others."""

    def __init__(self, key: str, params: list[str], error: Exception):
        first = (str(error).splitlines() or [""])[0][:160]
        super().__init__(f"the per-sample replay of {key} failed ({type(error).__name__}: {first})")
        self.params = params


def _sums(problem, plan, rec, where, grads_per_col, values, into=None) -> dict:
    sums: dict[str, torch.Tensor] = {}
    n = rec.n
    uses = _uses(plan, rec)
    # One use of a rule site: the rule's own sum of squares (often without per-sample blocks).
    for key, site in plan.sites.items():
        if site.rule is None or site.batch_free or len(rec.calls[key]) != 1:
            continue
        fast = {a: p for a, p in site.params.items() if len(uses.get(p, [])) == 1}
        r = rec.calls[key][0].rec
        if not fast or (r.fold > 1 and not site.rule.sequence):
            continue
        A = r.samples(r.leaves[0].detach(), 0, n)
        Gs = [r.samples(col[where[(key, 0)][0]], 0, n) for col in grads_per_col]
        with _failing_site(plan, rec, (key, 0)):  # a rule that raises costs its own parameters only
            if into is not None and site.rule.sums_into:
                # straight into the running sums: no batch-sized sum formed and added again
                totals = {a: into[p] for a, p in fast.items()}
                add_sq_sums(site.rule, site.module, A, Gs, totals)
                sums.update({p: totals[a] for a, p in fast.items()})
                continue
            got = sq_sum_of(site.rule, site.module, A, Gs)
        for a, p in fast.items():
            sums[p] = got[a]
    # A rule site called several times (ALBERT's layers sharing one block, a layer applied
    # twice), its rule position-wise and every parameter used there only: a sample's gradient is
    # the sum over every call's positions, so the calls are summed as one call over their
    # positions joined, without per-sample blocks of each call added up.
    for key, site in plan.sites.items():
        if key == OPS or site.rule is None or not site.rule.sequence or site.batch_free:
            continue
        calls = rec.calls[key]
        if len(calls) < 2 or any(p in sums or len(uses.get(p, [])) != len(calls) for p in site.params.values()):
            continue
        with _failing_site(plan, rec, (key, 0)):
            got = _joined_sq_sums(site, calls, [where[(key, c)][0] for c in range(len(calls))], grads_per_col, n,
                                  {a: into[p] for a, p in site.params.items()} if into is not None else None,
                                  {a: problem.selected[p] for a, p in site.params.items()})
        if got is not None:
            sums.update({p: got[a] for a, p in site.params.items()})
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
    # One call of a module-local site whose layer family sums without blocks (a replayed
    # attention), every parameter used there only.
    for key, site in plan.sites.items():
        if (key == OPS or site.rule is not None or site.batch_free or len(rec.calls[key]) != 1
                or any(p in sums or len(uses.get(p, [])) != 1 for p in site.params.values())):
            continue
        r = rec.calls[key][0].rec
        outs = where[(key, 0)][:len(r.outputs)]
        total = None
        with _failing_site(plan, rec, (key, 0)):
            for col in grads_per_col:  # the exact Fisher's columns add up
                got = local_sq_sums(site.module, list(site.params), r, [col[k] for k in outs])
                if got is None:  # this layer family has no such route: blocks below
                    total = None
                    break
                total = got if total is None else {a: total[a].add_(t) for a, t in got.items()}
        if total is not None:
            for a, p in site.params.items():
                sums[p] = total[a]
    # A weight shared by a Linear head and lookups of its rows (an LM head tied to its token
    # embeddings): summed without dense per-sample blocks.
    for p, us in uses.items():
        if p not in sums:
            got = _tied_head_sum(plan, rec, p, us, where, grads_per_col)
            if got is not None:
                sums[p] = got
    # Everything else: per-sample blocks of every use, added up, squared, summed.
    rest = {p: u for p, u in uses.items() if p not in sums}
    for p in plan.covered - uses.keys():
        sums[p] = torch.zeros_like(problem.selected[p])  # never used in this forward: no gradient
    if not rest:
        return sums
    per = sum(problem.selected[p].numel() * problem.selected[p].element_size() for p in rest)
    # Uses whose rule can add into another use's block come last, when that block exists.
    users = sorted({u for us in rest.values() for u in us}, key=lambda u: (_adds_into(plan, u[0]), str(u)))
    for col in grads_per_col:
        def grads_of(use, col=col):
            return [col[k] for k in where[use]]

        def add_into(use, i, j, acc, grads_of=grads_of):
            with _failing_site(plan, rec, use):
                return _add_into(plan, rec, *use, grads_of(use), i, j, acc, rest)

        def blocks(use, i, j, grads_of=grads_of):
            with _failing_site(plan, rec, use):
                got = _blocks(plan, rec, values, *use, grads_of(use), i, j)
            return {p: b for p, b in got.items() if p in rest}

        squares_of_uses(users, n, per, add_into, blocks, sums)
    return sums


def _joined_sq_sums(site, calls, outs: list, grads_per_col, n: int, into: dict | None,
                    params: dict) -> dict | None:
    """``{attr: sum}`` over the calls of a position-wise rule site taken as one call whose
    positions are every call's (each call's input ``[n, *positions, d]``, its output gradient
    ``[n, *positions, d_out]``), added into ``into`` (the running sums) where given; None where
    a call's input is not a floating tensor with a last axis shared by every call (an embedding's
    indices). The joined copy goes in chunks of samples of at most the rules' block budget."""
    As = [c.rec.samples(c.rec.leaves[0].detach(), 0, n) for c in calls]
    if any(not A.is_floating_point() or A.dim() < 2 or A.shape[-1] != As[0].shape[-1] for A in As):
        return None
    Gss = [[c.rec.samples(col[k], 0, n) for c, k in zip(calls, outs)] for col in grads_per_col]

    def rows(x):  # [n, positions, d]
        return x.reshape(x.shape[0], -1, x.shape[-1])

    per = sum(A[:1].numel() + sum(Gs[c][:1].numel() for Gs in Gss) for c, A in enumerate(As)) * As[0].element_size()
    totals = into if into is not None else {a: torch.zeros_like(t, dtype=As[0].dtype) for a, t in params.items()}
    for i, j in chunks(n, per):
        A = torch.cat([rows(A[i:j]) for A in As], 1)
        Gs = [torch.cat([rows(G[i:j]) for G in Gs], 1) for Gs in Gss]
        add_sq_sums(site.rule, site.module, A, Gs, totals)
    return totals


def _tied_head_sum(plan, rec, p: str, uses: list, where, grads_per_col) -> torch.Tensor | None:
    """The sum for parameter ``p`` when its uses are one Linear head and lookups of its rows by
    embedding rules (``tied_head``); None when they are anything else."""
    def site_of(use):
        site = plan.sites.get(use[0]) if use[0] != OPS else None
        ok = site is not None and not site.batch_free and rec.calls[use[0]][use[1]].rec.fold == 1
        return site if ok else None

    found = tied_uses(p, uses, site_of)
    if found is None:
        return None
    head, lookups = found
    n = rec.n

    def inputs(use):
        """A use's input and its output gradient in every column of the exact Fisher."""
        r = rec.calls[use[0]][use[1]].rec
        return r.samples(r.leaves[0].detach(), 0, n), [r.samples(col[where[use][0]], 0, n) for col in grads_per_col]

    with _failing_site(plan, rec, head):
        # One lookup (one replay of an embedding's own forward) serves every column.
        rows = [lookup_rows(plan.sites[use[0]].module, *inputs(use)) for use in lookups]
        return head_and_rows_sq_sum(*inputs(head), rows)


@contextmanager
def _failing_site(plan, rec, use):
    """A use whose blocks fail raises :class:`SiteFailed` naming its parameters, so that it costs those only."""
    key, c = use
    try:
        yield
    except Exception as e:  # noqa: BLE001 - named with its parameters
        names = rec.ops[c].sources if key == OPS else plan.sites[key].params.values()
        raise SiteFailed(key, sorted(names), e) from e


def _rule_blocks(site, r, G, i: int, j: int) -> dict:
    """A rule site's per-sample blocks of samples ``i..j``; a batch folded into rows goes to the
    rule as ``[n, k, ...]`` when it takes sequence axes, else row by row, each sample's rows added."""
    A = r.leaves[0].detach()
    if r.fold == 1 or site.rule.sequence:
        return site.rule.per_sample(site.module, r.samples(A, i, j), r.samples(G, i, j))
    k = r.fold
    rows = site.rule.per_sample(site.module, A[i * k:j * k], G[i * k:j * k])
    return {a: b.unflatten(0, (j - i, k)).sum(1) for a, b in rows.items()}


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
    r = rec.calls[key][c].rec
    if r.fold > 1 and not site.rule.sequence:
        return False
    A = r.samples(r.leaves[0].detach(), i, j)
    return bool(site.rule.add_into(site.module, A, r.samples(grads[0], i, j), {a: acc[p] for a, p in mine.items()}))
