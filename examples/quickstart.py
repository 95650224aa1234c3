"""Quick start: learn task A, then task B, with and without EWC; report how much of A survives.

Two synthetic 4-class problems on 20-dimensional inputs: task A's inputs use features 0-9, task
B's features 10-19, each labelled by its own random linear rule, so one network can solve both.
A small MLP learns A, its Fisher diagonal is estimated on A's data, and the model then learns B
twice from the same starting point (with a high learning rate, which makes it forget): once
plainly, once with the EWC penalty added to the loss. Runs in a few seconds on a CPU.

    python examples/quickstart.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastewc import EWCRegularizer, estimate_fisher


def make_task(seed: int, n: int = 2048) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 20)
    features = slice(0, 10) if seed == 1 else slice(10, 20)
    x[:, features] = torch.randn(n, 10, generator=g)
    rule = torch.randn(20, 4, generator=g)
    return TensorDataset(x, (x @ rule).argmax(dim=1))


def train(model, data, epochs, lr, ewc=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            loss = F.cross_entropy(model(x), y)
            if ewc is not None:
                loss = loss + ewc(model)  # differentiable penalty: backward() adds its gradient
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, data) -> float:
    x, y = data.tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    task_a, task_b = make_task(1), make_task(2)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    train(model, task_a, epochs=10, lr=1e-3)
    print(f"after task A:            accuracy on A {accuracy(model, task_a):.3f}")

    # Fisher diagonal on A (mean squared per-sample gradient) and A's optimum, then register.
    fisher = estimate_fisher(model, DataLoader(task_a, batch_size=64), num_samples=512)
    optimum = {n: p.detach().clone() for n, p in model.named_parameters()}
    ewc = EWCRegularizer(lambda_ewc=1e5)  # the Fisher here is ~1e-3 on average
    ewc.register_task(fisher, optimum)

    for name, reg in (("plain fine-tuning", None), ("with EWC", ewc)):
        m = copy.deepcopy(model)
        train(m, task_b, epochs=10, lr=1e-2, ewc=reg)
        print(f"after task B, {name:<17} accuracy on A {accuracy(m, task_a):.3f}, on B {accuracy(m, task_b):.3f}")


if __name__ == "__main__":
    main()
