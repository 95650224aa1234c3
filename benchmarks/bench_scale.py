"""Cost curves on the CPU: the EWC penalty step against P (1M to 1B parameters) and against the
number of registered tasks, registration time and memory against P, and Fisher estimation
against N and model width. What each curve measures is described in ``scale_curves.py``; the
tables come from ``scale_report.py`` and the figure from ``plot_results.py`` (which also redraws
it from a saved JSON: ``python benchmarks/plot_results.py scale RESULT.json FIGURE.png``).

Prints the tables, writes the JSON and the figure:

    python benchmarks/bench_scale.py [--quick] [--sizes 1e6,1e7,1e8,1e9] [--memory-budget-gb 13]
        [--threads N] [--json PATH] [--plot PATH]
    python benchmarks/bench_scale.py --spread 10 [--sizes 1e6] [--threads N] [--json PATH]

``--spread R`` measures only the penalty points of ``--sizes`` (default 1M), R times each, and
reports the spread of ``accumulate_grad_``'s ratio to the floor over the runs (default JSON:
``benchmarks/results/<machine>/scale_spread_cpu.json``).

Defaults: ``benchmarks/results/<machine>/scale_cpu.json`` and ``docs/scale_cpu.png``. Points that
would not fit the memory budget (default: 90% of the memory available at the start) are
recorded as skipped, with the memory they would need. The largest points take minutes and
gigabytes: run them once, on an otherwise quiet machine if you can.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastewc.bench import timing
from results_path import results_path

import scale_curves
import scale_report
from plot_results import label_of, plot_scale


def _sizes(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    ap.add_argument("--sizes", type=_sizes, default=None, help="penalty sizes in parameters, e.g. 1e6,1e7")
    ap.add_argument("--memory-budget-gb", type=float, default=None,
                    help="skip penalty points needing more than this (default: 90%% of available memory)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/scale_cpu.json")
    ap.add_argument("--plot", default=None, help="default: docs/scale_cpu.png (not written with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice). On a machine shared with other jobs, 1 keeps "
                         "a parallel region from waiting for a thread that another process has descheduled")
    ap.add_argument("--spread", type=int, default=None, metavar="R",
                    help="only the penalty points of --sizes (default 1M), R runs each: the spread of the ratio")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.spread is not None:
        spread = scale_curves.penalty_spread(args.sizes or (1e6,), runs=args.spread,
                                      say=lambda msg: print(f"[bench_scale] {msg}", file=sys.stderr, flush=True))
        print(scale_report.format_spread(spread))
        print(f"\nwrote {timing.write_json(args.json or results_path('scale_spread_cpu.json'), spread)}")
        return spread

    result = scale_curves.scale_benchmark(
        quick=args.quick, sizes=args.sizes,
        memory_budget=None if args.memory_budget_gb is None else args.memory_budget_gb * 1e9,
        progress=lambda msg: print(f"[bench_scale] {msg}", file=sys.stderr, flush=True))
    m = result["machine"]
    print(f"Scale, CPU: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads), torch {m['torch']}\n")
    print(scale_report.format_scale(result))
    path = args.json or (None if args.quick else results_path("scale_cpu.json"))
    if path:
        print(f"\nwrote {timing.write_json(path, result)}")
    plot = args.plot or (None if args.quick else "docs/scale_cpu.png")
    if plot:
        print(f"wrote {plot_scale(result, plot, label=label_of(result))}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
