"""Fisher diagonal from true per-sample gradients: :func:`estimate_fisher`.

The estimate is ``F_i = (1/N) sum_n (d loss_n / d theta_i)^2``: the mean over samples of the
squared gradient of each sample's own loss. This is not the square of a mini-batch gradient
(``method="batched"`` computes that, biased, only when asked for by name).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .._utils import available_memory, eval_mode, is_sharded, require, unwrap_model
from ..errors import EWCInputError
from . import engine
from . import per_sample as ps
from .batches import Batch, class_labels, iter_batches, read_batch
from .problem import (Problem, SampledLabels, logits_of, model_head, per_sample_ce, sample_labels,
                      with_decoder_inputs)

KINDS = ("empirical", "sampled", "exact")
METHODS = ("auto", "rules", "vmap", "loop", "batched")
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


def select_parameters(model: nn.Module, params=None) -> dict[str, nn.Parameter]:
    """The parameters to estimate, by name (tied parameters once, as ``named_parameters()`` gives).

    ``params``: None (every parameter with ``requires_grad``), a list of names and/or globs
    (``fnmatch``; a name may be frozen if named explicitly), or a predicate ``f(name, param)``.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif callable(params):
        chosen = {n: p for n, p in named.items() if params(n, p)}
    else:
        patterns = _patterns(params)
        unknown = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in named)]
        if unknown:
            raise EWCInputError(f"params: nothing in the model matches {unknown} "
                                f"(the model has {list(named)[:6]}{' ...' if len(named) > 6 else ''})")
        chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise EWCInputError("no parameters selected: the model has no parameter with requires_grad "
                            "(or params= matched none)")
    return chosen


def _patterns(params) -> list[str]:
    """``params`` given as names / globs: a list of strings, or :class:`EWCInputError`."""
    if isinstance(params, str):
        return [params]
    expected = ("params must be None, a parameter name or glob, a list of them (e.g. ['0.weight', 'head.*']), "
                "or a predicate f(name, param) -> bool")
    try:
        patterns = list(params)
    except TypeError:
        raise EWCInputError(f"{expected}; got {type(params).__name__}") from None
    odd = [p for p in patterns if not isinstance(p, str)]
    if odd:
        what = "tensors (pass names: [n for n, p in model.named_parameters() if ...])" \
            if isinstance(odd[0], torch.Tensor) else type(odd[0]).__name__
        raise EWCInputError(f"{expected}; got a {type(params).__name__} holding {what}")
    return patterns


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
    left = problem                                 # the problem restricted to uncovered parameters
    seen = 0
    labels_spec = None                             # what the dataset labels index, from the first batch
    try:
        with eval_mode(model):
            for batch in iter_batches(data, num_samples):
                # one decoder input for every engine; the batch keeps its index (error messages)
                batch = replace(with_decoder_inputs(model, batch), index=batch.index)
                if kind == "empirical" and batch.labels is None and not (batch.is_dict and loss_fn is not None):
                    raise EWCInputError("kind='empirical' needs labels: batches must be (inputs, targets), or dicts "
                                        "with 'labels'; use kind='sampled' or 'exact' for unlabelled data")
                if labels_spec is None:
                    labels_spec = _output_check(model, batch.take(1).to(device), kind, loss_fn)
                batch = labels_spec.check(batch, seen).to(device)
                if plan is None and method in ("auto", "rules"):
                    plan, report.plan_cached = engine.cached_plan(problem, batch, probe=True)
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
    count = torch.tensor(float(seen), dtype=acc_dtype, device=device)
    sums, count = _all_reduce(sums, count)
    report.finish(plan, left, use, seen)
    _log.info("estimate_fisher: %s", report.summary())
    fisher = {n: (s / count).to(acc_dtype) for n, s in sums.items()}
    return (fisher, report) if return_info else fisher


