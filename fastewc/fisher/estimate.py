"""Fisher diagonal from true per-sample gradients: :func:`estimate_fisher`.

The estimate is ``F_i = (1/N) sum_n (d loss_n / d theta_i)^2``: the mean over samples of the
squared gradient of each sample's own loss. This is not the square of a mini-batch gradient
(``method="batched"`` computes that, biased, only when asked for by name).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from . import per_sample as ps
from . import engine
from .batches import iter_batches
from .._utils import available_memory, eval_mode, is_sharded, require
from ..errors import EWCInputError

KINDS = ("empirical", "sampled", "exact")
METHODS = ("auto", "rules", "vmap", "loop", "batched")
_log = logging.getLogger("fastewc.fisher")
# Default share of free memory the per-sample gradients of one chunk may take. Conservative:
# the model's activations under vmap (chunk x activation size) come on top and are not known.
MEMORY_FRACTION = 0.25
# Speed, not memory, decides the default chunk: about CHUNK_BYTES of per-sample gradients, at
# most MAX_CHUNK samples. Measured on the 2-core EPYC dev VM, N = 512 (bench_models), seconds for
# chunks of 16 / 32 / 64: MLP (7.2 MB of gradients per sample) 1.35 / 2.37 / 2.16; CNN (0.24 MB)
# 0.55 / 0.47 / 0.54; Transformer (1.6 MB) 0.85 / 0.71 / 0.67. Big per-sample gradients want
# small chunks (they stream through memory twice: written by vmap, then squared and summed);
# small ones want the batch-level parallelism of big chunks.
CHUNK_BYTES = 128 * 2**20
MAX_CHUNK = 64
# One parameter's per-sample gradients for a chunk are one allocation. glibc serves blocks above
# its mmap threshold (at most 32 MB) with fresh pages, and faulting them in cost more than the
# arithmetic: MLP 784-1000-1000-10 (4 MB per sample for the 1000x1000 weight), N = 512, seconds
# for chunks of 4 / 8 / 16 / 32: 1.75 / 1.21 / 2.29 / 1.99 (reference loop 1.12). So a chunk keeps
# its largest parameter's block under this size.
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
        patterns = [params] if isinstance(params, str) else list(params)
        unknown = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in named)]
        if unknown:
            raise EWCInputError(f"params: nothing in the model matches {unknown} "
                                f"(the model has {list(named)[:6]}{' ...' if len(named) > 6 else ''})")
        chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise EWCInputError("no parameters selected: the model has no parameter with requires_grad "
                            "(or params= matched none)")
    return chosen


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


def _locate_bad(sq: dict[str, torch.Tensor], start: int) -> str:
    for name, t in sq.items():
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            return (f"the gradient of parameter {name!r} is NaN/Inf for sample {start + i} (counting from 0 "
                    f"in the data's order); check that sample and the loss")
    return "a squared gradient overflowed"


def estimate_fisher(model: nn.Module, data: Iterable, *, loss_fn: Callable | None = None, kind: str = "empirical",
                    num_samples: int | None = None, method: str = "auto", chunk_size: int | None = None,
                    max_memory: int | None = None, params=None, progress: bool = False,
                    generator: torch.Generator | None = None, top_k: int | None = None, return_info: bool = False):
    """Diagonal Fisher information: the mean over samples of squared per-sample gradients.

    Args:
        model: any ``nn.Module``. It is put in eval mode while estimating (dropout off, BatchNorm
            on running statistics); every module's training flag is restored afterwards.
        data: an iterable of batches (a DataLoader): ``(inputs, targets)``, ``(inputs,)`` or a
            Hugging Face style dict (``model(**batch)``). Samples are on dim 0. The result does not
            depend on how the data is batched.
        loss_fn: ``loss_fn(output, target) -> scalar`` for ONE sample (``output`` and ``target``
            keep a batch axis of size 1). Default: cross-entropy on logits (for ``[1, T, C]``
            outputs the mean over positions whose target is not -100), or ``output.loss`` for
            dict batches.
        kind: ``"empirical"`` (dataset labels), ``"sampled"`` (labels drawn from the model's
            predictive distribution, per position for sequences; reproducible with
            ``generator``) or ``"exact"`` (``sum_y p(y|x) g_y^2`` over all classes, or the
            ``top_k`` most probable per position: a lower bound that tends to the exact value).
            ``sampled`` and ``exact`` use softmax cross-entropy on the logits; for dict batches
            every position counts except where ``attention_mask`` is 0.
        num_samples: use exactly this many samples (the first ones); default all.
        method: ``"rules"`` (one batched backward with per-layer formulas, checked on a probe
            of 3 samples; parameters no rule covers go through vmap), ``"vmap"`` (``torch.func``
            per-sample gradients in chunks), ``"loop"`` (one backward per sample), ``"auto"``
            (rules when they cover every parameter, else vmap; falls back to loop, with one
            warning naming the reason, when ``torch.func`` cannot transform the model) or
            ``"batched"`` (the seeds' square of mini-batch gradients: biased, not the Fisher; by
            name only).
        chunk_size: samples per vmap call. Default: from ``max_memory`` (bytes for one chunk's
            per-sample gradients; default a quarter of free host / device memory), at most 64.
        params: names / globs / predicate selecting the parameters (default: all with
            ``requires_grad``; a LoRA model gets its adapters only).
        progress: show a tqdm progress bar (``pip install tqdm``).
        generator: random generator for ``kind="sampled"``.
        top_k: classes per position for ``kind="exact"`` (large vocabularies).
        return_info: also return a :class:`FisherReport` (which rule computed which module,
            which parameters went per sample, and why).

    Returns:
        ``{name: tensor}`` shaped like the parameters, float32 (float64 for float64
        parameters), on the parameters' device. With ``torch.distributed`` initialised, sums and
        sample counts are all-reduced: every rank returns the Fisher over all ranks' data.
    """
    if kind not in KINDS:
        raise EWCInputError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if method not in METHODS:
        raise EWCInputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise EWCInputError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if max_memory is not None and max_memory <= 0:
        raise EWCInputError(f"max_memory must be > 0 bytes; got {max_memory!r}")
    if top_k is not None and (kind != "exact" or top_k < 1):
        raise EWCInputError(f"top_k={top_k!r} applies to kind='exact' only, and must be >= 1")
    if kind == "exact" and loss_fn is not None:
        raise EWCInputError("kind='exact' sums softmax cross-entropy over the classes; it cannot use a custom loss_fn")
    selected = select_parameters(model, params)
    sharded = [n for n, p in selected.items() if is_sharded(p)]
    if sharded:
        raise EWCInputError(
            f"estimate_fisher does not run on sharded (FSDP2 / DTensor) parameters, e.g. {sharded[0]!r}: estimate on "
            f"the unsharded model (with DDP every rank estimates on its shard of the data), then register the full "
            f"dicts on the sharded model with register_task(fisher, optimum, model=model)")
    if method == "batched":
        return _batched(model, data, selected, loss_fn, kind, num_samples)

    frozen = {**{n: p.detach() for n, p in model.named_parameters() if n not in selected},
              **dict(model.named_buffers())}
    problem = ps.Problem(model, kind, loss_fn, top_k, selected, frozen)
    device = next(iter(selected.values())).device
    acc_dtype = {p.dtype for p in selected.values()}
    acc_dtype = torch.float64 if torch.float64 in acc_dtype else torch.float32
    sums = {n: torch.zeros(p.shape, dtype=acc_dtype, device=device) for n, p in selected.items()}
    bar = require("tqdm", extra="demo").tqdm(total=num_samples, unit="sample", desc="Fisher") if progress else None
    report = FisherReport(method)
    use = "loop" if method == "loop" else "vmap"   # engine for what the rules do not cover
    plan = None                                    # rules plan, made on the first batch
    left = problem                                 # the problem restricted to uncovered parameters
    seen = 0
    with eval_mode(model):
        for batch in iter_batches(data, num_samples):
            batch = batch.to(device)
            if kind == "empirical" and batch.labels is None and not (batch.is_dict and loss_fn is not None):
                raise EWCInputError("kind='empirical' needs labels: batches must be (inputs, targets), or dicts with "
                                    "'labels'; use kind='sampled' or 'exact' for unlabelled data")
            if plan is None and method in ("auto", "rules"):
                plan = engine.make_plan(model, selected)
                # auto: a parameter without a rule needs a per-sample pass through the whole
                # model, which computes the ruled layers' per-sample gradients on the way for
                # little extra: rules + that pass cost more than one vmap pass over everything
                # (fisher_cpu.json, Transformer, N = 512: rules 1.206 s, vmap 0.903 s). Decided
                # before the probe when the plan already leaves something out (no probe to pay
                # for), and again after it when the probe dropped a module.
                _auto_policy(plan, method)
                if plan.modules:
                    engine.probe_plan(problem, plan, batch)
                    _auto_policy(plan, method)
                left = _restrict(problem, plan.leftover)
            labels = ps.sample_labels(problem, batch, generator) if kind == "sampled" else None
            if plan is not None and plan.modules:
                _rules_batch(problem, plan, batch, labels, seen, sums, chunk_size)
                if len(plan.leftover) != len(left.selected):  # a module left the plan (it only grows)
                    left = _restrict(problem, plan.leftover)
            if left.selected:
                use = _per_sample_batch(left, batch, labels, seen, sums, use, method, chunk_size, max_memory)
            if bar is not None:
                bar.update(batch.size)
            seen += batch.size
    if bar is not None:
        bar.close()
    count = torch.tensor(float(seen), dtype=acc_dtype, device=device)
    sums, count = _all_reduce(sums, count)
    report.finish(plan, left, use, seen)
    _log.info("estimate_fisher: %s", report.summary())
    fisher = {n: (s / count).to(acc_dtype) for n, s in sums.items()}
    return (fisher, report) if return_info else fisher


def _auto_policy(plan, method: str) -> None:
    if method == "auto" and plan.leftover and plan.modules:
        plan.drop_all("auto: other parameters need a per-sample pass through the model anyway")


def _restrict(problem: ps.Problem, names) -> ps.Problem:
    """The same per-sample problem, differentiating only ``names`` (the rest held fixed)."""
    names = [n for n in problem.selected if n in set(names)]
    keep = {n: problem.selected[n] for n in names}
    fixed = {**problem.frozen, **{n: p.detach() for n, p in problem.selected.items() if n not in keep}}
    return ps.Problem(problem.model, problem.kind, problem.loss_fn, problem.top_k, keep, fixed)


def _rules_batch(problem, plan, batch, labels, start, sums, chunk_size) -> None:
    """Add the rules' squared-gradient sums of ``batch`` (in chunks of ``chunk_size`` if given)."""
    step = chunk_size or batch.size
    for i in range(0, batch.size, step):
        part = batch.slice(i, min(i + step, batch.size))
        lab = None if labels is None else labels[i : i + part.size]
        for _ in range(3):
            got, trouble = engine.rules_pass(problem, plan, part, lab)
            if not trouble:
                break
            # Data-dependent structure (a module skipped or called twice on this batch): what the
            # rules summed on earlier batches stays valid; from here the module goes per sample.
            plan.absorb(trouble)
            if not plan.modules:
                return
        else:
            raise RuntimeError("estimate_fisher: the rule engine's hooks did not settle; use method='vmap'")
        if not _all_finite(got.values()):  # locate the sample and parameter, then raise
            bad = {n: torch.zeros_like(sums[n]) for n in got}
            ps.loop_squared_sums(_restrict(problem, list(got)), part, lab, start + i, bad, check_each=True)
            raise EWCInputError("the squared gradients overflowed (a gradient above ~1e19 in float32)")
        for n, t in got.items():
            sums[n].add_(t.to(sums[n].dtype))


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
                if method == "vmap":
                    raise RuntimeError(f"estimate_fisher(method='vmap'): torch.func could not transform "
                                       f"the model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                       f" (method='loop' or 'auto' handles such models)") from e
                warnings.warn(f"estimate_fisher: torch.func could not transform the model "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                              f"falling back to method='loop' (one backward per sample, slower)",
                              UserWarning, stacklevel=3)
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
            raise EWCInputError(_locate_bad(sq, start + i))
        del sq
        for n, s in chunk_sums.items():
            sums[n].add_(s)
    return use


def _all_finite(squares) -> bool:
    """Whether every element of these non-negative tensors is finite, from one sum per tensor:
    a NaN or Inf makes its tensor's sum non-finite. Measured on the MLP (N = 512): ``isfinite``
    + ``all`` on every chunk's sums took 16% of the rule engine's time, the sums 4%."""
    return bool(torch.isfinite(torch.stack([t.sum() for t in squares]).sum()))


class FisherReport:
    """What ``estimate_fisher(..., return_info=True)`` computed how.

    Attributes: ``method`` (as asked), ``rules`` ({module name: rule}), ``rule_params`` (parameter
    names the rules covered), ``vmap_params`` / ``loop_params`` (parameters computed per sample,
    by vmap or by the loop), ``reasons`` ({parameter: why no rule covered it}), ``samples``.
    """

    def __init__(self, method: str):
        self.method = method
        self.rules: dict[str, str] = {}
        self.rule_params: list[str] = []
        self.vmap_params: list[str] = []
        self.loop_params: list[str] = []
        self.reasons: dict[str, str] = {}
        self.samples = 0

    def finish(self, plan, left, use, samples) -> None:
        if plan is not None:
            self.rules = plan.rule_names
            self.rule_params = [p for (_, _, _, attrs) in plan.modules.values() for p in attrs.values()]
            self.reasons = {n: plan.reasons[n] for n in left.selected if n in plan.reasons}
        per_sample = list(left.selected)
        if use == "loop":
            self.loop_params = per_sample
        else:
            self.vmap_params = per_sample
        self.samples = samples

    def summary(self) -> str:
        parts = [f"{self.samples} samples"]
        if self.rules:
            parts.append("rules: " + ", ".join(f"{m or '<root>'}={r}" for m, r in self.rules.items()))
        for what, names in (("vmap", self.vmap_params), ("loop", self.loop_params)):
            if names:
                why = "; ".join(f"{n} ({self.reasons[n]})" if n in self.reasons else n for n in names)
                parts.append(f"{what}: {why}")
        return " | ".join(parts)

    def __repr__(self) -> str:
        return f"FisherReport({self.summary()})"


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
    """The seeds' batch-squared approximation: ``sum_b B_b grad(mean loss_b)^2 / N`` (biased)."""
    if kind != "empirical":
        raise EWCInputError("method='batched' is the seeds' empirical approximation; use kind='empirical'")
    names, plist = list(selected), list(selected.values())
    sums = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            for n, p in selected.items()}
    seen = 0
    device = plist[0].device
    with eval_mode(model):
        for batch in iter_batches(data, num_samples):
            batch = batch.to(device)
            with torch.enable_grad():
                if batch.is_dict:
                    out = model(**batch.inputs)
                    loss = out.loss if loss_fn is None else loss_fn(out, batch.labels)
                else:
                    if batch.targets is None:
                        raise EWCInputError("method='batched' needs (inputs, targets) batches")
                    out = model(batch.inputs)
                    loss = (loss_fn or ps.token_cross_entropy)(out, batch.targets) if loss_fn else \
                        torch.nn.functional.cross_entropy(ps.logits_of(out).reshape(-1, ps.logits_of(out).shape[-1]),
                                                          batch.targets.reshape(-1), ignore_index=-100)
                gs = torch.autograd.grad(loss, plist, allow_unused=True)
            for n, g in zip(names, gs):
                if g is not None:
                    sums[n].add_(g.to(sums[n].dtype).square() * batch.size)
            seen += batch.size
    return {n: s / seen for n, s in sums.items()}
