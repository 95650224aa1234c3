"""Benchmarks behind ``fastewc bench``: the penalty against its baselines, and Fisher estimation
against the per-sample loop, on the user's own hardware.

Every table comes from cases timed round-robin in one process
(:func:`fastewc.bench.timing.time_side_by_side`), so ratios are measured side by side. The
penalty's memory-traffic floor is 20 bytes per parameter (read theta, F, anchor and grad, write
grad) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing as bu
from .. import reference
from .baselines import ForeachEWC, compiled_reference
from .models import FISHER_MODELS, HF_MODELS, HF_SAMPLES, fisher_problem, hf_problem, transformer_like
from .._utils import available_memory
from ..errors import EWCInputError
from ..fisher import clear_plan_cache, estimate_fisher
from ..reference import ReferenceEWC
from ..penalty import EWCRegularizer

FLOOR_BYTES_PER_PARAM = 20


class BenchSizeError(EWCInputError):
    """The requested benchmark would not fit in the device's memory."""


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` -> device, with a clear error when unusable."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EWCInputError(f"unknown device {device!r}; expected 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type not in ("cpu", "cuda"):
        raise EWCInputError(f"device {device!r} is not supported by the benchmark; expected 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EWCInputError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                                f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EWCInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_fits(need_bytes: float, device: torch.device, what: str) -> None:
    """Raise :class:`BenchSizeError` before allocating when ``need_bytes`` exceeds 90% of what is free."""
    free = available_memory(device)
    if need_bytes > 0.9 * free:
        raise BenchSizeError(f"{what} needs about {need_bytes / 2**30:.1f} GiB on {device}, but only "
                             f"{free / 2**30:.1f} GiB is free; choose a smaller size")


def penalty_benchmark(*, device: str | torch.device = "cpu", params: float = 25e6, tasks: int = 3,
                      repeats: int = 15, storage_dtype: torch.dtype = torch.float32,
                      compile_reference: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Time the EWC penalty step on a transformer-shaped parameter set (float32 parameters).

    Cases (each adds the penalty's gradient into an existing ``.grad``, as in a training step):
    the reference loop (``ewc(model).backward()``), the per-task ``torch._foreach`` baseline,
    optionally ``torch.compile`` of the reference loop, ``EWCRegularizer`` forward+backward and
    ``accumulate_grad_`` (backend ``"auto"``), and on CUDA also the PyTorch backend forced.

    Returns a JSON-ready dict: machine, sizes, copy bandwidth (GB/s), floor (ms) and one row per
    case with ``median_ms``, ``speedup_vs_reference``, ``GBps`` (20 B/param over the time) and
    ``ratio_to_floor``.
    """
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if params < 1 or tasks < 1 or repeats < 1:
        raise EWCInputError(f"params, tasks and repeats must be >= 1; got {params}, {tasks}, {repeats}")
    # Parameters + grads, the reference's per-task F and anchor (shared with the foreach
    # baseline), fastewc's two buffers, the bandwidth probe's two arrays, one gradient temporary.
    store = torch.finfo(storage_dtype).bits // 8
    check_fits(params * (4 + 4 + 8 * tasks + 2 * store + 8 + 4), dev, f"a {params / 1e6:.0f}M-parameter penalty benchmark")
    say = progress or (lambda msg: None)

    torch.manual_seed(0)
    model = transformer_like(params).to(dev)
    P = sum(p.numel() for p in model.parameters())
    say(f"penalty: {P / 1e6:.1f}M parameters, {tasks} tasks on {dev}; registering")
    ref, fe = ReferenceEWC(1000.0), ForeachEWC(1000.0)
    ewc = EWCRegularizer(1000.0, storage_dtype=storage_dtype)
    ewc_torch = EWCRegularizer(1000.0, storage_dtype=storage_dtype, backend="torch") if dev.type == "cuda" else None
    for _ in range(tasks):
        fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
        ref.task_fishers.append(fisher)  # not register_task: its clone would double memory
        ref.task_params.append(anchor)
        fe.tasks.append((fisher, anchor))  # the same tensors
        for reg in (ewc, ewc_torch):
            if reg is not None:
                reg.register_task(fisher, anchor)
    del fisher, anchor
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    copy, copy_bytes = bu.copy_case(P, dev)
    cases = {
        "copy (bandwidth probe)": copy,
        "reference loop fwd+bwd": lambda: ref(model).backward(),
        "torch._foreach per task fwd+bwd": lambda: fe(model).backward(),
    }
    if compile_reference:
        say("penalty: compiling the reference loop (torch.compile; this takes a while)")
        compiled = compiled_reference(ref)
        cases["torch.compile(loop) fwd+bwd"] = lambda: compiled(model).backward()
    ewc(model)  # bind once, to name the backend "auto" chose
    backend = "+".join(ewc.active_backends)
    cases[f"fastewc fwd+bwd [{backend}]"] = lambda: ewc(model).backward()
    cases[f"fastewc accumulate_grad_ [{backend}]"] = lambda: ewc.accumulate_grad_(model)
    if ewc_torch is not None and backend != "torch":
        cases["fastewc fwd+bwd [torch]"] = lambda: ewc_torch(model).backward()
        cases["fastewc accumulate_grad_ [torch]"] = lambda: ewc_torch.accumulate_grad_(model)

    say(f"penalty: timing {len(cases) - 1} methods, {repeats} rounds")
    times = bu.time_side_by_side(cases, repeats=repeats, device=dev,
                                 on_round=lambda r: say(f"penalty: round {r + 1}/{repeats}"))
    med = {k: bu.median(v) for k, v in times.items()}
    bandwidth = copy_bytes / med.pop("copy (bandwidth probe)")
    floor = FLOOR_BYTES_PER_PARAM * P / bandwidth
    ref_t = med["reference loop fwd+bwd"]
    rows = [{"method": k, "median_ms": 1e3 * t, "speedup_vs_reference": ref_t / t,
             "GBps": FLOOR_BYTES_PER_PARAM * P / t / 1e9, "ratio_to_floor": t / floor} for k, t in med.items()]
    return {"benchmark": "penalty", "device": str(dev), "machine": bu.machine_info(dev), "params": P,
            "tensors": len(list(model.parameters())), "tasks": tasks, "storage_dtype": str(storage_dtype),
            "repeats": repeats, "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": 1e3 * floor,
            "rows": rows, "raw_seconds": times}


def format_penalty(result: dict) -> str:
    """The penalty result as a markdown table with a header saying what and where."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [f"EWC penalty: {result['params'] / 1e6:.1f}M parameters in {result['tensors']} tensors, "
             f"{result['tasks']} tasks, storage {result['storage_dtype'].replace('torch.', '')}, on {where}",
             f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s -> floor {result['floor_ms']:.2f} ms "
             f"(20 B/param); {result['repeats']} round-robin repeats, medians", "",
             f"| {'method':<36} | {'median ms':>9} | {'speed-up':>8} | {'GB/s':>6} | {'x floor':>7} |",
             f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 9}|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']:<36} | {r['median_ms']:>9.2f} | {r['speedup_vs_reference']:>7.1f}x | "
                     f"{r['GBps']:>6.1f} | {r['ratio_to_floor']:>6.2f}x |")
    return "\n".join(lines)


def fisher_benchmark(*, device: str | torch.device = "cpu", samples: int = 512, repeats: int = 3,
                     models: tuple[str, ...] = FISHER_MODELS, methods: tuple[str, ...] = ("auto", "loop"),
                     kinds: tuple[str, ...] = ("empirical",), exact_models: tuple[str, ...] = ("mlp",),
                     exact_methods: tuple[str, ...] | None = None, floor: bool = True, anchors: bool = True,
                     hf_samples: int = HF_SAMPLES, progress: Callable[[str], None] | None = None) -> dict:
    """Time the Fisher diagonal on the benchmark models: the reference per-sample loop against
    :func:`estimate_fisher` with each of ``methods``, for each of ``kinds`` ("exact" only on
    ``exact_models``, with ``exact_methods`` (default ``methods``): its reference loop takes one
    backward per class and sample).

    Models: ``mlp``, ``cnn``, ``transformer`` (:func:`fastewc.bench.models.fisher_problem`,
    ``samples`` samples) and the Hugging Face models ``bert``, ``gpt2``, ``llama``
    (:func:`fastewc.bench.models.hf_problem`, ``hf_samples`` padded sequences; the reference is
    the per-sample loop over ``model(**one_sample).loss``; methods other than ``auto``/``rules``
    are left out there: vmap cannot run their default attention with a padding mask).

    Each case is also run once under a memory probe for its extra peak memory (bytes over what
    was in use before it). With ``floor``, a row times one plain batched forward + backward over
    the same batches (eval mode, mean loss, parameter gradients): the cost of a training pass,
    which a Fisher computed "at backward-pass cost" is measured against. With ``anchors``, rows
    for BackPACK (``SumGradSquared`` for the empirical kind, ``DiagGGNMC`` for the sampled one,
    ``DiagGGNExact`` for the exact one) where it is installed and supports the model; a row says
    why when it is skipped.

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
            if anchors and not hf:
                fn, why = _backpack_case(model, data, kind)
                if fn is not None:
                    cases[f"BackPACK {_BACKPACK[kind]}"] = fn
                else:
                    skipped.append({"model": name, "kind": kind, "method": f"BackPACK {_BACKPACK[kind]}",
                                    "reason": why})
            if floor and kind == "empirical":
                cases["floor: fwd+bwd, no Fisher"] = lambda: _train_pass(model, data)
            say(f"fisher: {name} ({P / 1e6:.2f}M parameters), {kind}, {len(cases)} methods x {repeats} rounds")
            times = bu.time_side_by_side(cases, repeats=repeats, warmup=1, device=dev)
            ref_t = bu.median(times["reference loop"])
            floor_t = bu.median(times["floor: fwd+bwd, no Fisher"]) if "floor: fwd+bwd, no Fisher" in times else None
            extra = {}
            if "fastewc auto" in cases:
                # What auto covered how, and the probe's cost on a first call (the timed calls
                # above reuse the proven plan, as a user's second call does).
                clear_plan_cache()
                _, info = estimate_fisher(model, data, kind=kind, generator=gen(), return_info=True)
                extra = {"coverage": info.summary(), "probe_seconds": info.probe_seconds,
                         "per_sample_params": len(info.vmap_params) + len(info.loop_params)}
            for method, fn in cases.items():
                _, peak = bu.peak_extra_memory(fn, dev)
                t = bu.median(times[method])
                rows.append({"model": name, "kind": kind, "method": method, "params": P, "samples": n,
                             "seconds": t, "speedup_vs_reference": ref_t / t,
                             "vs_floor": None if floor_t is None else t / floor_t,
                             "peak_extra_MB": None if peak is None else peak / 2**20,
                             **(extra if method == "fastewc auto" else {})})
    return {"benchmark": "fisher", "device": str(dev), "machine": bu.machine_info(dev), "samples": samples,
            "hf_samples": hf_samples, "kinds": list(kinds), "repeats": repeats, "rows": rows, "skipped": skipped}


_BACKPACK = {"empirical": "SumGradSquared", "sampled": "DiagGGNMC", "exact": "DiagGGNExact"}


def _backpack_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing BackPACK's diagonal of ``kind`` on a copy of ``model`` (sum reduction,
    summed over the batches, divided by N), or ``(None, why)`` when it cannot run."""
    import copy
    import importlib
    import warnings

    try:
        bp = importlib.import_module("backpack")
        ext = importlib.import_module("backpack.extensions")
    except ImportError:
        return None, "backpack-for-pytorch is not installed (pip install --no-deps backpack-for-pytorch einops unfoldNd)"
    extension, attr = {"empirical": (ext.SumGradSquared, "sum_grad_squared"),
                       "sampled": (ext.DiagGGNMC, "diag_ggn_mc"),
                       "exact": (ext.DiagGGNExact, "diag_ggn_exact")}[kind]
    try:
        net = bp.extend(copy.deepcopy(model).eval(), use_converter=False)
        loss_fn = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
    except Exception as e:  # noqa: BLE001 - report why the anchor is missing
        return None, f"BackPACK cannot extend the model ({type(e).__name__}: {e})"

    def run():
        n, sums = 0, None
        for x, y in data:
            net.zero_grad(set_to_none=True)
            with warnings.catch_warnings(), bp.backpack(extension()):
                warnings.simplefilter("ignore")
                loss_fn(net(x), y).backward()
            got = [getattr(p, attr) for p in net.parameters()]
            sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            n += x.shape[0]
        return [s / n for s in sums]

    try:
        run()
    except Exception as e:  # noqa: BLE001 - unsupported layers: the anchor is skipped with the reason
        return None, f"BackPACK does not support this model ({type(e).__name__}: {str(e)[:120]})"
    return run, None


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
    """The Fisher result as a markdown table (and the anchors that were skipped, with why)."""
    lines = [f"Fisher diagonal, N = {result['samples']} samples (Hugging Face models: "
             f"{result.get('hf_samples', HF_SAMPLES)}), {result['repeats']} round-robin repeats, medians; "
             f"x floor = time / one plain training pass; peak = extra memory over the baseline", "",
             f"| {'model':<11} | {'params':>7} | {'kind':<9} | {'method':<25} | {'seconds':>8} | {'vs loop':>8} "
             f"| {'x floor':>7} | {'peak MB':>8} |",
             f"|{'-' * 13}|{'-' * 9}|{'-' * 11}|{'-' * 27}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 10}|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_extra_MB"] is None else f"{r['peak_extra_MB']:.0f}"
        floor = "" if r.get("vs_floor") is None else f"{r['vs_floor']:.2f}"
        lines.append(f"| {r['model']:<11} | {r['params'] / 1e6:>6.2f}M | {r.get('kind', 'empirical'):<9} | "
                     f"{r['method']:<25} | {r['seconds']:>8.3f} | {r['speedup_vs_reference']:>7.2f}x | {floor:>7} "
                     f"| {peak:>8} |")
    for r in result.get("skipped", []):
        lines.append(f"\n{r['method']} on {r['model']} ({r['kind']}): skipped, {r['reason']}")
    return "\n".join(lines)


def plot_bench(result: dict, path: str, label: str = "") -> str:
    """Save a figure of a ``fastewc bench`` result: penalty time per method (and Fisher time per
    model and method when present), log scale. Returns ``path``."""
    from .._utils import require

    matplotlib = require("matplotlib", extra="demo")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="demo")

    panels = [k for k in ("penalty", "fisher") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    pen = result["penalty"]
    ax = axes[0][0]
    names = [r["method"] for r in pen["rows"]]
    ax.barh(names, [r["median_ms"] for r in pen["rows"]])
    ax.axvline(pen["floor_ms"], color="k", ls="--", lw=1, label=f"memory floor {pen['floor_ms']:.1f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("median ms per step (log)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title(f"penalty, {pen['params'] / 1e6:.0f}M params, {pen['tasks']} tasks", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    if "fisher" in result:
        ax = axes[0][1]
        rows = result["fisher"]["rows"]
        labels = [f"{r['model']}: {r['method']}" for r in rows]
        ax.barh(labels, [r["seconds"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("seconds per estimate (log)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"Fisher diagonal, N = {result['fisher']['samples']}", fontsize=9)
    fig.suptitle("fastewc bench" + (f": {label}" if label else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
