"""CPU benchmark of the EWC penalty: fastewc against the reference loop.

A transformer-shaped parameter set (about 25M parameters in about 100 tensors), 3 registered
tasks, float32. Every case starts with ``.grad`` already holding the task gradient, as in a
training step, and adds the penalty's gradient into it:

* reference loop, forward+backward: ``fastewc.reference.ReferenceEWC`` (the original code's
  per-task, per-parameter loop), ``ewc(model).backward()``;
* the same loop with ``torch._foreach`` ops per task;
* fastewc forward+backward: ``EWCRegularizer(model).backward()``;
* fastewc accumulate_grad_: ``EWCRegularizer.accumulate_grad_(model)``;
* the same two with ``backend="torch"`` where ``"auto"`` chose another backend (on a CPU: the
  fused C kernel), the stock-ops twin.

What the penalty adds to a whole training step, both ways, is ``bench_step_overhead.py``.

The memory-traffic floor is 20 bytes per parameter (read theta, F, anchor, grad; write grad) over
the copy bandwidth measured in the same run. Cases run round-robin; medians are reported. The
cases are ``fastewc.bench.penalty_benchmark``'s (also behind ``fastewc bench``).

    python benchmarks/bench_penalty.py [--params 25e6] [--tasks 3] [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse

from fastewc.bench import timing
from fastewc.bench.penalty import format_penalty, penalty_benchmark
from results_path import results_path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/penalty_cpu.json")
    args = ap.parse_args(argv)
    payload = penalty_benchmark(device="cpu", params=args.params, tasks=args.tasks, repeats=args.repeats)
    payload["benchmark"] = "penalty_cpu"
    print(format_penalty(payload))
    path = args.json or results_path("penalty_cpu.json")
    print(f"\nwrote {timing.write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    main()
