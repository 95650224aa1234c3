"""What ``EWCRegularizer(check_finite=True)`` costs per step, side by side with the default.

``check_finite`` reads the penalty value on the host after each step (one host-device
synchronisation; on a GPU it also ends the asynchrony between the step and the next) and, only
when the value is NaN/Inf, looks for the parameter to name. This measures the steady state (all
values finite): a transformer-shaped parameter set (about 25M parameters in about 100 tensors),
3 registered tasks, float32, ``.grad`` already holding a task gradient, for ``accumulate_grad_``
and for forward+backward. Cases run round-robin; medians are reported.

    python benchmarks/bench_check_finite.py [--params 25e6] [--repeats 15] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastewc import EWCRegularizer
from fastewc.bench import timing
from fastewc.bench.models import transformer_like
from results_path import results_path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/check_finite_<device>.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = transformer_like(args.params).to(device)
    P = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    plain = EWCRegularizer(1000.0)
    for _ in range(args.tasks):
        fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
        plain.register_task(fisher, anchor)
    del fisher, anchor
    checked = EWCRegularizer(check_finite=True)
    checked.load_state_dict(plain.state_dict())
    checked.check_finite = True
    for p in model.parameters():
        p.grad = torch.randn_like(p)  # the task gradient the penalty's gradient is added to

    cases = {
        "accumulate_grad_": lambda: plain.accumulate_grad_(model),
        "accumulate_grad_, check_finite": lambda: checked.accumulate_grad_(model),
        "fwd+bwd": lambda: plain(model).backward(),
        "fwd+bwd, check_finite": lambda: checked(model).backward(),
    }
    times = timing.time_side_by_side(cases, repeats=args.repeats, device=device)
    med = {k: timing.median(v) for k, v in times.items()}
    rows = []
    for step in ("accumulate_grad_", "fwd+bwd"):
        off, on = med[step], med[f"{step}, check_finite"]
        rows.append({"step": step, "default_ms": 1e3 * off, "check_finite_ms": 1e3 * on,
                     "overhead_ms": 1e3 * (on - off), "overhead_pct": 100 * (on / off - 1)})
    where = timing.cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\ncheck_finite overhead on {device}: {P / 1e6:.1f}M parameters in {n_tensors} tensors, {args.tasks} tasks, "
          f"float32")
    print(f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.repeats} round-robin "
          f"repeats, medians\n")
    print(f"| {'step':<17} | {'default ms':>10} | {'check_finite ms':>15} | {'overhead':>17} |")
    print(f"|{'-' * 19}|{'-' * 12}|{'-' * 17}|{'-' * 19}|")
    for r in rows:
        print(f"| {r['step']:<17} | {r['default_ms']:>10.1f} | {r['check_finite_ms']:>15.1f} | "
              f"{r['overhead_ms']:>+7.2f} ms {r['overhead_pct']:>+5.1f}% |")
    payload = {"benchmark": f"check_finite_{device.type}", "machine": timing.machine_info(device), "params": P,
               "tensors": n_tensors, "tasks": args.tasks, "repeats": args.repeats, "rows": rows,
               "raw_seconds": times}
    path = args.json or results_path(f"check_finite_{device.type}.json", device)
    print(f"\nwrote {timing.write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    sys.exit(main() and 0)
