"""Fisher diagonal from true per-sample gradients: :func:`estimate_fisher`.

The estimate is ``F_i = (1/N) sum_n (d loss_n / d theta_i)^2``: the mean over samples of the
squared gradient of each sample's own loss. This is not the square of a mini-batch gradient
(``method="batched"`` computes that, biased, only when asked for by name).

:func:`estimate_fisher` strings the pieces together: it checks its arguments (:mod:`.arguments`),
reads the data batch by batch, runs the rules' batched pass (:mod:`.engine`, on a plan proven by
:mod:`.probe`) on what they cover and the per-sample engines (:mod:`.per_sample`: vmap in
memory-sized chunks, or the loop) on the rest, all-reduces the sums under ``torch.distributed``
and says what went where (:mod:`.report`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .._utils import available_memory, eval_mode, is_sharded, precision, require, unwrap_model
from ..errors import EWCInputError
from . import per_sample as ps
from .arguments import _check_arguments, _output_check, select_parameters
from .batches import iter_batches, read_batch
from .engine import rules_pass
from .probe import PROBE_SAMPLES, cached_labels, cached_plan
from .problem import Problem, SampledLabels, logits_of, per_sample_ce, sample_labels, with_decoder_inputs
from .report import FisherReport
from .sums import all_finite, all_reduce_sums

_log = logging.getLogger("fastewc.fisher")
# Default share of free memory the per-sample gradients of one chunk may take. Conservative:
# the model's activations under vmap (chunk x activation size) come on top and are not known.
MEMORY_FRACTION = 0.25
# Speed, not memory, decides the default vmap chunk: about CHUNK_BYTES of per-sample gradients,
# at most MAX_CHUNK samples. Big per-sample gradients want small chunks (they stream through
# memory twice: written by vmap, then squared and summed); small ones want the batch-level
# parallelism of big chunks (chunk-size timings: benchmarks/results/).
CHUNK_BYTES = 128 * 2**20
MAX_CHUNK = 64
# One parameter's per-sample gradients for a chunk are one allocation. glibc serves blocks above
# its mmap threshold (at most 32 MB) with fresh pages, and faulting them in costs more than the
# arithmetic on a CPU: so a chunk keeps its largest parameter's block under this size.
LARGEST_BLOCK_BYTES = 32 * 2**20


def _chunk_size(selected, kind: str, top_k, batch, chunk_size, max_memory) -> int:
    if chunk_size is not None:
        return chunk_size
    dev = next(iter(selected.values())).device
    budget = max_memory if max_memory is not None else MEMORY_FRACTION * available_memory(dev)
    per_sample = sum(p.numel() * p.element_size() for p in selected.values())
    if kind == "exact":  # per-class gradients of one sample live together
        inputs = batch.inputs
        any_t = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
        positions = any_t.shape[1] if isinstance(inputs, dict) and any_t.dim() > 1 else 1
        per_sample *= positions * (top_k or 16) + 1
    largest = max(p.numel() * p.element_size() for p in selected.values())
    return int(max(1, min(MAX_CHUNK, CHUNK_BYTES // max(1, per_sample), LARGEST_BLOCK_BYTES // max(1, largest),
                          budget // max(1, 2 * per_sample))))



def estimate_fisher(model: nn.Module, data: Iterable, *, loss_fn: Callable | None = None, kind: str = "empirical",
                    num_samples: int | None = None, method: str = "auto", chunk_size: int | None = None,
                    max_memory: int | None = None, params=None, progress: bool = False,
                    generator: torch.Generator | None = None, top_k: int | None = None, return_info: bool = False):
    """Diagonal Fisher information: the mean over samples of squared per-sample gradients.

    Args:
        model: any ``nn.Module``. It is put in eval mode while estimating (dropout off, BatchNorm
            on running statistics); every module's training flag is restored afterwards. A
            wrapped model (``torch.compile``, DDP, DataParallel) is estimated as the module inside,
            and the result named as that module names its parameters (as ``consolidate`` does).
        data: an iterable of batches (a DataLoader): ``(inputs, targets)``, ``(inputs,)`` or a
            Hugging Face style dict (``model(**batch)``). Samples are on dim 0. The result does not
            depend on how the data is batched.
        loss_fn: ``loss_fn(output, target) -> scalar`` for ONE sample (``output`` and ``target``
            keep a batch axis of size 1). Default: cross-entropy on logits (for ``[1, T, C]``
            outputs the mean over positions whose target is not -100), or the model's own loss
            (``output.loss``) for dict batches. The labels a default cross-entropy uses are checked
            batch by batch: integer class indices below the number of logits, or -100.
        kind: ``"empirical"`` (dataset labels), ``"sampled"`` (labels drawn from the model's
            predictive distribution, per position for sequences; reproducible with
            ``generator``) or ``"exact"`` (``sum_y p(y|x) g_y^2`` over all classes, or the
            ``top_k`` most probable per position: a lower bound that tends to the exact value).
            ``sampled`` and ``exact`` use softmax cross-entropy on the logits; for dict batches
            with ``[N, T, C]`` logits every position counts except where ``attention_mask`` is 0.
        num_samples: use exactly this many samples (the first ones); default all. When the data
            holds fewer, all of it is used, with one warning.
        method: ``"auto"`` / ``"rules"``: one batched forward and backward; per-layer rules
            (Linear, Conv, Embedding, the normalisation layers, HF ``Conv1D``, RMSNorm-style
            scales, your own via :func:`fastewc.register_rule`), the module-local rule for any
            other module, the op-local rule for parameters used outside any module, tied
            parameters summed per sample over their uses. The plan is proven once per model and
            input signature against the per-sample loop on the first samples; what fails it goes
            through vmap (``"auto"`` falls back to the loop, with one warning naming the reason,
            when ``torch.func`` cannot transform the model). ``"vmap"``: ``torch.func``
            per-sample gradients of the whole model in chunks. ``"loop"``: one backward per
            sample. ``"batched"``: the square of mini-batch gradients (biased, not the Fisher;
            by name only).
        chunk_size: samples per vmap call (default: from ``max_memory``, at most 64) and, when
            given, samples per batched pass of the rules.
        max_memory: bytes (a number) one vmap chunk's per-sample gradients may take (default a
            quarter of free host / device memory).
        params: names / globs / predicate selecting the parameters (default: all with
            ``requires_grad``; a LoRA model gets its adapters only).
        progress: show a tqdm progress bar (``pip install tqdm``), with a total when the data
            has a length.
        generator: random generator for ``kind="sampled"``, on the parameters' device type.
        top_k: classes per position for ``kind="exact"`` (large vocabularies).
        return_info: also return a :class:`FisherReport` (which rule covered which parameter,
            which went per sample and why, the probe's cost).

    The passes run in the parameters' own precision: an autocast region around the call is
    switched off for them (cast the model to bfloat16 for half-precision passes).

    Returns:
        ``{name: tensor}`` shaped like the parameters, float32 (float64 for float64
        parameters), on the parameters' device. With ``torch.distributed`` initialised, sums and
        sample counts are all-reduced: every rank returns the Fisher over all ranks' data.
    """
    if not isinstance(model, nn.Module):
        raise EWCInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    # The Fisher of a wrapped model (DDP, DataParallel, torch.compile) is its module's, named as the
    # module names its parameters: what consolidate and the regularizer use.
    model = unwrap_model(model)
    num_samples, chunk_size, max_memory, top_k = _check_arguments(
        loss_fn, kind, num_samples, method, chunk_size, max_memory, progress, generator, top_k, return_info)
    selected = select_parameters(model, params)
    sharded = [n for n, p in selected.items() if is_sharded(p)]
    if sharded:
        raise EWCInputError(
            f"estimate_fisher does not run on sharded (FSDP2 / DTensor) parameters, e.g. {sharded[0]!r}: estimate on "
            f"the unsharded model (with DDP every rank estimates on its shard of the data), then register the full "
            f"dicts on the sharded model with register_task(fisher, optimum, model=model)")
    device = next(iter(selected.values())).device
    if generator is not None and kind == "sampled" and generator.device.type != device.type:
        raise EWCInputError(f"generator is a {generator.device.type} generator but the parameters are on "
                            f"{device}: labels are drawn where the logits are, so the generator must be "
                            f"torch.Generator(device={device.type!r})")
    if method == "batched":
        return _batched(model, data, selected, loss_fn, kind, num_samples)

    frozen = {**{n: p.detach() for n, p in model.named_parameters() if n not in selected},
              **dict(model.named_buffers())}
    problem = Problem(model, kind, loss_fn, top_k, selected, frozen)
    acc_dtype = {p.dtype for p in selected.values()}
    acc_dtype = torch.float64 if torch.float64 in acc_dtype else torch.float32
    sums = {n: torch.zeros(p.shape, dtype=acc_dtype, device=device) for n, p in selected.items()}
    bar = None
    if progress:
        bar = require("tqdm", extra="demo").tqdm(total=_total_samples(data, num_samples), unit="sample", desc="Fisher")
    report = FisherReport(method)
    use = "loop" if method == "loop" else "vmap"   # engine for what the rules do not cover
    plan = None                                    # rules plan, made (or found proven) on the first batch
    one_sample_proof = False                       # that plan was proven on a batch of one sample
    left = problem                                 # the problem restricted to uncovered parameters
    seen = 0
    labels_spec = None                             # what the dataset labels index, from the first batch
    try:
        # In the parameters' own precision: an autocast region around the call is left off for
        # its passes (the rules read each layer's input and output gradient in one dtype, and the
        # probe holds them to the loop at the parameters' tolerance).
        with eval_mode(model), precision({}):
            for batch in iter_batches(data, num_samples):
                batch = with_decoder_inputs(model, batch)  # one decoder input for every engine
                if kind == "empirical" and batch.labels is None and not (batch.is_dict and loss_fn is not None):
                    raise EWCInputError("kind='empirical' needs labels: batches must be (inputs, targets), or dicts "
                                        "with 'labels'; use kind='sampled' or 'exact' for unlabelled data")
                if labels_spec is None:
                    # a plan proven for this model and input signature kept what the check found
                    labels_spec = cached_labels(problem, batch) if method in ("auto", "rules") else None
                    if labels_spec is None:
                        labels_spec = _output_check(model, batch.take(1).to(device), kind, loss_fn)
                batch = labels_spec.check(batch, seen).to(device)
                if method in ("auto", "rules") and (plan is None or (one_sample_proof and batch.size >= PROBE_SAMPLES)):
                    # A plan proven on one sample (no size there tells the batch axis from any
                    # other) serves batches of one only: the first larger batch proves it again,
                    # and it is never cached for a later call.
                    one_sample = batch.size < PROBE_SAMPLES
                    plan, report.plan_cached = cached_plan(problem, batch, probe=True, labels=labels_spec,
                                                           keep=not one_sample)
                    one_sample_proof = one_sample and not report.plan_cached
                    left = problem.restrict(plan.leftover)
                # Part by part (chunk_size, else the whole batch): a site the rules drop on one
                # part goes per sample from that part on, and no part is counted twice.
                step = chunk_size or batch.size
                for i in range(0, batch.size, step):
                    part = batch.slice(i, min(i + step, batch.size))
                    labels = None
                    if plan is not None and plan.sites:
                        # kind 'sampled': the labels are drawn from the rules pass's own logits
                        labels = _rules_part(problem, plan, part, generator, seen + i, sums)
                        if set(plan.leftover) != set(left.selected):  # a site left the plan (it only shrinks)
                            left = problem.restrict(plan.leftover)
                    if kind == "sampled" and labels is None:
                        labels = sample_labels(problem, part, generator)
                    if left.selected:
                        use = _per_sample_batch(left, part, labels, seen + i, sums, use, method, chunk_size, max_memory)
                if bar is not None:
                    bar.update(batch.size)
                seen += batch.size
    finally:
        if bar is not None:
            bar.close()
    if num_samples is not None and seen < num_samples:
        warnings.warn(f"estimate_fisher: num_samples={num_samples} but the data holds {seen} samples; "
                      f"the Fisher is the mean over those {seen}", UserWarning, stacklevel=2)
    sums, count = all_reduce_sums(sums, seen)
    report.finish(plan, left, use, seen)
    _log.info("estimate_fisher: %s", report.summary())
    fisher = {n: (s / count).to(acc_dtype) for n, s in sums.items()}
    return (fisher, report) if return_info else fisher


def _total_samples(data, num_samples: int | None) -> int | None:
    """How many samples the progress bar will count, when the data says (a DataLoader's dataset,
    or a list of batches); None when only iterating would tell."""
    total = None
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        total = len(dataset)
    elif isinstance(data, (list, tuple)):
        try:
            total = sum(read_batch(b, i).size for i, b in enumerate(data))
        except EWCInputError:
            total = None
    if num_samples is not None:
        total = num_samples if total is None else min(total, num_samples)
    return total


def _rules_part(problem, plan, part, generator, start, sums) -> torch.Tensor | None:
    """Add the rules' squared-gradient sums of ``part`` (samples ``start...`` of the data) to
    ``sums``. Returns the labels drawn for kind 'sampled' (from the pass's own logits), else None."""
    lab = SampledLabels(generator) if problem.kind == "sampled" else None
    for _ in range(6):
        got, trouble = rules_pass(problem, plan, part, lab, into=sums)
        if not trouble:
            break
        # Data-dependent structure (a module skipped or called differently on this part): what the
        # rules summed on earlier parts stays valid; from here the site adapts or goes per sample.
        plan.absorb(trouble)
        if not plan.sites:
            return None if lab is None else lab.labels
    else:
        raise RuntimeError("estimate_fisher: the rule engine's hooks did not settle; use method='vmap'")
    labels = None if lab is None else lab.labels
    # a sum that is the running sum itself was added to in place (finite before this part)
    if not all_finite(got.values()):  # locate the sample and parameter, then raise
        bad = {n: torch.zeros_like(sums[n]) for n in got}
        ps.loop_squared_sums(problem.restrict(got), part, labels, start, bad, check_each=True)
        raise EWCInputError("the squared gradients overflowed (a gradient above ~1e19 in float32)")
    for n, t in got.items():
        if t is not sums[n]:
            sums[n].add_(t.to(sums[n].dtype))
    return labels


def _per_sample_batch(problem, batch, labels, start, sums, use, method, chunk_size, max_memory) -> str:
    """Add ``batch``'s squared per-sample gradients of ``problem.selected`` by vmap (in chunks) or
    the loop; returns the engine to use next (vmap falls back to the loop once, under 'auto')."""
    step = _chunk_size(problem.selected, problem.kind, problem.top_k, batch, chunk_size, max_memory)
    for i in range(0, batch.size, step):
        part = batch.slice(i, min(i + step, batch.size))
        lab = None if labels is None else labels[i : i + part.size]
        sq = None
        if use == "vmap":
            try:
                sq = ps.vmap_squared_grads(problem, part, lab)
            except EWCInputError:
                raise
            except Exception as e:  # noqa: BLE001 - any transform failure: report, then decide
                first = (str(e).splitlines() or [""])[0]
                if method == "vmap":
                    raise RuntimeError(f"estimate_fisher(method='vmap'): torch.func could not transform "
                                       f"the model: {type(e).__name__}: {first} (method='loop' or 'auto' "
                                       f"handles such models)") from e
                warnings.warn(f"estimate_fisher: torch.func could not transform the model ({type(e).__name__}: "
                              f"{first}); falling back to method='loop' (one backward per sample, slower) for "
                              f"{len(problem.selected)} parameter(s)", UserWarning, stacklevel=3)
                use = "loop"
        if sq is None:
            ps.loop_squared_sums(problem, part, lab, start + i, sums)
            if not all_finite(sums[n] for n in problem.selected):
                scratch = {n: torch.zeros_like(sums[n]) for n in problem.selected}  # locate and raise
                ps.loop_squared_sums(problem, part, lab, start + i, scratch, check_each=True)
                raise EWCInputError("the squared gradients overflowed (a gradient above ~1e19 in float32)")
            continue
        chunk_sums = {n: t.sum(0) for n, t in sq.items()}
        if not all_finite(chunk_sums.values()):  # one host sync per chunk; names the culprit when it fires
            _raise_first_bad(sq, start + i)
        del sq
        for n, s in chunk_sums.items():
            sums[n].add_(s)
    return use


def _raise_first_bad(sq: dict[str, torch.Tensor], start: int) -> None:
    for name, t in sq.items():
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        if bool(bad.any()):
            raise ps.bad_gradient(name, start + int(bad.nonzero()[0, 0]))
    raise EWCInputError("a squared gradient overflowed")


def _batched(model, data, selected, loss_fn, kind, num_samples):
    """The square-of-batch-gradients approximation: ``sum_b B_b grad(mean loss_b)^2 / N`` (biased)."""
    if kind != "empirical":
        raise EWCInputError("method='batched' is the empirical batch-gradient approximation; use kind='empirical'")
    names, plist = list(selected), list(selected.values())
    sums = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            for n, p in selected.items()}
    seen = 0
    device = plist[0].device
    labels_spec = None
    with eval_mode(model):
        for batch in iter_batches(data, num_samples):
            if labels_spec is None:
                labels_spec = _output_check(model, batch.take(1).to(device), kind, loss_fn)
            batch = labels_spec.check(batch, seen).to(device)
            with torch.enable_grad():
                if batch.is_dict:
                    out = model(**batch.inputs)
                    loss = out.loss if loss_fn is None else loss_fn(out, batch.labels)
                else:
                    if batch.targets is None:
                        raise EWCInputError("method='batched' needs (inputs, targets) batches")
                    out = model(batch.inputs)
                    loss = loss_fn(out, batch.targets) if loss_fn else per_sample_ce(logits_of(out), batch.targets).mean()
                gs = torch.autograd.grad(loss, plist, allow_unused=True)
            for n, g in zip(names, gs):
                if g is not None:
                    sums[n].add_(g.to(sums[n].dtype).square() * batch.size)
            seen += batch.size
    return {n: s / seen for n, s in sums.items()}
