"""The ``fastewc`` command (also ``python -m fastewc``): ``bench``, ``demo`` and ``info``.

Errors a user can fix (unknown device, no GPU, a size that does not fit, a missing optional
dependency) print one line naming the fix and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys

import torch

from ._utils import MissingDependencyError
from .errors import EWCInputError


def parse_count(text: str) -> float:
    """``"25M"``, ``"1.5e6"``, ``"1B"``, ``"512k"`` -> a number (for --params)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a count like 25M, 1.5e6 or 1B; got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return float(m.group(1)) * scale


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 100,1000,10000; got {text!r}")


def _stamp(machine: dict) -> str:
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cores']} cores"
    return f"{where}, torch {machine['torch']}, {_dt.date.today().isoformat()}"


def _progress(enabled: bool):
    if not enabled:
        return None
    return lambda msg: print(f"[fastewc] {msg}", file=sys.stderr, flush=True)


def cmd_bench(args) -> int:
    import importlib.util

    from . import bench
    from .bench import timing
    from .bench.models import FISHER_MODELS, HF_MODELS

    dev = bench.resolve_device(args.device)
    say = _progress(not args.quiet)
    models = tuple(m for m in args.fisher_models.split(",") if m)
    unknown = [m for m in models if m not in FISHER_MODELS + HF_MODELS]
    if unknown and args.fisher_samples > 0:  # before minutes of measuring, not after
        raise EWCInputError(f"--fisher-models: unknown {unknown}; choose from {', '.join(FISHER_MODELS + HF_MODELS)}")
    out = {"machine": timing.machine_info(dev), "date": _dt.date.today().isoformat()}
    out["penalty"] = bench.penalty_benchmark(device=dev, params=args.params, tasks=args.tasks, repeats=args.repeats,
                                             compile_reference=args.compile, progress=say)
    print(bench.format_penalty(out["penalty"]))
    if args.fisher_samples > 0:
        if any(m in HF_MODELS for m in models) and importlib.util.find_spec("transformers") is None:
            print("[fastewc] transformers is not installed (pip install 'fastewc[hf]'): the Hugging Face models "
                  "are skipped", file=sys.stderr)
            models = tuple(m for m in models if m not in HF_MODELS)
        out["fisher"] = bench.fisher_benchmark(device=dev, samples=args.fisher_samples, models=models,
                                               hf_samples=args.hf_samples, repeats=max(1, args.repeats // 5),
                                               progress=say)
        print()
        print(bench.format_fisher(out["fisher"]))
    if args.json:
        print(f"\nwrote {timing.write_json(args.json, out)}")
    return 0


class _Moved(argparse.Action):
    """An option that left ``fastewc bench`` for a script in the repository: using it stops the
    parse with a message saying where it went (argparse's own would only say "unrecognized")."""

    def __init__(self, option_strings, dest, where: str, nargs=0, **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, help=argparse.SUPPRESS, **kwargs)
        self.where = where

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is no longer part of `fastewc bench`: {self.where}")


SCALE_MOVED = ("the cost curves are `python benchmarks/bench_scale.py` in a clone of the repository "
               "(`--quick` for a smoke run of seconds, `--sizes`, `--json`, `--plot`)")
PLOT_MOVED = ("write the results with --json PATH, then draw them with "
              "`python benchmarks/plot_results.py bench PATH FIGURE.png` in a clone of the repository")


def cmd_demo(args) -> int:
    from .demo.run import DemoConfig, format_report, run_demo

    if args.merge:
        return _demo_merge(args)
    cfg = DemoConfig(benchmark=args.benchmark, scenario=args.scenario, num_tasks=args.tasks,
                     lambda_ewc=args.lambda_ewc, methods=tuple(args.methods.split(",")), lambdas=args.lambdas,
                     seed=args.seed, **_demo_sizes(args))
    if args.plot:  # fail before two minutes of training, not after
        from ._utils import require

        require("matplotlib", extra="demo")
    result = run_demo(cfg, log=_progress(not args.quiet) or (lambda msg: None))
    _demo_report(result, format_report, args)
    if args.plot:
        from .demo.plot import plot_demo

        print(f"wrote {plot_demo(result, args.plot, label=_stamp(result['machine']))}")
    return 0


def _demo_sizes(args) -> dict:
    """The sizes given on the command line (each demo has its own defaults for the others)."""
    return {k: v for k, v in (("hidden", args.hidden), ("epochs", args.epochs),
                              ("fisher_samples", args.fisher_samples)) if v is not None}


def _demo_report(result: dict, formatter, args) -> None:
    """Stamp ``result`` with the machine and date, print it, and write the JSON if asked."""
    from .bench import timing

    result["machine"] = timing.machine_info()
    result["date"] = _dt.date.today().isoformat()
    print(formatter(result))
    if args.json:
        print(f"\nwrote {timing.write_json(args.json, result)}")


def _demo_merge(args) -> int:
    from .demo.merge import MergeDemoConfig, format_merge_report, run_merge_demo

    if args.plot:
        raise EWCInputError("--plot applies to the continual-learning demo, not to --merge")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s)
    except ValueError:
        raise EWCInputError(f"--seeds must be comma-separated integers; got {args.seeds!r}") from None
    result = run_merge_demo(MergeDemoConfig(seeds=seeds, **_demo_sizes(args)),
                            log=_progress(not args.quiet) or (lambda msg: None))
    _demo_report(result, format_merge_report, args)
    return 0


