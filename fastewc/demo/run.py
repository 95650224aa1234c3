"""Train an MLP on a sequence of digit tasks with each method and measure forgetting.

Every method starts from the same seeded initialisation and sees the same batches. After each
task the model is evaluated on every task (the accuracy matrix ``R[t][s]``), then, for the EWC
methods, the Fisher diagonal is estimated on that task's training data with
:func:`fastewc.estimate_fisher` and registered with the task's optimum. The penalty's gradient is
added with ``EWCRegularizer.accumulate_grad_`` after the task loss's ``backward()``, the fastest
path (the same update as ``loss + ewc(model)``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fisher import FisherTracker
from ..penalty import EWCRegularizer
from ..streaming import StreamingEWC
from ..workflow import register_at_current
from .data import Task, permuted_digits, split_digits
from .metrics import average_accuracy, average_forgetting

# name -> (EWC mode, Fisher kind); None = plain fine-tuning. Kind "tracked": the Fisher of the
# task's last epoch, tracked from its training steps (fastewc.FisherTracker), no second pass.
# Mode "stream": no task boundaries (see train_sequence): one optimizer for the whole stream, the
# Fisher tracked from the training steps and folded into online EWC every `stream_every` steps
# (fastewc.StreamingEWC).
METHODS: dict[str, tuple[str, str] | None] = {
    "finetune": None,
    "ewc": ("separate", "empirical"),
    "online_ewc": ("online", "empirical"),
    "ewc_exact": ("separate", "exact"),
    "ewc_sampled": ("separate", "sampled"),
    "ewc_tracked": ("separate", "tracked"),
    "stream_ewc": ("stream", "empirical"),
}


@dataclass
class DemoConfig:
    """Everything that decides a demo run (all of it goes into the JSON)."""

    benchmark: str = "permuted"      # "permuted" or "split"
    scenario: str = "task"           # split only: "task" (per-task head) or "domain" (shared head)
    num_tasks: int = 5               # permuted only (split always has 5)
    hidden: int = 1000               # MLP 64-hidden-hidden-10
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3                 # Adam, fresh per task
    lambda_ewc: float = 1e4
    gamma: float = 0.9               # online EWC decay (stream_ewc too)
    stream_every: int = 50           # stream_ewc: steps between consolidations
    fisher_samples: int = 200
    methods: tuple[str, ...] = tuple(METHODS)
    lambdas: tuple[float, ...] = ()  # non-empty: also sweep lambda for "ewc"
    seed: int = 0
    tasks_limit: int | None = field(default=None, repr=False)  # tests: fewer tasks

    def __post_init__(self):
        if self.benchmark not in ("permuted", "split"):
            raise ValueError(f"benchmark must be 'permuted' or 'split'; got {self.benchmark!r}")
        if self.scenario not in ("task", "domain"):
            raise ValueError(f"scenario must be 'task' or 'domain'; got {self.scenario!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
        for name in ("num_tasks", "hidden", "epochs", "batch_size", "fisher_samples", "stream_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.lambda_ewc < 0 or any(lam < 0 for lam in self.lambdas):
            raise ValueError("lambdas must be >= 0")


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU. ``head`` (a slice of the 10 logits, or None) is
    set per task; it is a plain attribute, so parameter names do not depend on the task."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))
        self.head: slice | None = None

    def use(self, task: Task) -> "DigitsMLP":
        self.head = None if task.classes is None else slice(task.classes[0], task.classes[-1] + 1)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits if self.head is None else logits[..., self.head]


def build_tasks(cfg: DemoConfig) -> list[Task]:
    tasks = permuted_digits(cfg.num_tasks, cfg.seed) if cfg.benchmark == "permuted" else split_digits(cfg.scenario, cfg.seed)
    return tasks[: cfg.tasks_limit] if cfg.tasks_limit else tasks


@torch.no_grad()
def evaluate(model: DigitsMLP, task: Task) -> float:
    model.eval()
    acc = (model.use(task)(task.x_test).argmax(-1) == task.y_test).float().mean().item()
    model.train()
    return acc


def _batches(task: Task, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(task.y_train), generator=generator)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield task.x_train[idx], task.y_train[idx]


def train_sequence(cfg: DemoConfig, tasks: list[Task], method: str, lambda_ewc: float | None = None,
                   log=None) -> dict:
    """Run one method over the task sequence; returns its matrix, summaries and wall time."""
    from ..fisher import estimate_fisher  # imported here: the demo is the only user of it in this module

    spec = METHODS[method]
    lam = cfg.lambda_ewc if lambda_ewc is None else lambda_ewc
    torch.manual_seed(cfg.seed)
    model = DigitsMLP(cfg.hidden)
    streaming = spec is not None and spec[0] == "stream"
    stream = StreamingEWC(model, lambda_ewc=lam, gamma=cfg.gamma, every=cfg.stream_every) if streaming else None
    ewc = None if spec is None or streaming else EWCRegularizer(
        lam, mode=spec[0], gamma=cfg.gamma if spec[0] == "online" else 1.0)
    T = len(tasks)
    matrix = [[0.0] * T for _ in range(T)]
    start = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for t, task in enumerate(tasks):
        model.use(task).train()
        if not streaming:  # a fresh optimizer per task is a boundary the stream is not told of
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed * 1000 + t)  # same batches for every method
        for epoch in range(cfg.epochs):
            tracker = None
            if spec is not None and spec[1] == "tracked" and epoch == cfg.epochs - 1 and t < T - 1:
                tracker = FisherTracker(model).start()
            for x, y in _batches(task, cfg.batch_size, g):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                if stream is not None:
                    stream.step()
                elif ewc is not None and ewc.tasks_seen:
                    ewc.accumulate_grad_(model)
                opt.step()
            if tracker is not None:
                tracker.stop()
        matrix[t] = [evaluate(model, s) for s in tasks]
        if tracker is not None:
            register_at_current(ewc, model, tracker.fisher())
        elif ewc is not None and t < T - 1:  # the last task's Fisher would never be used
            model.use(task)
            n = min(cfg.fisher_samples, len(task.y_train))
            pick = torch.randperm(len(task.y_train), generator=torch.Generator().manual_seed(cfg.seed + 7 * t))[:n]
            data = [(task.x_train[pick[i : i + 64]], task.y_train[pick[i : i + 64]]) for i in range(0, n, 64)]
            fisher = estimate_fisher(model, data, kind=spec[1], num_samples=n,
                                     generator=torch.Generator().manual_seed(cfg.seed + 11 * t))
            register_at_current(ewc, model, fisher)
        if log:
            log(f"  {method:<12} task {t + 1}/{T}: " + " ".join(f"{a:.2f}" for a in matrix[t][: t + 1]))
    if stream is not None:
        stream.close()
    return {
        "lambda_ewc": None if spec is None else lam,
        "avg_accuracy": average_accuracy(matrix),
        "avg_forgetting": average_forgetting(matrix),
        "matrix": matrix,
        "seconds": time.perf_counter() - start,
    }


def sweep_score(matrix: list[list[float]]) -> float:
    """The lambda-sweep criterion of the original reference code (its ``find_optimal_lambda``):
    final accuracy on the newest task plus the mean final accuracy on the older ones."""
    last = matrix[-1]
    return last[-1] + (sum(last[:-1]) / (len(last) - 1) if len(last) > 1 else 0.0)


def run_demo(cfg: DemoConfig, log=None) -> dict:
    """Run every method of ``cfg`` (and the lambda sweep, if asked); returns the JSON payload."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tasks = build_tasks(cfg)
    name = ("permuted-digits" if cfg.benchmark == "permuted" else f"split-digits-{cfg.scenario}-incremental")
    out = {"benchmark": name, "tasks": [t.name for t in tasks], "config": asdict(cfg), "methods": {}}
    for method in cfg.methods:
        out["methods"][method] = train_sequence(cfg, tasks, method, log=log)
    if cfg.lambdas:
        runs = {str(lam): train_sequence(cfg, tasks, "ewc", lambda_ewc=lam, log=log) for lam in cfg.lambdas}
        best = max(runs, key=lambda k: sweep_score(runs[k]["matrix"]))
        out["lambda_sweep"] = {"criterion": "final accuracy on the last task + mean final accuracy on the others",
                               "runs": runs, "best_lambda": float(best)}
    return out


