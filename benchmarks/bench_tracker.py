"""What tracking the Fisher during training costs: the "tracked step" table.

For each model of the Fisher benchmark (MLP, CNN, Transformer encoder and the Hugging Face BERT,
GPT-2 and Llama; ``fastewc.bench.models``), one epoch over the same batches is timed round-robin
four ways:

* ``plain``: forward, loss, backward, optimizer step;
* ``tracked``: the same under ``FisherTracker`` (``fraction=1``);
* ``tracked_0.25``: ``FisherTracker(fraction=0.25)``;
* ``tracked_1in4``: ``FisherTracker(one_in=4)``, every sample of one step in four (SGD only);
* ``estimate_fisher``: the separate pass over the same samples that the tracker replaces;
* ``floor`` and ``floor_0.25``: what any tracker that adds each step's squares into running sums
  must at least do, on all samples and on a quarter: for every Linear and convolution layer
  (Hugging Face's ``Conv1D`` too), one product of its weight gradient's size over the tracked
  samples, added into a parameter-sized sum, in a bare hook (:class:`_Floor`). For the MLP that
  is exactly the Fisher's product ``(G o G)^T (A o A)``; for layers over sequences or positions
  it is less than per-sample squares need (each sample's gradient squared before the sum), and
  attention's in-projection, embeddings and norms get nothing: a floor, not a tracker;

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


class _Floor:
    """While active, every training backward adds, for each Linear / convolution layer, one
    product of its weight gradient's size over the step's tracked samples (a seeded ``fraction``
    of the batch) into a parameter-sized sum: the floor of the ``floor`` columns (module
    docstring). Its sums are not a Fisher and are never read."""

    def __init__(self, model, fraction: float = 1.0):
        self.model, self.fraction = model, fraction
        self.layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
                       or type(m).__name__ == "Conv1D"]
        self.sums = {m: torch.zeros_like(m.weight) for m in self.layers}
        self.generator = torch.Generator().manual_seed(0)
        self.idx, self.handles = None, []

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._pick, with_kwargs=True)]
        self.handles += [m.register_forward_hook(self._record) for m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _pick(self, module, args, kwargs):
        x = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        n = x.shape[0]
        k = max(1, round(self.fraction * n))
        self.idx = None if k == n else torch.randperm(n, generator=self.generator)[:k].sort().values.to(x.device)

    def _record(self, m, args, out):
        if out.requires_grad:
            A, idx = args[0].detach(), self.idx
            out.register_hook(lambda G: self._add(m, A, G, idx))

    def _add(self, m, A, G, idx):
        if idx is not None:
            A, G = A.index_select(0, idx), G.index_select(0, idx)
        S = self.sums[m]
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            dims = len(m.kernel_size)
            S.add_(torch.ops.aten.convolution_backward(G, A, m.weight, None, m.stride, m.padding, m.dilation, False,
                                                       [0] * dims, m.groups, [False, False, True])[1])
        elif A.dim() == 2:  # the MLP's layers: the Fisher's own product
            S.addmm_(G.square().t(), A.square())
        elif isinstance(m, torch.nn.Linear):
            S.addmm_(G.reshape(-1, G.shape[-1]).t(), A.reshape(-1, A.shape[-1]))
        else:  # Conv1D: weight [in, out]
            S.addmm_(A.reshape(-1, A.shape[-1]).t(), G.reshape(-1, G.shape[-1]))



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
             "tracked_1in4": tracked(one_in_4, sgd),
             "floor": tracked(_Floor(model), sgd), "floor_0.25": tracked(_Floor(model, 0.25), sgd)}
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
                     "floor_over_plain": med["floor"] / med["plain"],
                     "floor_0.25_over_plain": med["floor_0.25"] / med["plain"],
                     "adamw_tracked_over_plain": med["tracked_adamw"] / med["plain_adamw"],
                     "adamw_tracked_0.25_over_plain": med["tracked_0.25_adamw"] / med["plain_adamw"],
                     "extra_tracked_over_estimate_fisher": (med["tracked"] - med["plain"]) / med["estimate_fisher"],
                     "estimate_fisher_over_plain": med["estimate_fisher"] / med["plain"]})
        print(f"done {name}", flush=True)
    print(f"\n{'model':12} {'N':>5} {'SGD s':>8} {'tracked':>8} {'f=0.25':>7} {'1 in 4':>7} {'floor':>6} {'fl 0.25':>7} "
          f"{'AdamW s':>8} {'tracked':>8} {'f=0.25':>7} {'estimate':>9} {'extra/est':>9}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['model']:12} {r['samples']:5d} {s['plain']:8.3f} {r['tracked_over_plain']:8.2f} "
              f"{r['tracked_0.25_over_plain']:7.2f} {r['tracked_1in4_over_plain']:7.2f} {r['floor_over_plain']:6.2f} "
              f"{r['floor_0.25_over_plain']:7.2f} {s['plain_adamw']:8.3f} "
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
