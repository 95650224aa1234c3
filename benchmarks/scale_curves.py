"""Cost curves behind ``benchmarks/bench_scale.py``: how the penalty step, registration and Fisher
estimation grow with the work, measured through fastewc's public API.

* **Penalty against P** (parameters): ``accumulate_grad_`` and ``ewc(model).backward()`` on a
  transformer-shaped parameter set (about a dozen blocks whatever P, so per-tensor overheads do
  not change with P), two registered tasks, ``.grad`` already holding a gradient. Each point
  carries its memory-traffic floor, measured in the same round-robin run: the bytes the step
  must move (read theta, A, m, grad; write grad: ``3 * param bytes + 2 * storage bytes`` per
  parameter) over the bandwidth of a copy of the same number of bytes (capped at
  ``PROBE_CAP_BYTES``, beyond which a copy runs at DRAM speed whatever its size). Two series:
  float32 parameters with float32 storage, and bfloat16 parameters with bfloat16 storage (the one
  a 1B-parameter model fits in on a small machine). Where ``"auto"`` chose another backend, the
  same step on ``backend="torch"`` (a regularizer registered with the same tasks), timed in a
  round-robin of its own right after. A point that does not fit the memory budget is recorded as
  skipped, with the memory it would need.
* **Registration against P**: seconds and extra peak resident memory of the first
  ``register_task`` (a copy into the buffers) and of the second (the float64 merge, chunked), the
  memory the regularizer keeps, and the extra peak of the first step (binding) and of
  forward+backward. The Fisher dicts given to ``register_task`` are broadcast views (one row per
  tensor, expanded) and the anchors are the parameters themselves, so the caller's side costs
  nothing and the figures are the regularizer's own.
* **Penalty against T** (registered tasks, ``mode="separate"``): tasks are collapsed at
  registration, so the step should not depend on T.
* **Fisher against N and against width**: :func:`fastewc.estimate_fisher` on an MLP
  ``in-W-W-10``, ``method="rules"`` and ``"vmap"``, with a fixed ``max_memory``; seconds per
  sample and extra peak resident memory for each point.

Peak memory is the resident high-water mark (VmHWM, reset through /proc/self/clear_refs) over
the resident memory before the call: for the penalty points with glibc's allocator left as it
is (the registration is timed in the same call), for the Fisher points through
:func:`fastewc.bench.timing.peak_extra_memory`; None where the kernel does not allow the reset.

On a machine shared with other jobs, run with one torch thread (``torch.set_num_threads(1)``,
``bench_scale.py --threads 1``): with more, a parallel region waits for any thread another
process has descheduled, and the many small regions of a blocked step multiply that wait.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from fastewc import EWCInputError, EWCRegularizer, estimate_fisher
from fastewc._utils import available_memory
from fastewc.bench import timing
from fastewc.bench.models import transformer_like
from scale_report import row, summarize

PENALTY_SIZES = (1e6, 1e7, 1e8, 1e9)
QUICK_SIZES = (1e5, 3e5)
TASK_COUNTS = (1, 4, 16, 64)
FISHER_SAMPLES = (64, 256, 1024, 4096)
FISHER_WIDTHS = (128, 512, 2048)
FISHER_METHODS = ("rules", "vmap")
FISHER_MAX_MEMORY = 64 * 2**20
# The two penalty series: (name, parameter dtype, storage dtype).
SERIES = (("fp32", torch.float32, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16))
# Largest copy the bandwidth probe makes (source + destination bytes). Beyond the caches a copy
# runs at DRAM bandwidth whatever its size; the cap keeps the probe from adding gigabytes to the
# largest points.
PROBE_CAP_BYTES = 512 * 2**20
LAMBDA = 1000.0


# -- memory helpers -------------------------------------------------------------------------------
def resident_bytes() -> int | None:
    """The process's resident memory (VmRSS) after a garbage collection and a heap trim, so that
    freed blocks glibc keeps cached do not count; None where /proc is unavailable."""
    gc.collect()
    libc = timing.glibc()
    if libc is not None:
        libc.malloc_trim(0)
    kb = timing.proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def _timed_peak(fn: Callable[[], object]) -> tuple[float, int | None]:
    """Seconds of one call of ``fn`` and its extra peak resident memory (bytes or None): the
    resident high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident memory
    after a collection and a heap trim. Unlike :func:`fastewc.bench.timing.peak_extra_memory` this
    leaves glibc's mmap threshold alone, so the time is that of an ordinary call, not one whose
    every chunk-sized temporary is a fresh mapping."""
    base = resident_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        base = None
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    hwm = timing.proc_status_kb("VmHWM")
    return seconds, None if base is None or hwm is None else max(0, hwm * 1024 - base)


def _minor_faults() -> int | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def _load() -> float | None:
    """The 1-minute load average (other processes competing for the cores), where known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _gb(x: int | float | None) -> float | None:
    return None if x is None else x / 1e9


