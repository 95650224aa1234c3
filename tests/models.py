"""Small models with the features the tests need: odd sizes, BatchNorm, frozen and tied weights."""

import torch
import torch.nn as nn


def mlp():
    return nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 5))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def frozen():
    m = mlp()
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


class Tied(nn.Module):
    """Embedding and output head share one weight (as in language models)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


MODELS = {"mlp": mlp, "cnn": CNN, "frozen": frozen, "tied": Tied}


def make_tasks(model, n_tasks, *, spread=1.0, names=None, dtype=None):
    """Random (fisher, optimal_params) dicts for every parameter (frozen ones too, as a Fisher
    estimator over all parameters would give), with anchors near the current weights."""
    tasks = []
    for _ in range(n_tasks):
        fisher, anchors = {}, {}
        for n, p in model.named_parameters():
            if names is not None and n not in names:
                continue
            f = torch.rand(p.shape, dtype=dtype or p.dtype)
            f[torch.rand(p.shape) < 0.1] = 0.0  # some exact zeros, as real Fishers have
            fisher[n] = f
            anchors[n] = (p.detach().to(dtype or p.dtype) + spread * torch.randn(p.shape, dtype=dtype or p.dtype))
        tasks.append((fisher, anchors))
    return tasks


def perturb(model, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