def format_report(result: dict) -> str:
    """Accuracy matrices and the summary table, as text."""
    lines = [f"{result['benchmark']}: tasks {', '.join(result['tasks'])}", ""]
    for method, r in result["methods"].items():
        lines.append(f"{method}: accuracy after task t (rows) on task s (columns)")
        lines += ["  " + " ".join(f"{a:5.3f}" for a in row) for row in r["matrix"]]
    lines += ["", f"| {'method':<12} | {'avg accuracy':>12} | {'avg forgetting':>14} | {'seconds':>7} |",
              f"|{'-' * 14}|{'-' * 14}|{'-' * 16}|{'-' * 9}|"]
    for method, r in result["methods"].items():
        lines.append(f"| {method:<12} | {r['avg_accuracy']:>12.3f} | {r['avg_forgetting']:>14.3f} | {r['seconds']:>7.1f} |")
    if "lambda_sweep" in result:
        sw = result["lambda_sweep"]
        lines += ["", "lambda sweep (ewc): " + ", ".join(
            f"{k}: acc {v['avg_accuracy']:.3f} / forgetting {v['avg_forgetting']:.3f}" for k, v in sw["runs"].items()),
            f"best lambda by the sweep criterion ({sw['criterion']}): {sw['best_lambda']:g}"]
    return "\n".join(lines)
