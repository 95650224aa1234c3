"""GPU benchmark of the EWC penalty step: Triton kernels against every baseline, at 10M-1B params.

For each size P (transformer-shaped parameter sets, float32 parameters, 3 registered tasks) and
storage dtype (float32, bfloat16), every case adds the penalty's gradient into an existing
``.grad`` (as in a training step):

* ``reference loop``: ``fastewc.reference.ReferenceEWC`` (the original code's per-task,
  per-parameter loop), ``ewc(model).backward()``;
* ``torch._foreach``: ``fastewc.bench.baselines.ForeachEWC``, ``ewc(model).backward()``;
* ``torch.compile(loop)``: ``torch.compile`` of the reference loop's forward, then backward;
* ``torch backend fwd+bwd`` / ``torch backend accumulate_grad_``: ``EWCRegularizer(backend="torch")``;
* ``triton fwd+bwd`` / ``triton accumulate_grad_``: ``EWCRegularizer(backend="triton")``.

The baselines keep per-task float32 copies like the original code, so they run only with float32 storage.

Timing: CUDA events around each call, warm-up calls first (they
also compile), the L2 cache flushed before every timed call by writing a 512 MiB buffer, median
of ``--repeats``. ``GB/s`` is the floor traffic of the step -- read theta, A, m and grad, write
grad: 4 + 2 * storage bytes + 8 bytes per parameter (20 B with float32 storage) -- over the
median time, the same byte count for every case, so it reads as "effective bandwidth".
``% copy`` divides it by the device-to-device copy bandwidth measured in the same run (a 1 GiB
copy, read + write bytes). Targets: ``triton accumulate_grad_`` >= 85% of copy at
P >= 100M, >= 1.5x faster than ``torch.compile(loop)``, >= 30x faster than the loop.

    python benchmarks/bench_penalty_gpu.py [--sizes 10e6,100e6,1e9] [--repeats 20] [--no-compile]
    python benchmarks/bench_penalty_gpu.py --dry-run   # tiny sizes on the CPU: checks the script

Writes ``benchmarks/results/<gpu slug>/penalty_gpu.json`` (or ``--json PATH``) and prints a
markdown table. ``--dry-run`` runs tiny sizes on the CPU with host timers (Triton only when the
interpreter is enabled with TRITON_INTERPRET=1), to check that the script runs end to end.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable

import torch

import fastewc.penalty.backends as backends
from fastewc import EWCRegularizer
from fastewc.bench import timing
from fastewc.bench.baselines import ForeachEWC, compiled_reference
from fastewc.bench.models import transformer_like
from fastewc.reference import ReferenceEWC
from results_path import results_path

LAMBDA = 1000.0
STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shape_for(params: float) -> tuple[int, int]:
    """``(d_model, vocab)`` of a transformer-like mix at ``params``: ~10-25 blocks of 12 tensors
    each at the GPU sizes; a toy width for the dry run's tiny sizes."""
    if params <= 1e5:
        return 32, 200
    for width, upto in ((256, 3e6), (512, 30e6), (1024, 300e6)):
        if params <= upto:
            return width, 8000
    return 2048, 8000


