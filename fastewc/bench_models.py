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