def _check_arguments(loss_fn, kind, num_samples, method, chunk_size, max_memory, progress, generator, top_k,
                     return_info):
    """Each argument's type and range (those that need the model are checked where it is known).
    Returns ``num_samples, chunk_size, max_memory, top_k`` as plain Python numbers."""
    if loss_fn is not None and not callable(loss_fn):
        raise EWCInputError(f"loss_fn must be a callable loss_fn(output, target) -> scalar loss of one sample, or "
                            f"None for the default; got {type(loss_fn).__name__}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise EWCInputError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(method, str) or method not in METHODS:
        raise EWCInputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    num_samples = _positive_int("num_samples", num_samples, "or None for all the data")
    chunk_size = _positive_int("chunk_size", chunk_size, "or None to size chunks from max_memory")
    top_k = _positive_int("top_k", top_k, "or None for every class")
    if max_memory is not None:
        if (isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real)
                or not math.isfinite(max_memory) or max_memory <= 0):
            raise EWCInputError(f"max_memory must be a positive finite number of bytes (e.g. 2**30 for 1 GiB), or "
                                f"None for a quarter of free memory; got {max_memory!r}")
        max_memory = float(max_memory)
    for name, value in (("progress", progress), ("return_info", return_info)):
        if not isinstance(value, bool):
            raise EWCInputError(f"{name} must be True or False; got {value!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise EWCInputError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None; "
                            f"got {type(generator).__name__}")
    if top_k is not None and kind != "exact":
        raise EWCInputError(f"top_k={top_k!r} applies to kind='exact' only (got kind={kind!r})")
    if kind == "exact" and loss_fn is not None:
        raise EWCInputError("kind='exact' sums softmax cross-entropy over the classes; it cannot use a custom loss_fn")
    return num_samples, chunk_size, max_memory, top_k


