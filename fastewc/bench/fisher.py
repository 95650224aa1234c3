"""The Fisher half of ``fastewc bench``: :func:`fastewc.estimate_fisher` timed against the
reference per-sample loop (:func:`fastewc.reference.estimate_fisher`) and against one plain
training pass over the same batches (the floor), with each case's extra peak memory."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import EWCInputError, estimate_fisher, reference
from ..fisher import clear_plan_cache
from . import timing
from .device import resolve_device
from .models import FISHER_MODELS, HF_MODELS, HF_SAMPLES, fisher_problem, hf_problem

# Other implementations to time beside fastewc: ``extra_cases(model, batches, kind)`` yields
# ``(method label, fn or None, why it is skipped or None)``.
ExtraCases = Callable[[nn.Module, list, str], Iterable[tuple[str, Callable[[], object] | None, str | None]]]

FLOOR = "floor: fwd+bwd, no Fisher"


def fisher_benchmark(*, device: str | torch.device = "cpu", samples: int = 512, repeats: int = 3,
                     models: tuple[str, ...] = FISHER_MODELS, methods: tuple[str, ...] = ("auto", "loop"),
                     kinds: tuple[str, ...] = ("empirical",), exact_models: tuple[str, ...] = ("mlp",),
                     exact_methods: tuple[str, ...] | None = None, floor: bool = True,
                     extra_cases: ExtraCases | None = None, hf_samples: int = HF_SAMPLES,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Time the Fisher diagonal on the benchmark models: the reference per-sample loop against
    :func:`fastewc.estimate_fisher` with each of ``methods``, for each of ``kinds`` ("exact" only
    on ``exact_models``, with ``exact_methods`` (default ``methods``): its reference loop takes
    one backward per class and sample).

    Models: ``mlp``, ``cnn``, ``transformer`` (:func:`fastewc.bench.models.fisher_problem`,
    ``samples`` samples) and the Hugging Face models ``bert``, ``gpt2``, ``llama``
    (:func:`fastewc.bench.models.hf_problem`, ``hf_samples`` padded sequences; the reference is
    the per-sample loop over ``model(**one_sample).loss``; methods other than ``auto``/``rules``
    are left out there: vmap cannot run their default attention with a padding mask).

    Each case is also run once under a memory probe for its extra peak memory (bytes over what
    was in use before it). With ``floor``, a row times one plain batched forward + backward over
    the same batches (eval mode, mean loss, parameter gradients): the cost of a training pass,
    which a Fisher computed "at backward-pass cost" is measured against. ``extra_cases`` adds
    other implementations' rows (``benchmarks/fisher_anchors.py`` adds other libraries'); those
    it yields without a function are listed under ``skipped`` with the reason.

    Returns a JSON-ready dict with one row per (model, kind, method): ``seconds`` (median),
    ``speedup_vs_reference``, ``vs_floor``, ``peak_extra_MB`` and ``params``.
    """
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if samples < 1 or repeats < 1:
        raise EWCInputError(f"samples and repeats must be >= 1; got {samples}, {repeats}")
    say = progress or (lambda msg: None)
    rows, skipped = [], []
    for name in models:
        hf = name in HF_MODELS
        model, data = hf_problem(name, n=hf_samples) if hf else fisher_problem(name, n=samples)
        model = model.to(dev)
        data = [({k: v.to(dev) for k, v in b.items()} if hf else (b[0].to(dev), b[1].to(dev))) for b in data]
        n = hf_samples if hf else samples
        P = sum(p.numel() for p in model.parameters())
        for kind in kinds:
            if kind == "exact" and name not in exact_models:
                continue
            gen = (lambda: torch.Generator().manual_seed(0))
            cases = {"reference loop": lambda kind=kind: reference.estimate_fisher(model, data, kind=kind,
                                                                                      generator=gen())}
            use = methods if kind != "exact" or exact_methods is None else exact_methods
            for m in use:
                if hf and m not in ("auto", "rules"):
                    continue
                cases[f"fastewc {m}"] = (lambda m=m, kind=kind: estimate_fisher(
                    model, data, method=m, kind=kind, generator=gen()))
            for method, fn, why in (extra_cases(model, data, kind) if extra_cases is not None else ()):
                if fn is not None:
                    cases[method] = fn
                else:
                    skipped.append({"model": name, "kind": kind, "method": method, "reason": why})
            if floor and kind == "empirical":
                cases[FLOOR] = lambda: _train_pass(model, data)
            say(f"fisher: {name} ({P / 1e6:.2f}M parameters), {kind}, {len(cases)} methods x {repeats} rounds")
            times = timing.time_side_by_side(cases, repeats=repeats, warmup=1, device=dev)
            ref_t = timing.median(times["reference loop"])
            floor_t = timing.median(times[FLOOR]) if FLOOR in times else None
            extra = {}
            if "fastewc auto" in cases:
                # What auto covered how, and the probe's cost on a first call (the timed calls
                # above reuse the proven plan, as a user's second call does).
                clear_plan_cache()
                _, info = estimate_fisher(model, data, kind=kind, generator=gen(), return_info=True)
                extra = {"coverage": info.summary(), "probe_seconds": info.probe_seconds,
                         "per_sample_params": len(info.vmap_params) + len(info.loop_params)}
            for method, fn in cases.items():
                _, peak = timing.peak_extra_memory(fn, dev)
                t = timing.median(times[method])
                rows.append({"model": name, "kind": kind, "method": method, "params": P, "samples": n,
                             "seconds": t, "speedup_vs_reference": ref_t / t,
                             "vs_floor": None if floor_t is None else t / floor_t,
                             "peak_extra_MB": None if peak is None else peak / 2**20,
                             **(extra if method == "fastewc auto" else {})})
    return {"benchmark": "fisher", "device": str(dev), "machine": timing.machine_info(dev), "samples": samples,
            "hf_samples": hf_samples, "kinds": list(kinds), "repeats": repeats, "rows": rows, "skipped": skipped}