def cmd_merge(args) -> int:
    from .merge import fisher_merge_files

    weights = None if args.weights is None else [float(w) for w in args.weights.split(",")]
    report = fisher_merge_files(args.models, args.fishers, args.out, weights=weights, floor=args.floor,
                                normalize=args.normalize)
    print(report)
    print("wrote " + ", ".join(report.files))
    return 0


def cmd_info(args) -> int:
    """What this installation runs the penalty and the Fisher's CPU kernel with, and why a fast path is
    not used."""
    import os
    import platform

    from . import __version__
    from .fisher.rules import outer_cpu
    from .penalty.backends import cpu_backend, cpu_backend_status, triton_status

    cpu = torch.device("cpu")
    print(f"fastewc {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}")
    cpu_backend.library(force=True)  # builds the C kernel if not built yet, retrying a build that failed
    why_cpu = cpu_backend_status(cpu)
    if why_cpu is None:
        print(f"CPU tensors:  backend 'cpu' (fused C kernel) available: {cpu_backend.library_path()}")
    else:
        print(f"CPU tensors:  backend 'cpu' (fused C kernel) not available: {why_cpu}; 'auto' takes 'torch'")
    if torch.cuda.is_available():
        why_gpu = triton_status(torch.device("cuda"))
        state = "available" if why_gpu is None else f"not available: {why_gpu}; 'auto' takes 'torch'"
        print(f"CUDA tensors: backend 'triton' {state} ({torch.cuda.device_count()} device(s))")
    else:
        print("CUDA tensors: no CUDA device visible")
    print("backend 'torch' (stock PyTorch ops) runs everywhere")
    outer = outer_cpu.kernel(force=True)
    if outer.why is None:
        threads = "on PyTorch's OpenMP threads" if outer.threaded else "on the calling thread only"
        print(f"Fisher on CPU: fused C kernel for Linear layers over sequences available ({threads}): "
              f"{outer.library.path}")
    else:
        print(f"Fisher on CPU: fused C kernel not available: {outer.why}; batched products instead")
    print(f"FASTEWC_BACKEND: {os.environ.get('FASTEWC_BACKEND') or '(unset)'}; "
          f"kernel cache: {cpu_backend.cache_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastewc", description="Fast, exact Elastic Weight Consolidation for PyTorch.")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time the EWC penalty and Fisher estimation on this machine",
                       description="Time fastewc against the naive implementations on this machine: the EWC "
                                   "penalty step against the per-parameter loop and a torch._foreach baseline, and "
                                   "Fisher estimation against the per-sample loop. Prints the tables; --json saves "
                                   "them. The cost curves and the figures are scripts in the repository "
                                   "(benchmarks/bench_scale.py, benchmarks/plot_results.py).")
    b.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    b.add_argument("--params", type=parse_count, default=25e6, help="penalty benchmark size, e.g. 25M, 1B (default 25M)")
    b.add_argument("--tasks", type=int, default=3, help="registered tasks (default 3)")
    b.add_argument("--fisher-samples", type=int, default=512, help="samples per Fisher estimate; 0 skips it (default 512)")
    b.add_argument("--fisher-models", default="mlp,cnn,transformer,bert,gpt2,llama",
                   help="Fisher benchmark models (default: all; the Hugging Face ones need fastewc[hf])")
    b.add_argument("--hf-samples", type=int, default=128, help="padded sequences per Hugging Face model (default 128)")
    b.add_argument("--repeats", type=int, default=15, help="timed rounds of the penalty benchmark (default 15)")
    b.add_argument("--compile", action="store_true", help="also time torch.compile of the reference loop (slow to compile)")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON")
    for flag, nargs, where in (("--scale", 0, SCALE_MOVED), ("--quick", 0, SCALE_MOVED),
                               ("--max-params", 1, SCALE_MOVED), ("--plot", 1, PLOT_MOVED)):
        b.add_argument(flag, action=_Moved, nargs=nargs, where=where)
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="continual learning on handwritten digits, with and without EWC",
                       description="Learn a sequence of tasks built from scikit-learn's bundled digits with "
                                   "fine-tuning, EWC, online EWC and EWC with the exact and sampled Fisher; "
                                   "print the accuracy matrices, average accuracy and forgetting.")
    d.add_argument("--benchmark", choices=["permuted", "split"], default="permuted")
    d.add_argument("--scenario", choices=["task", "domain"], default="task",
                   help="split only: per-task heads (task-incremental) or one shared head (domain-incremental)")
    d.add_argument("--tasks", type=int, default=5, help="permuted only: number of tasks (default 5)")
    d.add_argument("--epochs", type=int, default=None, help="per task (default 5)")
    d.add_argument("--hidden", type=int, default=None, help="MLP width: 64-H-H-10 (default 1000; 64 with --merge)")
    d.add_argument("--lambda", dest="lambda_ewc", type=float, default=1e4, help="EWC lambda (default 1e4)")
    d.add_argument("--lambdas", type=_floats, default=(), help="also sweep lambda for EWC, e.g. 100,1000,10000")
    d.add_argument("--methods", default="finetune,ewc,online_ewc,ewc_exact,ewc_sampled,ewc_tracked,stream_ewc",
                   help="comma-separated, from: finetune, ewc, online_ewc, ewc_exact, ewc_sampled, ewc_tracked "
                        "(Fisher tracked during the task's last epoch), stream_ewc (no task boundaries)")
    d.add_argument("--merge", action="store_true",
                   help="instead: fine-tune five copies of one model on Split-Digits and merge them (averaging, "
                        "task arithmetic, Fisher merging with the exact/sampled/empirical/batch-squared Fisher)")
    d.add_argument("--fisher-samples", type=int, default=None, help="per task (default 200; 256 with --merge)")
    d.add_argument("--seeds", type=str, default="0,1,2", help="--merge: seeds to average over (default 0,1,2)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="PATH", help="write the results as JSON")
    d.add_argument("--plot", metavar="PATH", help="save a figure (PNG) of the results")
    d.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("merge", help="Fisher-weighted merging of safetensors checkpoints",
                       description="Merge models fine-tuned from one initialisation, per parameter "
                                   "theta = sum_i l_i F_i theta_i / sum_i l_i F_i, streaming over safetensors files "
                                   "(checkpoints: a .safetensors file or a Hugging Face folder; Fishers: files "
                                   "written by fastewc.save_fisher).")
    m.add_argument("--models", nargs="+", required=True, metavar="CHECKPOINT")
    m.add_argument("--fishers", nargs="+", required=True, metavar="FISHER", help="one per model, in the same order")
    m.add_argument("--out", required=True, metavar="FOLDER", help="where model.safetensors (or shards) go")
    m.add_argument("--weights", default=None, help="comma-separated l_i (default: equal)")
    m.add_argument("--floor", type=float, default=1e-6, help="smallest Fisher value used (default 1e-6)")
    m.add_argument("--normalize", action="store_true", help="divide each Fisher by its L2 norm first")
    m.set_defaults(func=cmd_merge)

    i = sub.add_parser("info", help="which penalty backend runs on this machine, and why",
                       description="Print the penalty backends this installation can run, per device, and why a "
                                   "fast one is not available; builds the fused CPU kernel if it is not built yet "
                                   "(e.g. in a container image, ahead of training), retrying a build that "
                                   "failed before.")
    i.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (EWCInputError, MissingDependencyError, ValueError) as e:
        print(f"fastewc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:  # a size check can only estimate
        print(f"fastewc {args.command}: error: out of GPU memory ({e}); choose a smaller size", file=sys.stderr)
        return 2