# -- the parameter set ----------------------------------------------------------------------------
def scale_model(params: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformer-shaped parameter set of about ``params`` parameters in ``dtype`` on the CPU,
    about 12 blocks whatever the size (width grows as sqrt(params)). Built on the meta device and
    materialised once in ``dtype`` (no float32 copy of a bfloat16 model), filled with small
    uniform values tensor by tensor."""
    d = max(64, 64 * round(math.sqrt(params / 150) / 64))
    with torch.device("meta"):
        model = transformer_like(params, d_model=d, vocab=8 * d)
    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    return model


def _row_fisher(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A Fisher-like tensor shaped like ``p`` that costs one row: random in [0, 1), broadcast."""
    row = torch.rand(p.shape[-1], generator=gen).to(p.dtype)
    return row.expand(p.shape)


def _task_dicts(model: nn.Module, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fisher = {n: _row_fisher(p, gen) for n, p in model.named_parameters()}
        anchor = {n: p.detach() for n, p in model.named_parameters()}
    return fisher, anchor


def _fill_grads(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3)


def floor_bytes_per_param(param_dtype: torch.dtype, storage_dtype: torch.dtype) -> int:
    """Bytes a penalty step must move per parameter: read theta, A, m, grad; write grad."""
    pb = torch.finfo(param_dtype).bits // 8
    sb = torch.finfo(storage_dtype).bits // 8
    return 3 * pb + 2 * sb


def penalty_need_bytes(params: float, param_dtype: torch.dtype, storage_dtype: torch.dtype) -> float:
    """Resident memory a penalty point needs: parameters, gradients, the regularizer's two
    buffers, the fresh gradients of forward+backward, the bandwidth probe."""
    pb = torch.finfo(param_dtype).bits // 8
    sb = torch.finfo(storage_dtype).bits // 8
    return params * (3 * pb + 2 * sb) + PROBE_CAP_BYTES + 256 * 2**20


def _repeats_for(params: float, quick: bool) -> int:
    if quick:
        return 3
    return max(3 if params >= 5e8 else 5, min(40, int(2e8 / params)))


def _probe(nbytes: int) -> tuple[Callable[[], object], int]:
    numel = max(1024, min(nbytes, PROBE_CAP_BYTES) // 8)  # float32: 4 bytes read + 4 written
    return timing.copy_case(numel)


def _move_away(model: nn.Module) -> None:
    """Move theta away from the anchors just registered (the parameters themselves), so that the
    step computes a non-zero gradient."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)


def _speed_rows(med: dict[str, float], P: int, floor: float) -> list[dict]:
    return [{"method": k, "median_ms": 1e3 * t, "ns_per_param": 1e9 * t / P, "ratio_to_floor": t / floor}
            for k, t in med.items()]


# -- penalty against P ----------------------------------------------------------------------------
def penalty_point(params: float, param_dtype: torch.dtype, storage_dtype: torch.dtype, *, repeats: int,
                  say: Callable[[str], None]) -> dict:
    """One point of the P curve (see the module docstring); the model is freed before returning."""
    model = scale_model(params, param_dtype)
    P = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    _fill_grads(model)
    fb = floor_bytes_per_param(param_dtype, storage_dtype)
    out = {"params": P, "tensors": n_tensors, "param_dtype": str(param_dtype), "storage_dtype": str(storage_dtype),
           "floor_bytes_per_param": fb, "repeats": repeats}
    say(f"scale: penalty {P / 1e6:.1f}M parameters ({out['param_dtype']} params, {out['storage_dtype']} storage): "
        f"registering")

    ewc = EWCRegularizer(LAMBDA, storage_dtype=storage_dtype)
    base = resident_bytes()
    fisher, anchor = _task_dicts(model, seed=1)
    t1, peak1 = _timed_peak(lambda: ewc.register_task(fisher, anchor, model=model))
    fisher = anchor = None  # the views go; the lambdas above are done with them
    held = resident_bytes()
    held = None if held is None or base is None else held - base
    fisher, anchor = _task_dicts(model, seed=2)
    t2, peak2 = _timed_peak(lambda: ewc.register_task(fisher, anchor, model=model))
    fisher = anchor = None
    _move_away(model)
    _, bind_peak = _timed_peak(lambda: ewc.accumulate_grad_(model))
    _, fb_peak = _timed_peak(lambda: ewc(model).backward())
    peaks = [p for p in (peak1, None if held is None or peak2 is None else held + peak2,
                         None if held is None or bind_peak is None else held + bind_peak) if p is not None]
    sb = torch.finfo(storage_dtype).bits // 8
    out["register"] = {
        "first_s": t1, "merge_s": t2, "first_ns_per_param": 1e9 * t1 / P, "merge_ns_per_param": 1e9 * t2 / P,
        "first_peak_extra_GB": _gb(peak1), "merge_peak_extra_GB": _gb(peak2), "held_GB": _gb(held),
        "buffers_GB": 2 * sb * P / 1e9, "bind_peak_extra_GB": _gb(bind_peak),
        "fwd_bwd_peak_extra_GB": _gb(fb_peak),
        # the most the regularizer had resident at once beyond the model and its gradients, over
        # both registrations and the first accumulate_grad_ (forward+backward's fresh gradients,
        # one parameter-sized set that autograd then adds into .grad, are reported apart)
        "regularizer_peak_GB": _gb(max(peaks)) if peaks else None,
    }

    copy, copy_bytes = _probe(fb * P)
    cases = {"copy (bandwidth probe)": copy,
             "accumulate_grad_": lambda: ewc.accumulate_grad_(model),
             "fwd+bwd": lambda: ewc(model).backward()}
    say(f"scale: penalty {P / 1e6:.1f}M: timing, {repeats} rounds")
    out["load_average_before"], faults = _load(), _minor_faults()
    times = timing.time_side_by_side(cases, repeats=repeats, warmup=1)
    out["load_average_after"] = _load()
    out["minor_page_faults_while_timing"] = None if faults is None else _minor_faults() - faults
    med = {k: timing.median(v) for k, v in times.items()}
    bandwidth = copy_bytes / med.pop("copy (bandwidth probe)")
    floor = fb * P / bandwidth
    backends = ewc.active_backends
    out.update({"backend": "+".join(backends), "probe_bytes": copy_bytes,
                "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": 1e3 * floor,
                "floor_ns_per_param": 1e9 * floor / P, "rows": _speed_rows(med, P, floor), "raw_seconds": times})
    if backends != ("torch",):
        # The PyTorch backend beside the one "auto" chose, timed in a round-robin of its own after
        # the main one (with its own copy probe): interleaved, its many fresh per-tensor gradients
        # would change how the allocator and the kernel's page cache serve the chosen backend's.
        # Its regularizer is registered afresh with the same tasks once the first is freed, not
        # loaded from the first's state_dict: a load copies the buffers, and two regularizers'
        # buffers at once (4 GB more at 1B parameters in bf16) would not fit the memory this
        # point was sized for.
        del cases, ewc
        resident_bytes()
        on_torch = EWCRegularizer(LAMBDA, storage_dtype=storage_dtype, backend="torch")
        for seed in (1, 2):
            on_torch.register_task(*_task_dicts(model, seed=seed), model=model)
        _move_away(model)
        torch_cases = {"copy (bandwidth probe)": copy,
                       "accumulate_grad_ [torch]": lambda: on_torch.accumulate_grad_(model),
                       "fwd+bwd [torch]": lambda: on_torch(model).backward()}
        say(f"scale: penalty {P / 1e6:.1f}M: timing the PyTorch backend, {repeats} rounds")
        times = timing.time_side_by_side(torch_cases, repeats=repeats, warmup=1)
        med = {k: timing.median(v) for k, v in times.items()}
        floor_torch = fb * P / (copy_bytes / med.pop("copy (bandwidth probe)"))  # this round's own floor
        out["rows"] += _speed_rows(med, P, floor_torch)
        out["torch_backend_floor_ms"] = 1e3 * floor_torch
        out["raw_seconds_torch_backend"] = times
    return out  # the model, the regularizer and the probe go with this frame


def penalty_curve(sizes=PENALTY_SIZES, series=SERIES, *, quick: bool = False, memory_budget: float | None = None,
                  say: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Every (series, P) point; the ones that would not fit ``memory_budget`` bytes (default: 90%
    of the memory available now) are recorded with ``skipped`` and the memory they would need."""
    points = []
    for name, pdt, sdt in series:
        for P in sizes:
            need = penalty_need_bytes(P, pdt, sdt)
            budget = memory_budget if memory_budget is not None else 0.9 * available_memory("cpu")
            row = {"series": name, "params_requested": int(P), "param_dtype": str(pdt), "storage_dtype": str(sdt)}
            if need > budget:
                row["skipped"] = (f"needs about {need / 1e9:.1f} GB (parameters, gradients, 2 buffers, forward+"
                                  f"backward's fresh gradients), over the {budget / 1e9:.1f} GB budget")
                say(f"scale: penalty {P / 1e6:.0f}M {name}: skipped, {row['skipped']}")
            else:
                row.update(penalty_point(P, pdt, sdt, repeats=_repeats_for(P, quick), say=say))
                resident_bytes()  # collect and trim before the next point
            points.append(row)
    return points


def penalty_spread(sizes=(1e6,), series=SERIES, *, runs: int = 10,
                   say: Callable[[str], None] = lambda m: None) -> dict:
    """The penalty points of ``sizes`` measured ``runs`` times over, each run a fresh
    :func:`penalty_point` with its own floor: how far one run's ratio to the floor can be
    trusted on this machine (at small P the floor itself moves from run to run). Returns the
    runs' ratios per (series, P) and their minimum, median, maximum and the count under 2x."""
    points = []
    for name, pdt, sdt in series:
        for P in sizes:
            ratios, floors = [], []
            for r in range(runs):
                say(f"scale spread: {name} {P / 1e6:g}M, run {r + 1} of {runs}")
                pt = penalty_point(P, pdt, sdt, repeats=_repeats_for(P, False), say=lambda m: None)
                ratios.append(row(pt, "accumulate_grad_")["ratio_to_floor"])
                floors.append(pt["floor_ms"])
                resident_bytes()
            ordered = sorted(ratios)
            points.append({"series": name, "params": pt["params"], "tensors": pt["tensors"], "runs": runs,
                           "accumulate_ratio_to_floor": ratios, "floor_ms": floors,
                           "min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1],
                           "under_2x": sum(x <= 2.0 for x in ratios)})
    return {"benchmark": "scale-spread", "device": "cpu", "machine": timing.machine_info("cpu"), "points": points}


# -- penalty against T ----------------------------------------------------------------------------
def task_curve(params: float = 1e7, tasks=TASK_COUNTS, *, repeats: int = 15,
               say: Callable[[str], None] = lambda m: None) -> dict:
    """The step against the number of registered tasks (separate mode, float32), side by side:
    one regularizer per T on the same model, registered with the same first tasks."""
    torch.manual_seed(0)
    model = scale_model(params, torch.float32)
    P = sum(p.numel() for p in model.parameters())
    _fill_grads(model)
    regs = {T: EWCRegularizer(LAMBDA) for T in tasks}
    reg_seconds = {T: 0.0 for T in tasks}
    say(f"scale: tasks, {P / 1e6:.1f}M parameters, registering up to {max(tasks)} tasks")
    for t in range(max(tasks)):
        with torch.no_grad():
            fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
            anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
        for T, reg in regs.items():
            if t < T:
                t0 = time.perf_counter()
                reg.register_task(fisher, anchor, model=model)
                reg_seconds[T] += time.perf_counter() - t0
        del fisher, anchor
    copy, copy_bytes = _probe(20 * P)
    cases = {"copy (bandwidth probe)": copy}
    for T, reg in regs.items():
        cases[f"T={T} accumulate_grad_"] = lambda reg=reg: reg.accumulate_grad_(model)
        cases[f"T={T} fwd+bwd"] = lambda reg=reg: reg(model).backward()
    say(f"scale: tasks, timing {len(cases) - 1} cases, {repeats} rounds")
    load = _load()
    times = timing.time_side_by_side(cases, repeats=repeats, warmup=1)
    med = {k: timing.median(v) for k, v in times.items()}
    bandwidth = copy_bytes / med.pop("copy (bandwidth probe)")
    floor = 20 * P / bandwidth
    rows = []
    for T in tasks:
        acc, fwd = med[f"T={T} accumulate_grad_"], med[f"T={T} fwd+bwd"]
        rows.append({"tasks": T, "accumulate_ms": 1e3 * acc, "fwd_bwd_ms": 1e3 * fwd,
                     "accumulate_vs_T1": acc / med[f"T={tasks[0]} accumulate_grad_"],
                     "fwd_bwd_vs_T1": fwd / med[f"T={tasks[0]} fwd+bwd"],
                     "accumulate_ratio_to_floor": acc / floor, "register_s_per_task": reg_seconds[T] / T})
    return {"params": P, "storage_dtype": "torch.float32", "repeats": repeats, "copy_bandwidth_GBps": bandwidth / 1e9,
            "floor_ms": 1e3 * floor, "load_average_before": load, "load_average_after": _load(), "rows": rows,
            "raw_seconds": times}


# -- Fisher against N and width -------------------------------------------------------------------
def fisher_mlp(width: int, inputs: int = 256, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def _fisher_data(n: int, inputs: int = 256, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, inputs, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def fisher_point(width: int, n: int, methods=FISHER_METHODS, *, repeats: int = 2,
                 max_memory: int = FISHER_MAX_MEMORY) -> list[dict]:
    torch.manual_seed(0)
    model = fisher_mlp(width).eval()
    data = _fisher_data(n)
    P = sum(p.numel() for p in model.parameters())
    cases = {m: (lambda m=m: estimate_fisher(model, data, method=m, max_memory=max_memory)) for m in methods}
    times = timing.time_side_by_side(cases, repeats=repeats, warmup=1)
    rows = []
    for m, fn in cases.items():
        _, peak = timing.peak_extra_memory(fn)
        t = timing.median(times[m])
        rows.append({"width": width, "samples": n, "params": P, "method": m, "seconds": t,
                     "us_per_sample": 1e6 * t / n, "peak_extra_MB": None if peak is None else peak / 2**20,
                     "max_memory_MB": max_memory / 2**20})
    return rows


def fisher_curve(samples=FISHER_SAMPLES, widths=FISHER_WIDTHS, *, width_for_n: int = 512, n_for_width: int = 512,
                 methods=FISHER_METHODS, repeats: int = 2, max_memory: int = FISHER_MAX_MEMORY,
                 say: Callable[[str], None] = lambda m: None) -> dict:
    by_n, by_width = [], []
    for n in samples:
        say(f"scale: Fisher, width {width_for_n}, N = {n}")
        by_n.extend(fisher_point(width_for_n, n, methods, repeats=repeats, max_memory=max_memory))
    for w in widths:
        say(f"scale: Fisher, width {w}, N = {n_for_width}")
        by_width.extend(fisher_point(w, n_for_width, methods, repeats=repeats, max_memory=max_memory))
    return {"model": "MLP 256-W-W-10, batches of 64, kind='empirical'", "max_memory_MB": max_memory / 2**20,
            "repeats": repeats, "by_samples": by_n, "by_width": by_width}


# -- everything -----------------------------------------------------------------------------------
def scale_benchmark(*, quick: bool = False, sizes=None, tasks=None, task_params: float | None = None,
                    fisher_samples=None, fisher_widths=None, memory_budget: float | None = None,
                    progress: Callable[[str], None] | None = None) -> dict:
    """All the cost curves on the CPU (see the module docstring). ``quick``: small sizes, for a
    smoke run of a few seconds. Returns a JSON-ready dict: ``machine``, ``penalty`` (P points),
    ``tasks`` (T curve), ``fisher`` (N and width curves) and ``summary`` (the ratios the targets
    are stated in)."""
    say = progress or (lambda msg: None)
    if quick:
        sizes = sizes or QUICK_SIZES
        tasks = tasks or (1, 4)
        task_params = task_params or 1e5
        fisher_samples = fisher_samples or (64, 128)
        fisher_widths = fisher_widths or (32, 64)
    sizes = tuple(sizes or PENALTY_SIZES)
    tasks = tuple(tasks or TASK_COUNTS)
    if not sizes or min(sizes) < 1 or not tasks or min(tasks) < 1:
        raise EWCInputError(f"sizes and task counts must be >= 1; got {sizes}, {tasks}")
    task_params = task_params or 1e7
    torch.manual_seed(0)
    out = {"benchmark": "scale", "device": "cpu", "machine": timing.machine_info("cpu"), "quick": quick,
           "start_resident_GB": _gb(resident_bytes())}
    t0 = time.perf_counter()
    out["penalty"] = penalty_curve(sizes, quick=quick, memory_budget=memory_budget, say=say)
    out["tasks"] = task_curve(task_params, tasks, repeats=3 if quick else 15, say=say)
    out["fisher"] = fisher_curve(tuple(fisher_samples or FISHER_SAMPLES), tuple(fisher_widths or FISHER_WIDTHS),
                                 width_for_n=64 if quick else 512, n_for_width=64 if quick else 512,
                                 repeats=1 if quick else 2, say=say)
    out["seconds"] = time.perf_counter() - t0
    hwm = timing.proc_status_kb("VmHWM")
    out["process_peak_resident_GB"] = None if hwm is None else hwm * 1024 / 1e9
    out["summary"] = summarize(out)
    return out
