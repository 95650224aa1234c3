"""Proving a rule plan, and remembering the proven ones.

A plan made from the model's structure (:mod:`.plan`) rests on assumptions the structure cannot
show: that the batched forward treats samples independently, that each parameter is used only
where the plan found it, that each site's per-sample replay works. :func:`probe_plan` proves the
plan once on the first samples against a plain per-sample autograd loop of its own
(:func:`_plain_truth`, deliberately not the loop engine) and sends what fails (with the reason)
to the per-sample engines; :func:`cached_plan` remembers a proven plan per model structure and
input signature, so that the next ``estimate_fisher`` call pays no probe.
"""

from __future__ import annotations

import copy
import time
import weakref

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..errors import EWCInputError
from .batches import Batch
from .engine import SiteFailed, forward_inputs, rules_pass
from .plan import RulePlan, make_plan
from .problem import Problem, contiguous_norm_gradients, logits_of, model_head, model_loss_per_sample, one_sample_grads

# Relative tolerance of the probe that checks the plan against the per-sample loop, by dtype:
# both sides are exact up to rounding (float32 sums of ~1e3 products differ by ~1e-6 relative;
# float64 models that normalise in float32, as Llama's RMSNorm does, by ~1e-7),
# while a wrong rule (the 2-D shortcut on a sequence layer, a missed use) is off by far more.
PROBE_RTOL = {torch.float64: 1e-5, torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
# Entries far below the model's largest (a key bias, whose gradient attention's softmax cancels to
# rounding noise) are compared on an absolute scale: this fraction of that largest entry (rtol^2
# where not given). A wrong rule on a parameter whose Fisher lies below it passes unseen, so it is
# set as low as that noise allows: in float32 the key biases' noise stayed more than four decades
# below it on the zoo's models and on the benchmark's BERT with weights of a trained model's size.
# A float64 model may compute parts in float32 (Llama's RMSNorm), so its floor stays rtol^2.
PROBE_FLOOR = {torch.float32: 1e-9}
PROBE_SAMPLES = 2
# Parameters in these dtypes are probed on a float32 copy of the model: in bfloat16 a wrong rule
# and rounding are both ~1e-2 off the loop, so a bf16 probe rejects right rules by chance (a
# different set each run). The float32 probe decides the plan the bf16 model then uses.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _probe_rows(batch: Batch) -> list[int]:
    """The samples the probe proves the plan on: the first ``PROBE_SAMPLES``, except that where a
    dict batch's ``attention_mask`` gives its samples different lengths, the last of them is the
    one among the first four whose length differs most from the first's. Padding takes other
    paths through a model than full rows (masks, positions modified in place), and a plan proven
    on two full rows alone would never have seen them."""
    n = min(PROBE_SAMPLES, batch.size)
    mask = batch.inputs.get("attention_mask") if batch.is_dict else None
    if n < 2 or not isinstance(mask, torch.Tensor) or mask.dim() < 2:
        return list(range(n))
    lengths = (mask[:4] != 0).reshape(min(4, batch.size), -1).sum(1)
    far = int((lengths - lengths[0]).abs().argmax())
    return list(range(n)) if far < n else [*range(n - 1), far]


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
        bad = next((t for t in full if bool(torch.isnan(t).any())), None)
        if bad is not None:
            raise EWCInputError(
                f"estimate_fisher: the model's output on the first {n} samples of the data holds NaN (an output "
                f"of shape {tuple(bad.shape)}), so the Fisher of any loss computed from it would be NaN too. (Seen "
                f"with some float64 Hugging Face models on left-padded batches: their eager attention takes a "
                f"float32 softmax over a float64 mask, and a fully masked row becomes NaN.)")
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


def _plain_truth(problem: Problem, batch: Batch, labels, names) -> tuple[dict[str, torch.Tensor], bool]:
    """``({name: sum over batch's samples of the squared gradient}, whether a loss was float32)``
    for ``names``, by the plainest
    loop: per sample, one forward of the model on that sample alone, its loss, one
    ``torch.autograd.grad``, each gradient squared out of place into a sum of its own.

    Kept plain on purpose, and apart from :mod:`.per_sample`: this is what the probe proves the
    rules against, so it must not share a defect with the engines the probe chooses between. A
    shared defect (squaring in place a buffer that autograd handed to two parameters) would make
    the probe agree with the wrong engine and reject the right rule. Only the definition of one
    sample's input and loss (:class:`.problem.Problem`'s ``call`` and ``loss``, which every engine
    differentiates) is shared, and with the loop engine the call of autograd for one sample
    (:func:`.problem.one_sample_grads`: its error when autograd fails) under the batch norm
    workaround (:func:`.problem.contiguous_norm_gradients`), neither of which touches a value.
    ``labels``: the probe's labels for kind 'sampled', or None."""
    params = [problem.selected[n] for n in names]
    # float64 sums for float64 parameters, float32 otherwise: the truth rounds no worse than the rules
    dtypes = [torch.float64 if p.dtype == torch.float64 else torch.float32 for p in params]
    total = [torch.zeros(p.shape, dtype=d, device=p.device) for p, d in zip(params, dtypes)]
    fp32 = False
    with torch.enable_grad(), contiguous_norm_gradients(problem.model):
        for i in range(batch.size):
            if batch.is_dict:
                x = {k: v[i] for k, v in batch.inputs.items()}
            else:
                x = batch.inputs[i]
            if labels is not None:
                target = labels[i]
            else:
                target = None if batch.targets is None else batch.targets[i]
            loss = problem.loss(problem.call({}, x, functional=False), x, target)
            gs = one_sample_grads(loss, params)
            fp32 = fp32 or loss.dtype == torch.float32
            for k, g in enumerate(gs):
                if g is not None:
                    g = g.detach().to(dtypes[k])
                    total[k] = total[k] + g * g
    return dict(zip(names, total)), fp32


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


def _probe(problem: Problem, plan: RulePlan, batch: Batch, values: bool = True) -> None:
    """``values``: also compare the plan's sums with the plain loop; without, only what the
    hooked pass itself finds (a replay that fails, hooks that do not settle) shrinks the plan:
    the pass of a bf16 model whose plan a float32 copy proved."""
    why, z = check_forward(problem, batch.slice(0, min(4, batch.size)))
    if why is not None and values:
        plan.drop_all(why)
        return
    if z is None and problem.kind != "empirical":
        return
    rows = _probe_rows(batch)
    part = batch.pick(rows)
    if problem.kind == "empirical":
        check, labels = problem, None
    else:
        labels = z[rows].argmax(-1)
        check = Problem(problem.model, "sampled", problem.loss_fn if problem.kind == "sampled" else None,
                        None, problem.selected, problem.frozen)
    for _ in range(6 + len(plan.sites)):  # each failed site leaves the plan smaller
        if not plan.sites:
            return
        try:
            plan.proving = True  # what these passes settle is checked against the loop below
            try:
                sums, trouble = rules_pass(check, plan, part, labels)
            finally:
                plan.proving = False
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
    if not values:
        return
    narrowed = plan.narrowed
    covered = plan.covered
    # A Hugging Face causal LM computes its own loss in float32 (logits.float()), also for a
    # float64 model: then both sides agree to float32 rounding only. Read from the loss itself: a
    # float64 loss is held to float64's tolerance, where a rule off by 1e-4 must not pass.
    ref, loss_fp32 = _plain_truth(check, part, labels, [n for n in problem.selected if n in covered])
    largest = max((float(t.abs().max()) for t in ref.values() if t.numel()), default=0.0)
    for pname in sorted(ref):
        a, b = sums[pname].to(ref[pname].dtype), ref[pname]
        dtype = torch.float32 if loss_fp32 else problem.selected[pname].dtype
        rtol = PROBE_RTOL.get(dtype, 1e-3)
        floor = PROBE_FLOOR.get(dtype, rtol * rtol)
        scale = float(b.abs().max()) if b.numel() else 0.0
        if b.numel() and float((a - b).abs().max()) > rtol * scale + floor * largest + 1e-30:
            plan.drop_param(pname, f"its rule disagreed with the per-sample loop on a probe (is {pname!r} used "
                                   f"outside its module's forward?)")
    if plan.narrowed != narrowed:
        # op-local parameters that disagreed went module-local: prove that in turn
        _probe(problem, plan, batch, values)


# -- low precision: the probe decides in float32 ---------------------------------------------------
def _low_precision(problem: Problem) -> bool:
    return any(p.dtype in LOW_PRECISION for p in problem.selected.values())


def _float32_copy(problem: Problem, batch: Batch) -> tuple[Problem, Batch] | None:
    """The problem on a float32 copy of the model (the same names, ties and training flags) and
    the batch with its low-precision floating tensors in float32; None when the model cannot be
    copied (then the probe runs on the model itself)."""
    model = problem.model
    try:
        twin = copy.deepcopy(model).float()
    except Exception:  # noqa: BLE001 - a model deepcopy cannot take: probe in its own dtype
        return None
    named = {**dict(twin.named_parameters(remove_duplicate=False)), **dict(twin.named_buffers(remove_duplicate=False))}
    if any(n not in named for n in (*problem.selected, *problem.frozen)):
        return None
    selected = {n: named[n] for n in problem.selected}
    frozen = {n: named[n].detach() if isinstance(named[n], nn.Parameter) else named[n] for n in problem.frozen}

    def up(t):
        return t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t

    inputs = {k: up(v) for k, v in batch.inputs.items()} if batch.is_dict else up(batch.inputs)
    batch32 = Batch(inputs, up(batch.targets), batch.size, batch.index)
    return Problem(twin, problem.kind, problem.loss_fn, problem.top_k, selected, frozen), batch32


def _probe_in_float32(problem: Problem, batch: Batch, problem32: Problem, batch32: Batch) -> RulePlan:
    """Prove the plan on the float32 copy (a deterministic verdict: a wrong rule is far off the
    loop, rounding is not), carry it over to the model by module name, then run the hooked pass
    once on the model itself, so that what fails in its own dtype (a replay, the hooks) still
    leaves the plan; values are not compared there."""
    t0 = time.perf_counter()
    plan32 = make_plan(problem32.model, problem32.selected)
    try:
        _probe(problem32, plan32, batch32)
    finally:
        del problem32, batch32
    plan = plan32.copy(problem.model)
    plan.probe_seconds = 0.0  # this function's whole time is added below
    try:
        if plan.sites:
            _probe(problem, plan, batch, values=False)
    finally:
        plan.probe_seconds += time.perf_counter() - t0
    return plan


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


def cached_labels(problem: Problem, batch: Batch):
    """What the output check found on the call that proved the plan for this model and input
    signature (:attr:`RulePlan.labels`), or None (no such plan, or nothing kept)."""
    try:
        hit = _CACHE.get(problem.model, {}).get(_signature(problem, batch))
    except TypeError:  # a model that cannot be weakly referenced: no cache
        return None
    return None if hit is None else hit.labels


def cached_plan(problem: Problem, batch: Batch, probe: bool, labels=None, keep: bool = True) -> tuple[RulePlan, bool]:
    """``(plan, from_cache)``: the plan proven for this model and input signature, or a new one
    (probed when ``probe``; cached for later calls when ``keep``). ``labels``: what the output
    check found, kept with the plan for :func:`cached_labels`."""
    try:
        per_model = _CACHE.setdefault(problem.model, {})
    except TypeError:  # a model that cannot be weakly referenced: no cache
        per_model = {}
    sig = _signature(problem, batch)
    if sig in per_model:
        if labels is not None:
            per_model[sig].labels = labels
        return per_model[sig].copy(problem.model), True
    plan = make_plan(problem.model, problem.selected)
    if probe and plan.sites:
        copied = _float32_copy(problem, batch) if _low_precision(problem) else None
        if copied is None:
            probe_plan(problem, plan, batch)
        else:
            plan = _probe_in_float32(problem, batch, *copied)
    plan.labels = labels
    if keep:
        per_model.clear()  # one proven plan per model: the latest structure
        per_model[sig] = plan.detached()
    return plan, False


def clear_plan_cache() -> None:
    """Forget every proven plan (the next ``estimate_fisher`` call probes again)."""
    _CACHE.clear()
