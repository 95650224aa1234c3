"""Models the benchmarks and ``fastewc bench`` run on (also imported by benchmarks/*.py)."""

from __future__ import annotations

import torch.nn as nn


def transformer_like(params: float, d_model: int = 480, vocab: int = 8000) -> nn.Module:
    """A parameter set shaped like a transformer's, about ``params`` parameters.

    Embedding [vocab, d_model] + L blocks (qkv, proj, fc1, fc2 with biases, 2 LayerNorms: 12
    tensors per block) + a final LayerNorm; L is chosen to land near ``params``. Only the shapes
    matter: the penalty benchmarks never run its forward pass. 25e6 gives 26.0M in 99 tensors.
    """

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.fc1, self.fc2 = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    per_block = 12 * d_model * d_model + 13 * d_model
    layers = max(1, round((params - vocab * d_model) / per_block))
    return nn.Sequential(nn.Embedding(vocab, d_model), *[Block() for _ in range(layers)], nn.LayerNorm(d_model))


# -- Fisher benchmark models (N = 512 samples; the README's Fisher table is measured on these) ----
def fisher_mlp() -> nn.Module:
    """MLP 784-1000-1000-10 (1.79M parameters), inputs [N, 784]."""
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))


def fisher_cnn() -> nn.Module:
    """Small CNN on 3x32x32: two conv(3x3)+BatchNorm+ReLU+pool stages, then a linear head (10 classes)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


class FisherTransformer(nn.Module):
    """2-layer Transformer encoder, d=128, 4 heads, feed-forward 256, dropout 0.1, on 32 tokens of
    a 1000-word vocabulary; mean-pooled into a 10-class head. Inputs: int64 [N, 32]."""

    def __init__(self, vocab: int = 1000, d: int = 128, seq: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * __import__("torch").randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.encoder(self.embed(x) + self.pos)
        return self.head(h.mean(1))


def fisher_problem(name: str, n: int = 512, batch_size: int = 64, seed: int = 0):
    """``(model, list of (inputs, targets) batches)`` for the Fisher benchmarks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model, x = fisher_mlp(), torch.randn(n, 784, generator=g)
    elif name == "cnn":
        model, x = fisher_cnn(), torch.randn(n, 3, 32, 32, generator=g)
    elif name == "transformer":
        model, x = FisherTransformer(), torch.randint(0, 1000, (n, 32), generator=g)
    else:
        raise ValueError(f"unknown Fisher benchmark model {name!r}; expected mlp, cnn or transformer")
    y = torch.randint(0, 10, (n,), generator=g)
    model.eval()
    return model, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


FISHER_MODELS = ("mlp", "cnn", "transformer")
