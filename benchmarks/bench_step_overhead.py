"""What the EWC penalty adds to a user's training step, both ways of adding it, per backend.

A step is what a training loop runs: ``zero_grad(set_to_none=True)``, forward, task loss,
backward, ``SGD.step()``. Three cases run round-robin on the same model and data:

* ``plain``: no penalty;
* ``accumulate_grad_``: backward on the task loss, then ``ewc.accumulate_grad_(model)``;
* ``loss + ewc(model)``: the penalty in the loss (the reference code's way, and most users').

Models: GPT-2 small's shape (124M parameters, from its default config, random weights; 4 x 128
tokens, its own LM loss), BERT-base's shape (110M, sequence classification, 4 x 128 tokens) and
an MLP 784-1000-1000-10 (1.8M, batch 64). Two tasks registered (random Fisher, perturbed
anchors), float32, on every penalty backend this machine runs. After the timing, one step of each
way is checked to give the same gradients (``grads_match``).

    python benchmarks/bench_step_overhead.py [--models gpt2,bert,mlp] [--repeats 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer
from fastewc.bench import timing
from fastewc.penalty.backends import cpu_backend_status
from results_path import results_path

MODELS = ("gpt2", "bert", "mlp")


def build(name: str, small: bool):
    """(model, loss(model) -> task loss) for one benchmark model; ``small``: a tiny config of the
    same family, for smoke tests."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        width = 64 if small else 1000
        model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                              nn.Linear(width, 10))
        x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
        return model, lambda m: F.cross_entropy(m(x), y)
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers as tf

    tiny = dict(n_layer=2, n_embd=64, n_head=2) if small else {}
    seq = 16 if small else 128
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**tiny))
        ids = torch.randint(0, model.config.vocab_size, (4, seq), generator=g)
        return model, lambda m: m(input_ids=ids, labels=ids).loss
    bert = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128) if small else {}
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **bert))
    ids = torch.randint(0, model.config.vocab_size, (4, seq), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    return model, lambda m: m(input_ids=ids, labels=labels).loss


def backends_here() -> list[str]:
    """The CPU backends (the Triton interpreter is a correctness tool, not a speed to report)."""
    return ["torch"] + (["cpu"] if cpu_backend_status(torch.device("cpu")) is None else [])


def regularizer(model: nn.Module, backend: str) -> EWCRegularizer:
    g = torch.Generator().manual_seed(1)
    ewc = EWCRegularizer(100.0, backend=backend)
    for _ in range(2):
        ewc.register_task({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()},
                          {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()})
    return ewc


def grads_after(model, loss_of, ewc, way: str) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if way == "accumulate_grad_":
        loss_of(model).backward()
        ewc.accumulate_grad_(model)
    else:
        (loss_of(model) + ewc(model)).backward()
    return [p.grad.clone() for p in model.parameters()]


def run_model(name: str, backend: str, repeats: int, small: bool) -> dict | None:
    built = build(name, small)
    if built is None:
        return None
    torch.manual_seed(0)
    model, loss_of = built
    model.train()
    for m in model.modules():  # dropout off: the three cases do the same work
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ewc = regularizer(model, backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def plain():
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        opt.step()

    def accumulate():
        opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        ewc.accumulate_grad_(model)
        opt.step()

    def in_loss():
        opt.zero_grad(set_to_none=True)
        (loss_of(model) + ewc(model)).backward()
        opt.step()

    cases = {"plain": plain, "accumulate_grad_": accumulate, "loss + ewc(model)": in_loss}
    times = timing.time_side_by_side(cases, repeats=repeats, warmup=1)
    med = {k: timing.median(v) for k, v in times.items()}
    a = grads_after(model, loss_of, ewc, "accumulate_grad_")
    b = grads_after(model, loss_of, ewc, "in loss")
    match = all(torch.allclose(x, y, rtol=1e-4, atol=1e-6 * float(x.abs().max()) + 1e-12) for x, y in zip(a, b))
    return {"model": name, "backend": backend, "params": sum(p.numel() for p in model.parameters()),
            "tensors": len(list(model.parameters())), "plain_s": med["plain"],
            "accumulate_pct": 100 * (med["accumulate_grad_"] / med["plain"] - 1),
            "in_loss_pct": 100 * (med["loss + ewc(model)"] / med["plain"] - 1),
            "grads_match": match, "raw_seconds": times}


def format_rows(rows: list[dict]) -> list[str]:
    out = ["| model | params | backend | plain step | + `accumulate_grad_` | + `loss + ewc(model)` |",
           "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        step = f"{r['plain_s']:.2f} s" if r["plain_s"] >= 1 else f"{1e3 * r['plain_s']:.1f} ms"
        out.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['backend']} | {step} | "
                   f"{r['accumulate_pct']:+.1f}% | {r['in_loss_pct']:+.1f}% |")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default=None, help="comma-separated; default: every one this machine runs")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="tiny configs (a smoke run of seconds)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/step_overhead_cpu.json")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; expected some of {list(MODELS)}")
    backends = args.backends.split(",") if args.backends else backends_here()
    rows = []
    for name in models:
        for backend in backends:
            r = run_model(name, backend, args.repeats, args.small)
            if r is None:
                print(f"{name}: skipped (transformers is not installed)")
                continue
            rows.append(r)
            print(format_rows([r])[-1], flush=True)
    machine = timing.machine_info("cpu")
    print(f"\nStep overhead of the penalty, float32, 2 tasks; {machine['cpu']}, {machine['torch_threads']} threads, "
          f"torch {machine['torch']}; {args.repeats} round-robin repeats, medians\n")
    print("\n".join(format_rows(rows)))
    payload = {"benchmark": "step_overhead_cpu", "machine": machine, "repeats": args.repeats, "small": args.small,
               "rows": rows}
    if not args.small or args.json:
        path = args.json or results_path("step_overhead_cpu.json")
        print(f"\nwrote {timing.write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    main()