def _train_pass(model: nn.Module, data) -> None:
    """One batched forward + backward over ``data`` (eval mode, as estimate_fisher runs)."""
    was = model.training
    model.eval()
    try:
        for b in data:
            if isinstance(b, dict):
                model(**b).loss.backward()
            else:
                x, y = b
                F.cross_entropy(model(x), y).backward()
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)


def format_fisher(result: dict) -> str:
    """The Fisher result as a markdown table (and the rows that were skipped, with why)."""
    lines = [f"Fisher diagonal, N = {result['samples']} samples (Hugging Face models: "
             f"{result.get('hf_samples', HF_SAMPLES)}), {result['repeats']} round-robin repeats, medians; "
             f"x floor = time / one plain training pass; peak = extra memory over the baseline", "",
             f"| {'model':<11} | {'params':>7} | {'kind':<9} | {'method':<34} | {'seconds':>8} | {'vs loop':>8} "
             f"| {'x floor':>7} | {'peak MB':>8} |",
             f"|{'-' * 13}|{'-' * 9}|{'-' * 11}|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 10}|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_extra_MB"] is None else f"{r['peak_extra_MB']:.0f}"
        floor = "" if r.get("vs_floor") is None else f"{r['vs_floor']:.2f}"
        lines.append(f"| {r['model']:<11} | {r['params'] / 1e6:>6.2f}M | {r.get('kind', 'empirical'):<9} | "
                     f"{r['method']:<34} | {r['seconds']:>8.3f} | {r['speedup_vs_reference']:>7.2f}x | {floor:>7} "
                     f"| {peak:>8} |")
    for r in result.get("skipped", []):
        lines.append(f"\n{r['method']} on {r['model']} ({r['kind']}): skipped, {r['reason']}")
    return "\n".join(lines)
