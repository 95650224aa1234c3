"""Where a tracked step's extra time goes: the fused kernel, the tracker's other work, and the rest.

For each model and fraction, on the problems of ``bench_tracker.py`` (same batches, SGD at
learning rate 0, eval mode), plain and tracked epochs run alternately; during the tracked ones
the tracker's own entry points are timed from the outside (its forward hooks, its gradient hooks,
the end-of-backward callback, the one-sample probe; nested calls counted once) and, within them,
the fused CPU kernel of the Linear rule (with its FLOPs, so its speed in the step). What remains
of the tracked epoch's extra time is the model's own operations running slower beside the
tracker (caches, the autograd engine calling the hooks). Percentages are of the plain epoch.

    python benchmarks/bench_tracker_breakdown.py [--models bert,transformer] [--epochs 5]

Prints a table and writes ``benchmarks/results/<machine>/tracker_breakdown_cpu.json``. Timing
wrappers are installed on the classes for the run and removed after it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import torch
import torch.nn.functional as F

from fastewc import FisherTracker
from fastewc.bench.models import HF_MODELS, fisher_problem, hf_problem
from fastewc.bench.timing import machine_info, median, write_json
from fastewc.fisher import tracked_step
from fastewc.fisher.rules import outer_cpu
from results_path import results_path

# the tracker's entry points: whatever it does in a step runs inside one of them
ENTRY_POINTS = ("_pre_hook", "_on_grad", "_on_loss_grad", "_finish", "_table_grads", "_post_hook")
HOOK_FACTORIES = ("_rule_hook", "_local_hook")


class _Clock:
    """Seconds spent in the tracker (outermost entry point only) and in the kernel, with its FLOPs."""

    def __init__(self):
        self.tracker = self.kernel = self.flop = 0.0
        self.depth = 0

    def timed(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.tracker += time.perf_counter() - t
                self.depth -= 1
        return run

    def kernel_timed(self, fn):
        @functools.wraps(fn)
        def run(kernel, G, A, total, *args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(kernel, G, A, total, *args, **kwargs)
            finally:
                self.kernel += time.perf_counter() - t
                picks = kwargs.get("picks")
                n = picks.numel() if picks is not None else G.shape[0]
                self.flop += 2 * n * G.shape[1] * G.shape[2] * (A.shape[2] if total is not None else 1)
        return run


@contextlib.contextmanager
def _instrumented(clock: _Clock):
    saved = []

    def replace(owner, name, new):
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, new)

    hooks = tracked_step._StepHooks
    owners = {name: next(c for c in FisherTracker.__mro__ if name in c.__dict__) for name in ENTRY_POINTS}
    for name, owner in owners.items():
        replace(owner, name, clock.timed(owner.__dict__[name]))
    for name in HOOK_FACTORIES:
        factory = hooks.__dict__[name]
        replace(hooks, name, lambda self, key, factory=factory: clock.timed(factory(self, key)))
    replace(outer_cpu.OuterKernel, "__call__", clock.kernel_timed(outer_cpu.OuterKernel.__call__))
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):
            setattr(owner, name, old)


def _problem(name: str, samples: int, hf_samples: int):
    if name in HF_MODELS:
        model, data = hf_problem(name, n=hf_samples, batch_size=16)
        return model.eval(), data, (lambda b: model(**b).loss), None
    model, data = fisher_problem(name, n=samples, batch_size=64)
    params = (lambda k, p: p.requires_grad and k != "pos") if name == "transformer" else None
    return model, data, (lambda b: F.cross_entropy(model(b[0]), b[1])), params


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bert,transformer")
    ap.add_argument("--fractions", default="1,0.25")
    ap.add_argument("--epochs", type=int, default=5, help="plain and tracked epochs timed, alternately")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--hf-samples", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model, data, loss_of, params = _problem(name, args.samples, args.hf_samples)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)

        def epoch():
            for b in data:
                opt.zero_grad()
                loss_of(b).backward()
                opt.step()

        for fraction in (float(f) for f in args.fractions.split(",")):
            clock = _Clock()
            with _instrumented(clock):
                tracker = FisherTracker(model, params=params, fraction=fraction)
                plain, tracked = [], []
                for k in range(args.epochs + 1):  # the first of each is a warm-up
                    t = time.perf_counter()
                    epoch()
                    plain.append(time.perf_counter() - t)
                    if k == 1:
                        clock.tracker = clock.kernel = clock.flop = 0.0
                    t = time.perf_counter()
                    with tracker:
                        epoch()
                    tracked.append(time.perf_counter() - t)
            p, t = median(plain[1:]), median(tracked[1:])
            kernel, other = clock.kernel / args.epochs, (clock.tracker - clock.kernel) / args.epochs
            rows.append({"model": name, "fraction": fraction, "plain_s": p, "tracked_s": t, "kernel_s": kernel,
                         "kernel_gflops": clock.flop / clock.kernel / 1e9 if clock.kernel else None,
                         "tracker_other_s": other, "rest_s": (t - p) - kernel - other})
            print(f"done {name} {fraction}", flush=True)
    print(f"\n{'model':12} {'fraction':>8} {'plain s':>8} {'x plain':>8} {'kernel':>7} {'GFLOP/s':>8} "
          f"{'tracker':>8} {'rest':>6}   (kernel, tracker's other work, rest: % of the plain epoch)")
    for r in rows:
        p = r["plain_s"]
        gf = f"{r['kernel_gflops']:8.0f}" if r["kernel_gflops"] else f"{'-':>8}"
        print(f"{r['model']:12} {r['fraction']:8.2f} {p:8.3f} {r['tracked_s'] / p:8.2f} {100 * r['kernel_s'] / p:6.1f}% "
              f"{gf} {100 * r['tracker_other_s'] / p:7.1f}% {100 * r['rest_s'] / p:5.1f}%")
    result = {"machine": machine_info("cpu"), "epochs": args.epochs, "rows": rows,
              "note": "tracked epochs timed alternately with plain ones (first of each a warm-up); kernel and "
                      "tracker seconds are per epoch, timed inside the tracked epochs"}
    path = write_json(args.json or results_path("tracker_breakdown_cpu.json"), result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