class Timer:
    """Median seconds per call: CUDA events and an L2 flush on a GPU, host clock on the CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.flush = torch.empty(1 << 27, dtype=torch.float32, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        timing.sync(self.device)
        times = []
        for _ in range(self.repeats):
            if self.flush is None:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                continue
            self.flush.zero_()  # evict theta, A, m, grad from L2 (50 MB on an H100)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, numel: int) -> float:
    fn, nbytes = timing.copy_case(numel, device)
    return nbytes / timer(fn)


def make_tasks(model, tasks: int, seed: int = 0):
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for _ in range(tasks):
        fisher = {n: torch.rand(p.shape, generator=g, device=p.device) for n, p in model.named_parameters()}
        anchor = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g, device=p.device)
                  for n, p in model.named_parameters()}
        yield fisher, anchor


def fwd_bwd(ewc, model) -> Callable[[], None]:
    return lambda: ewc(model).backward()


def run_size(params: float, storages: list[str], *, device, timer, tasks, compile_ref, triton_ok, log) -> list[dict]:
    torch.manual_seed(0)
    d_model, vocab = shape_for(params)
    model = transformer_like(params, d_model=d_model, vocab=vocab).to(device)
    P = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # the task gradient the penalty's gradient is added to
    rows = []

    def record(case, storage, fn):
        floor_bytes = P * (4 + 2 * STORAGE[storage].itemsize + 8)
        try:
            t = timer(fn)
            row = {"case": case, "storage": storage, "seconds": t, "GB/s": floor_bytes / t / 1e9}
        except Exception as e:  # a baseline that cannot run at this size is reported, not fatal
            row = {"case": case, "storage": storage, "error": f"{type(e).__name__}: {e}"[:300]}
        row.update(params=P, tensors=n_tensors, floor_bytes=floor_bytes)
        rows.append(row)
        log(f"  P={P / 1e6:.0f}M {storage:8s} {case:28s} "
            + (f"{row['seconds'] * 1e3:9.3f} ms" if "seconds" in row else row["error"]))

    if "float32" in storages:  # the per-task baselines store float32 copies
        ref = ReferenceEWC(LAMBDA)
        for f, a in make_tasks(model, tasks):
            ref.register_task(f, a)
        record("reference loop", "float32", fwd_bwd(ref, model))
        fe = ForeachEWC(LAMBDA)
        fe.tasks = list(zip(ref.task_fishers, ref.task_params))  # share the tensors: no second copy
        record("torch._foreach", "float32", fwd_bwd(fe, model))
        del fe
        if compile_ref:
            compiled = compiled_reference(ref)
            record("torch.compile(loop)", "float32", lambda: compiled(model).backward())
            del compiled
            torch._dynamo.reset()
        del ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for storage in storages:
        names = [("torch", "torch backend")] + ([("triton", "triton")] if triton_ok else [])
        for backend, label in names:
            ewc = EWCRegularizer(LAMBDA, storage_dtype=STORAGE[storage], backend=backend)
            for f, a in make_tasks(model, tasks):
                ewc.register_task(f, a)
            record(f"{label} fwd+bwd", storage, fwd_bwd(ewc, model))
            record(f"{label} accumulate_grad_", storage, lambda ewc=ewc: ewc.accumulate_grad_(model))
            del ewc
            gc.collect()
    return rows


def table(rows: list[dict], copy_gbs: float) -> str:
    out = ["| P | tensors | storage | case | ms | GB/s | % copy | vs loop | vs compile |",
           "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if "seconds" in r and r["case"] in ("reference loop", "torch.compile(loop)"):
            base[(r["params"], r["case"])] = r["seconds"]
    for r in rows:
        if "seconds" not in r:
            out.append(f"| {r['params'] / 1e6:.0f}M | {r['tensors']} | {r['storage']} | {r['case']} | "
                       f"error: {r['error'][:60]} | | | | |")
            continue
        loop, comp = base.get((r["params"], "reference loop")), base.get((r["params"], "torch.compile(loop)"))
        vs_loop = f"{loop / r['seconds']:.1f}x" if loop else "-"
        vs_comp = f"{comp / r['seconds']:.2f}x" if comp else "-"
        out.append(
            f"| {r['params'] / 1e6:.0f}M | {r['tensors']} | {r['storage']} | {r['case']} | {r['seconds'] * 1e3:.3f} | "
            f"{r['GB/s']:.0f} | {100 * r['GB/s'] * 1e9 / copy_gbs:.0f}% | "
            f"{vs_loop} | {vs_comp} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10e6,100e6,1e9", help="comma-separated parameter counts")
    ap.add_argument("--storage", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference loop")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, 2 repeats, no torch.compile")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<gpu slug>/penalty_gpu.json")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, sizes, repeats, warmup, compile_ref = torch.device("cpu"), [3e4], 2, 1, False
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_penalty_gpu.py needs a CUDA GPU (or --dry-run)")
        device = torch.device("cuda")
        sizes = [float(s) for s in args.sizes.split(",")]
        repeats, warmup, compile_ref = args.repeats, args.warmup, not args.no_compile
    storages = args.storage.split(",")
    unknown = [s for s in storages if s not in STORAGE]
    if unknown:
        sys.exit(f"unknown --storage {unknown}; choose from {list(STORAGE)}")
    why = backends.triton_status(device)
    if why is not None:
        print(f"triton cases skipped: {why}", file=sys.stderr)

    timer = Timer(device, repeats, warmup)
    copy_numel = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB of float32 on the GPU
    copy_bps = copy_bandwidth(device, timer, copy_numel)
    print(f"copy bandwidth: {copy_bps / 1e9:.0f} GB/s", file=sys.stderr)
    rows = []
    for size in sizes:
        rows += run_size(size, storages, device=device, timer=timer, tasks=args.tasks, compile_ref=compile_ref,
                         triton_ok=why is None, log=lambda s: print(s, file=sys.stderr, flush=True))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    payload = {
        "machine": timing.machine_info(device), "device": str(device), "dry_run": args.dry_run,
        "copy_GBps": copy_bps / 1e9, "repeats": repeats, "warmup": warmup, "tasks": args.tasks,
        "timing": "CUDA events, L2 flushed before each call, median" if device.type == "cuda" else "host clock, median",
        "floor": "bytes = P * (4 + 2 * storage itemsize + 8): read theta, A, m, grad; write grad",
        "rows": rows,
    }
    path = args.json or results_path("penalty_gpu.json", device)
    timing.write_json(path, payload)
    print(table(rows, copy_bps))
    print(f"\nwrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
