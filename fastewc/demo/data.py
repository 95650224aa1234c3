"""Task sequences built from ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes).

Inputs are the 64 pixels scaled to [0, 1]; a fixed, seeded 80/20 train/test split is shared by
all tasks. Each :class:`Task` carries its data with targets already in the label space of the
output slice it trains (``classes``), so one MLP with 10 outputs serves every scenario:

* ``permuted``: task k applies a fixed pixel permutation (task 0: identity); all 10 classes.
* ``split`` / ``task``-incremental: task k holds digits {2k, 2k+1}; the output is restricted to
  those two logits (a per-task head), targets 0/1.
* ``split`` / ``domain``-incremental: the same pairs, one shared 2-logit head (logits 0 and 1),
  targets 0/1 ("is it the even or the odd digit of the pair").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._utils import require


@dataclass
class Task:
    name: str
    x_train: torch.Tensor  # [N, 64] float32
    y_train: torch.Tensor  # [N] int64, in 0..len(classes)-1
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...] | None  # logits this task reads; None = all 10


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``([1797, 64] float32 in [0, 1], [1797] int64)``."""
    datasets = require("sklearn.datasets", extra="demo", package="scikit-learn")
    d = datasets.load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.int64)


def _split(x, y, seed: int, train_fraction: float = 0.8):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = int(round(train_fraction * len(y)))
    return x[order[:n]], y[order[:n]], x[order[n:]], y[order[n:]]


def permuted_digits(num_tasks: int = 5, seed: int = 0) -> list[Task]:
    x, y = load_digits_tensors()
    xtr, ytr, xte, yte = _split(x, y, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tasks = []
    for k in range(num_tasks):
        perm = torch.arange(64) if k == 0 else torch.randperm(64, generator=g)
        tasks.append(Task(f"perm{k}", xtr[:, perm], ytr, xte[:, perm], yte, None))
    return tasks


def split_digits(scenario: str = "task", seed: int = 0) -> list[Task]:
    if scenario not in ("task", "domain"):
        raise ValueError(f"split scenario must be 'task' or 'domain'; got {scenario!r}")
    x, y = load_digits_tensors()
    xtr, ytr, xte, yte = _split(x, y, seed)
    tasks = []
    for k in range(5):
        pair = (2 * k, 2 * k + 1)
        tr, te = (ytr // 2) == k, (yte // 2) == k
        classes = pair if scenario == "task" else (0, 1)
        tasks.append(Task(f"digits{pair[0]}{pair[1]}", xtr[tr], ytr[tr] - 2 * k, xte[te], yte[te] - 2 * k, classes))
    return tasks
