"""CPU benchmark of the EWC penalty: fastewc against the reference loop.

A transformer-shaped parameter set (about 25M parameters in about 100 tensors), 3 registered
tasks, float32. Every case starts with ``.grad`` already holding the task gradient, as in a
training step, and adds the penalty's gradient into it:

* reference loop, forward+backward: ``fastewc.reference.ReferenceEWC`` (the original code's
  per-task, per-parameter loop), ``ewc(model).backward()``;
* fastewc forward+backward: ``EWCRegularizer(model).backward()``;
* fastewc accumulate_grad_: ``EWCRegularizer.accumulate_grad_(model)``;
* the same two with ``backend="torch"`` where ``"auto"`` chose another backend (on a CPU: the
  fused C kernel), the stock-ops twin.

What the penalty adds to a whole training step, both ways, is ``bench_step_overhead.py``.

The memory-traffic floor is 20 bytes per parameter (read theta, F, anchor, grad; write grad) over
the copy bandwidth measured in the same run. Cases run round-robin; medians are reported.

    python benchmarks/bench_penalty.py [--params 25e6] [--tasks 3] [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastewc import EWCRegularizer
from fastewc.bench import timing
from fastewc.bench.models import transformer_like
from fastewc.reference import ReferenceEWC


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/penalty_cpu.json")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = transformer_like(args.params)
    P = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    ref, ewc, on_torch = ReferenceEWC(1000.0), EWCRegularizer(1000.0), EWCRegularizer(1000.0, backend="torch")
    for _ in range(args.tasks):
        fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
        ref.register_task(fisher, anchor)
        ewc.register_task(fisher, anchor)
        on_torch.register_task(fisher, anchor)
    del fisher, anchor
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # the task gradient the penalty's gradient is added to

    ewc(model)  # bind, to name the backend "auto" chose
    backend = "+".join(ewc.active_backends)

    copy, copy_bytes = timing.copy_case(P)
    cases = {
        "copy (bandwidth probe)": copy,
        "reference loop fwd+bwd": lambda: ref(model).backward(),
        f"fastewc fwd+bwd [{backend}]": lambda: ewc(model).backward(),
        f"fastewc accumulate_grad_ [{backend}]": lambda: ewc.accumulate_grad_(model),
    }
    if backend != "torch":
        cases["fastewc fwd+bwd [torch]"] = lambda: on_torch(model).backward()
        cases["fastewc accumulate_grad_ [torch]"] = lambda: on_torch.accumulate_grad_(model)
    times = timing.time_side_by_side(cases, repeats=args.repeats)
    med = {k: timing.median(v) for k, v in times.items()}
    bandwidth = copy_bytes / med.pop("copy (bandwidth probe)")
    floor = 20 * P / bandwidth
    ref_t = med["reference loop fwd+bwd"]

    rows = []
    for name, t in med.items():
        rows.append({"method": name, "median_ms": 1e3 * t, "speedup_vs_reference": ref_t / t,
                     "ratio_to_floor": t / floor, "effective_GBps": 20 * P / t / 1e9})
    print(f"\nEWC penalty, CPU: {P / 1e6:.1f}M parameters in {n_tensors} tensors, {args.tasks} tasks, float32")
    print(f"{timing.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> floor (20 B/param) {1e3 * floor:.1f} ms; "
          f"{args.repeats} round-robin repeats, medians\n")
    print(f"| {'method':<36} | {'median ms':>9} | {'speed-up vs loop':>16} | {'x floor':>7} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 18}|{'-' * 9}|")
    for r in rows:
        print(f"| {r['method']:<36} | {r['median_ms']:>9.1f} | {r['speedup_vs_reference']:>15.1f}x | "
              f"{r['ratio_to_floor']:>6.2f}x |")
    payload = {
        "benchmark": "penalty_cpu", "machine": timing.machine_info(), "params": P, "tensors": n_tensors,
        "tasks": args.tasks, "repeats": args.repeats, "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms": 1e3 * floor, "rows": rows, "raw_seconds": times,
    }
    path = args.json or f"benchmarks/results/{timing.machine_slug()}/penalty_cpu.json"
    print(f"\nwrote {timing.write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    sys.exit(main() and 0)
