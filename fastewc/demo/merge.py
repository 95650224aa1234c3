"""``fastewc demo --merge``: models fine-tuned from one initialisation on different tasks, merged.

Split-Digits, task-incremental (five tasks, the digit pairs {0,1} ... {8,9}, each read from its
own two logits). One MLP is initialised (and, with ``pretrain_epochs``, trained briefly on
all ten digits): the shared initialisation; five copies are then fine-tuned, one per task. Their parameters are merged by:

* plain averaging;
* task arithmetic (init + lam * sum of the task vectors; lam chosen on the training data);
* Fisher-weighted averaging with the exact, the sampled and the empirical per-sample Fisher
  (``fastewc.estimate_fisher``), and with the batch-squared approximation other tools use (the
  square of each mini-batch's mean gradient, ``fastewc.reference.batch_fisher_estimation``).

Each merged model is scored on every task's test split with that task's logits; the whole run
is repeated over ``seeds`` and the accuracies averaged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..fisher import estimate_fisher
from ..merge import fisher_merge
from ..reference import batch_fisher_estimation
from .data import load_digits_tensors, split_digits
from .run import DigitsMLP, evaluate

FISHERS = ("exact", "sampled", "empirical", "batch-squared")


@dataclass
class MergeDemoConfig:
    hidden: int = 64
    pretrain_epochs: int = 0
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    fisher_samples: int = 256
    floor: float = 1e-6
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self):
        for name in ("hidden", "epochs", "batch_size", "fisher_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")


def _train(model: DigitsMLP, x, y, epochs: int, cfg: MergeDemoConfig, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def _fisher(model: DigitsMLP, task, kind: str, cfg: MergeDemoConfig, seed: int) -> dict:
    n = min(cfg.fisher_samples, len(task.y_train))
    pick = torch.randperm(len(task.y_train), generator=torch.Generator().manual_seed(seed))[:n]
    data = [(task.x_train[pick[i : i + 32]], task.y_train[pick[i : i + 32]]) for i in range(0, n, 32)]
    if kind == "batch-squared":
        return batch_fisher_estimation(model, data, num_samples=n)
    return estimate_fisher(model, data, kind=kind, generator=torch.Generator().manual_seed(seed + 1))


def _scores(state: dict, base: DigitsMLP, tasks) -> list[float]:
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return [evaluate(model, t) for t in tasks]


@torch.no_grad()
def _train_accuracy(state: dict, base: DigitsMLP, tasks) -> float:
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    model.eval()
    return sum((model.use(t)(t.x_train).argmax(-1) == t.y_train).float().mean().item() for t in tasks) / len(tasks)


def run_merge_demo(cfg: MergeDemoConfig | None = None, log=None) -> dict:
    """Train, merge every way, score, for every seed; returns the JSON payload (``methods``:
    name -> per-task test accuracy averaged over the seeds, their mean, and each seed's)."""
    cfg = cfg or MergeDemoConfig()
    log = log or (lambda msg: None)
    start = time.perf_counter()
    runs = [_one_seed(cfg, seed, log) for seed in cfg.seeds]
    out = {"benchmark": "split-digits-task-incremental merging", "tasks": runs[0]["tasks"], "config": asdict(cfg),
           "methods": {}}
    for name, first in runs[0]["methods"].items():
        per_task = [sum(r["methods"][name]["accuracy"][k] for r in runs) / len(runs) for k in range(len(out["tasks"]))]
        out["methods"][name] = {**first, "accuracy": per_task, "mean": sum(per_task) / len(per_task),
                                "mean_per_seed": [r["methods"][name]["mean"] for r in runs]}
        out["methods"][name].pop("lam", None)
        if "lam" in first:
            out["methods"][name]["lam_per_seed"] = [r["methods"][name]["lam"] for r in runs]
    out["seconds"] = time.perf_counter() - start
    return out


def _one_seed(cfg: MergeDemoConfig, seed: int, log) -> dict:
    tasks = split_digits("task", seed)
    torch.manual_seed(seed)
    init = DigitsMLP(cfg.hidden)
    if cfg.pretrain_epochs:
        x_all, y_all = load_digits_tensors()
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))[: int(round(0.8 * len(y_all)))]
        _train(init, x_all[order], y_all[order], cfg.pretrain_epochs, cfg, seed + 1)
    tuned = []
    for k, task in enumerate(tasks):
        m = copy.deepcopy(init).use(task)
        _train(m, task.x_train, task.y_train, cfg.epochs, cfg, seed + 100 + k)
        tuned.append(m)
    states = [{n: p.detach().clone() for n, p in m.state_dict().items()} for m in tuned]
    base = copy.deepcopy(init)
    out = {"tasks": [t.name for t in tasks], "methods": {}}
    log(f"seed {seed}:")

    def record(name: str, per_task: list[float], **extra):
        out["methods"][name] = {"accuracy": per_task, "mean": sum(per_task) / len(per_task), **extra}
        log(f"  {name:<24} mean {out['methods'][name]['mean']:.3f}  " + " ".join(f"{a:.2f}" for a in per_task))

    record("initialisation", _scores(init.state_dict(), base, tasks))
    record("fine-tuned, own task", [evaluate(m, t) for m, t in zip(tuned, tasks)])
    avg, _ = fisher_merge(states, [{} for _ in states])
    record("average", _scores(avg, base, tasks))
    init_state = {n: p.detach() for n, p in init.state_dict().items()}
    best = None
    for lam in (0.2, 0.4, 0.6, 0.8, 1.0):
        state = {n: init_state[n] + lam * sum(s[n] - init_state[n] for s in states) for n in init_state}
        score = _train_accuracy(state, base, tasks)
        if best is None or score > best[0]:
            best = (score, lam, state)
    record("task arithmetic", _scores(best[2], base, tasks), lam=best[1])
    for kind in FISHERS:
        fishers = [_fisher(m.use(t), t, kind, cfg, seed + 200 + k) for k, (m, t) in enumerate(zip(tuned, tasks))]
        merged, _ = fisher_merge(states, fishers, floor=cfg.floor)
        record(f"Fisher, {kind}", _scores(merged, base, tasks))
    return out


def format_merge_report(result: dict) -> str:
    tasks = result["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for name, r in result["methods"].items():
        label = f"{name} (lam {', '.join(f'{x:g}' for x in r['lam_per_seed'])})" if "lam_per_seed" in r else name
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in r["accuracy"]) + f" | {r['mean']:.3f} |")
    return "\n".join(lines)
