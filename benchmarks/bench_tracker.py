"""What tracking the Fisher during training costs: the "tracked step" table.

For each model of the Fisher benchmark (MLP, CNN, Transformer encoder and the Hugging Face BERT,
GPT-2 and Llama; ``fastewc.bench.models``), one epoch over the same batches is timed round-robin
four ways:

* ``plain``: forward, loss, backward, optimizer step;
* ``tracked``: the same under ``FisherTracker`` (``fraction=1``);
* ``tracked_0.25``: ``FisherTracker(fraction=0.25)``;
* ``tracked_1in4``: ``FisherTracker(one_in=4)``, every sample of one step in four (SGD only);
* ``estimate_fisher``: the separate pass over the same samples that the tracker replaces;

and the first three again with AdamW in place of SGD (``*_adamw``): the tracker adds the same
seconds to either step, a smaller share of AdamW's.

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
from fastewc.bench.models import HF_MODELS, fisher_problem, hf_problem
from fastewc.bench.timing import machine_info, median, time_side_by_side, write_json
from results_path import results_path



def _cases(model, data, params, own_loss: bool) -> dict:
    """The timed cases: each way of running the epoch with a plain SGD step (the cheapest step, so
    the tracker's share is largest) and with AdamW (what most fine-tuning runs), both at lr 0."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    adamw = torch.optim.AdamW(model.parameters(), lr=0.0)

    def epoch(opt):
        def run():
            for b in data:
                opt.zero_grad()
                loss = model(**b).loss if own_loss else F.cross_entropy(model(b[0]), b[1])
                loss.backward()
                opt.step()
        return run

    full, quarter = FisherTracker(model, params=params), FisherTracker(model, params=params, fraction=0.25)
    one_in_4 = FisherTracker(model, params=params, one_in=4)

    def tracked(tracker, opt):
        def run():
            with tracker:
                epoch(opt)()
        return run

    cases = {"estimate_fisher": lambda: estimate_fisher(model, data, params=params),
             "tracked_1in4": tracked(one_in_4, sgd)}
    for suffix, opt in (("", sgd), ("_adamw", adamw)):
        cases.update({"plain" + suffix: epoch(opt), "tracked" + suffix: tracked(full, opt),
                      "tracked_0.25" + suffix: tracked(quarter, opt)})
    return cases


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="samples per epoch, small models (README: 512)")
    ap.add_argument("--hf-samples", type=int, default=32, help="samples per epoch, the Hugging Face models (README: 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn,transformer,bert,gpt2,llama")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/tracker_<device>.json")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except EWCInputError as e:
        ap.error(str(e))
    rows = []
    for name in args.models.split(","):
        if name in HF_MODELS:
            model, data = hf_problem(name, n=args.hf_samples, batch_size=16)
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
                     "tracked_1in4_over_plain": med["tracked_1in4"] / med["plain"],
                     "adamw_tracked_over_plain": med["tracked_adamw"] / med["plain_adamw"],
                     "adamw_tracked_0.25_over_plain": med["tracked_0.25_adamw"] / med["plain_adamw"],
                     "extra_tracked_over_estimate_fisher": (med["tracked"] - med["plain"]) / med["estimate_fisher"],
                     "estimate_fisher_over_plain": med["estimate_fisher"] / med["plain"]})
        print(f"done {name}", flush=True)
    print(f"\n{'model':12} {'N':>5} {'SGD s':>8} {'tracked':>8} {'f=0.25':>7} {'1 in 4':>7} {'AdamW s':>8} {'tracked':>8} "
          f"{'f=0.25':>7} {'estimate':>9} {'extra/est':>9}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['model']:12} {r['samples']:5d} {s['plain']:8.3f} {r['tracked_over_plain']:8.2f} "
              f"{r['tracked_0.25_over_plain']:7.2f} {r['tracked_1in4_over_plain']:7.2f} {s['plain_adamw']:8.3f} "
              f"{r['adamw_tracked_over_plain']:8.2f} "
              f"{r['adamw_tracked_0.25_over_plain']:7.2f} {r['estimate_fisher_over_plain']:9.2f} "
              f"{r['extra_tracked_over_estimate_fisher']:9.2f}")
    result = {"machine": machine_info(device), "device": str(device), "repeats": args.repeats, "rows": rows,
              "note": "one epoch per case, round-robin; models in eval mode at lr 0; seconds are medians; "
                    "*_adamw: the same epochs with AdamW instead of SGD"}
    path = write_json(args.json or results_path(f"tracker_{device.type}.json", device), result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