def _positive_int(name: str, value, none_means: str) -> int | None:
    """``value`` as an int when it is a positive integer (numpy ones included), None for None;
    else :class:`EWCInputError` naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise EWCInputError(f"{name} must be a positive int ({none_means}); got {value!r}")
    return int(value)


@dataclass
class _Labels:
    """What the dataset labels index, found from the model's output on the first sample:
    ``classes`` (None: the labels are not checked), the ``loss`` that uses them (for messages),
    ``one_per_sample`` (the logits have no position axis), ``shift`` (a causal LM's label t is
    position t-1's target: the first label is never used) and ``head`` (a Hugging Face head)."""

    classes: int | None = None
    loss: str = ""
    one_per_sample: bool = False
    shift: bool = False
    head: str | None = None
    config: object = None

    def check(self, batch: Batch, start: int) -> Batch:
        """``batch`` with its labels checked (and made torch.long), or :class:`EWCInputError`
        naming the batch, the sample and the valid range. ``start``: the data index of its first
        sample."""
        labels = batch.labels
        if self.classes is None or labels is None:
            return batch
        if self.head == "sequence_classification":
            # As the model's own loss decides (model_loss_per_sample): class indices only for a
            # single-label problem; regression and multi-label targets are floats.
            kind = getattr(self.config, "problem_type", None)
            if kind is None:
                kind = ("regression" if self.classes == 1 else "single_label_classification"
                        if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
            if kind != "single_label_classification":
                return batch
        if self.one_per_sample and labels[0].numel() != 1:
            raise EWCInputError(
                f"batch {batch.index}: the labels have shape {tuple(labels.shape)}, but {self.loss} takes one class "
                f"index per sample, shape ({batch.size},); pass loss_fn for one-hot or soft targets")
        class_labels(labels[..., 1:] if self.shift else labels, self.classes, batch.index, start, self.loss)
        # int32 / int16 / uint8 indices name the same classes; cross-entropy takes int64 only
        return batch if labels.dtype == torch.long else batch.with_labels(labels.long())


def _output_check(model: nn.Module, one: Batch, kind: str, loss_fn) -> _Labels:
    """Check, from one forward of the first sample ``one``, that the model's output suits the
    loss: logits where the softmax cross-entropy needs them, and more than one class (softmax
    over one class is constant, so every gradient and the Fisher would be zero). Returns what
    the dataset labels index, for :meth:`_Labels.check` on every batch. No forward (and nothing
    to check) when a user loss_fn takes the labels."""
    softmax = kind != "empirical" or (loss_fn is None and not one.is_dict)
    head = model_head(model) if kind == "empirical" and loss_fn is None and one.is_dict else None
    if not softmax and head is None:
        return _Labels()
    args, kwargs = engine.forward_inputs(model, one)
    with torch.no_grad():
        out = model(*args, **kwargs)
    try:
        z = logits_of(out)
    except EWCInputError:
        got = f"the model returned a {type(out).__name__} (not a tensor, and no .logits)"
        if kind == "empirical":
            raise EWCInputError(
                f"kind='empirical' with the default loss (softmax cross-entropy on the logits) needs logits, but {got}: "
                f"pass loss_fn(output, target) computing one sample's loss from this output, e.g. "
                f"loss_fn=lambda out, y: F.cross_entropy(out[0], y)") from None
        raise EWCInputError(
            f"kind={kind!r} {'draws labels from' if kind == 'sampled' else 'sums over the classes of'} the softmax "
            f"of the logits, so it needs logits, but {got}: return the logits (a tensor, or an output with "
            f".logits), or use kind='empirical' with loss_fn(output, target)") from None
    if z.dim() < 2:
        raise EWCInputError(f"the model's logits for one sample have shape {tuple(z.shape)}; softmax cross-entropy "
                            f"needs a class axis, [N, C] or [N, T, C] (pass loss_fn with kind='empirical' for other "
                            f"outputs)")
    classes = z.shape[-1]
    if softmax and classes == 1:
        # Raised, not warned: the result is known before any gradient is taken and no use of an
        # all-zero Fisher (a penalty of zero) or of labels that are all 0 is meant.
        why = {"exact": "the exact Fisher would be zero for every parameter",
               "empirical": "the default loss (cross-entropy) is 0 for every sample and the Fisher would be zero",
               "sampled": ("every drawn label would be class 0 whatever the model predicts" if loss_fn is not None
                           else "every drawn label is class 0 and the Fisher would be zero")}[kind]
        raise EWCInputError(
            f"kind={kind!r} on a model with one output per sample (logits of shape {tuple(z.shape)}): softmax over "
            f"one class is constant (p = 1), so {why}; for a single-logit binary classifier or a regression model "
            f"pass a loss_fn (e.g. F.binary_cross_entropy_with_logits or F.mse_loss) with kind='empirical', or give "
            f"the model two logits (one per class)")
    if kind != "empirical" or loss_fn is not None:
        return _Labels()
    if head is None:
        return _Labels(classes, "the default loss (cross-entropy on the model's logits)", z.dim() == 2)
    name = type(model).__name__
    if head == "sequence_classification":
        config = getattr(model, "config", None)
        n = getattr(config, "num_labels", classes)
        return _Labels(n, f"{name}'s own loss (cross-entropy)", True, head=head, config=config)
    return _Labels(classes, f"{name}'s own loss (cross-entropy on its logits)", shift=head == "causal_lm", head=head)


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
        got, trouble = engine.rules_pass(problem, plan, part, lab)
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
    if not _all_finite(got.values()):  # locate the sample and parameter, then raise
        bad = {n: torch.zeros_like(sums[n]) for n in got}
        ps.loop_squared_sums(problem.restrict(got), part, labels, start, bad, check_each=True)
        raise EWCInputError("the squared gradients overflowed (a gradient above ~1e19 in float32)")
    for n, t in got.items():
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
            if not _all_finite(sums[n] for n in problem.selected):
                scratch = {n: torch.zeros_like(sums[n]) for n in problem.selected}  # locate and raise
                ps.loop_squared_sums(problem, part, lab, start + i, scratch, check_each=True)
                raise EWCInputError("the squared gradients overflowed (a gradient above ~1e19 in float32)")
            continue
        chunk_sums = {n: t.sum(0) for n, t in sq.items()}
        if not _all_finite(chunk_sums.values()):  # one host sync per chunk; names the culprit when it fires
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


def _all_finite(squares) -> bool:
    """Whether every element of these non-negative tensors is finite, from one sum per tensor:
    a NaN or Inf makes its tensor's sum non-finite (cheaper than ``isfinite().all()`` on each)."""
    return bool(torch.isfinite(torch.stack([t.sum() for t in squares]).sum()))


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


def _all_reduce(sums: dict[str, torch.Tensor], count: torch.Tensor):
    """Sum the per-rank sums and sample counts when torch.distributed is initialised (one call)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, count
    flat = torch.cat([s.reshape(-1) for s in sums.values()] + [count.reshape(1)])
    dist.all_reduce(flat)
    out, i = {}, 0
    for n, s in sums.items():
        out[n] = flat[i : i + s.numel()].view_as(s)
        i += s.numel()
    return out, flat[-1]


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
