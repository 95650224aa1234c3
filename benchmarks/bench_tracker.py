"""What tracking the Fisher during training costs: the "tracked step" table.

For each model of the Fisher benchmark (MLP, CNN, Transformer encoder; ``fastewc.bench.models``)
and one Hugging Face model, one epoch over the same batches is timed round-robin four ways:

* ``plain``: forward, loss, backward, optimizer step;
* ``tracked``: the same under ``FisherTracker`` (``fraction=1``);
* ``tracked_0.25``: ``FisherTracker(fraction=0.25)``;
* ``estimate_fisher``: the separate pass over the same samples that the tracker replaces.

The models run in eval mode (dropout off, BatchNorm on running statistics: the tracker refuses
batch statistics) at learning rate 0, so every round sees the same parameters. The Transformer's
position table is a bare ``nn.Parameter`` the tracker refuses: both Fisher columns leave it out.

    python benchmarks/bench_tracker.py [--samples 128] [--hf-samples 32] [--repeats 3] [--device cpu|cuda]

Prints a table and writes ``benchmarks/results/<machine>/tracker_cpu.json`` (``tracker_cuda.json``
in the GPU's folder on a GPU).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastewc import EWCInputError, FisherTracker, estimate_fisher
from fastewc.bench.device import resolve_device
from fastewc.bench.models import fisher_problem, hf_problem
from fastewc.bench.timing import machine_info, median, time_side_by_side, write_json
from results_path import results_path



def _cases(model, data, params, own_loss: bool) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def epoch():
        for b in data:
            opt.zero_grad()
            loss = model(**b).loss if own_loss else F.cross_entropy(model(b[0]), b[1])
            loss.backward()
            opt.step()

    full, quarter = FisherTracker(model, params=params), FisherTracker(model, params=params, fraction=0.25)

    def tracked(tracker):
        def run():
            with tracker:
                epoch()
        return run

    return {"plain": epoch, "tracked": tracked(full), "tracked_0.25": tracked(quarter),
            "estimate_fisher": lambda: estimate_fisher(model, data, params=params)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="samples per epoch, small models (README: 512)")
    ap.add_argument("--hf-samples", type=int, default=32, help="samples per epoch, the Hugging Face model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn,transformer,gpt2")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/tracker_<device>.json")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except EWCInputError as e:
        ap.error(str(e))
    rows = []
    for name in args.models.split(","):
        if name == "gpt2":
            model, data = hf_problem("gpt2", n=args.hf_samples, batch_size=16)
            model.eval()
            own_loss, n = True, args.hf_samples
            data = [{k: v.to(device) for k, v in b.items()} for b in data]
        else:
            model, data = fisher_problem(name, n=args.samples, batch_size=64)
            own_loss, n = False, args.samples
            data = [(x.to(device), y.to(device)) for x, y in data]
        model = model.to(device)
        params = (lambda k, p: p.requires_grad and k != "pos") if name == "transformer" else None
        times = time_side_by_side(_cases(model, data, params, own_loss), repeats=args.repeats, warmup=1,
                                  device=device)
        med = {k: median(v) for k, v in times.items()}
        rows.append({"model": name, "samples": n, "seconds": med, "times": times,
                     "tracked_over_plain": med["tracked"] / med["plain"],
                     "tracked_0.25_over_plain": med["tracked_0.25"] / med["plain"],
                     "extra_tracked_over_estimate_fisher": (med["tracked"] - med["plain"]) / med["estimate_fisher"],
                     "estimate_fisher_over_plain": med["estimate_fisher"] / med["plain"]})
        print(f"done {name}", flush=True)
    print(f"\n{'model':12} {'N':>5} {'plain s':>9} {'tracked':>9} {'x plain':>8} {'f=0.25':>9} {'x plain':>8} "
          f"{'estimate':>9} {'x plain':>8} {'extra/est':>9}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['model']:12} {r['samples']:5d} {s['plain']:9.3f} {s['tracked']:9.3f} {r['tracked_over_plain']:8.2f} "
              f"{s['tracked_0.25']:9.3f} {r['tracked_0.25_over_plain']:8.2f} {s['estimate_fisher']:9.3f} "
              f"{r['estimate_fisher_over_plain']:8.2f} {r['extra_tracked_over_estimate_fisher']:9.2f}")
    result = {"machine": machine_info(device), "device": str(device), "repeats": args.repeats, "rows": rows,
              "note": "one epoch per case, round-robin; models in eval mode at lr 0; seconds are medians"}
    path = write_json(args.json or results_path(f"tracker_{device.type}.json", device), result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
