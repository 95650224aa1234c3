"""EWC on LoRA adapters: the Fisher, the stored buffers and the penalty cover only the adapters.

A frozen base model gets low-rank adapters (hand-rolled here, the same shape as PEFT's
``lora_A`` / ``lora_B``; with PEFT use ``get_peft_model`` and nothing else changes: fastewc
selects parameters by ``requires_grad``). Task A trains the adapters; their Fisher is estimated
and registered; task B trains them again with the penalty.

    python examples/lora_ewc.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B A x`` with the base frozen; B starts at zero (PEFT's init)."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def lora_mlp() -> nn.Module:
    return nn.Sequential(LoRALinear(nn.Linear(32, 64)), nn.ReLU(), LoRALinear(nn.Linear(64, 5)))


def task(seed: int, n: int = 256):
    """A synthetic 5-class task: labels from one random linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 5, generator=g)).argmax(1)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def train(model, data, ewc=None, epochs=20):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if ewc is not None:
                ewc.accumulate_grad_(model)
            opt.step()


def run(seed: int = 0) -> dict:
    """Train task A, consolidate the adapters, train task B with the penalty; return what happened."""
    torch.manual_seed(seed)
    model = lora_mlp()
    a, b = task(1), task(2)
    train(model, a)
    ewc = EWCRegularizer(100.0)
    # Fisher, optimum snapshot and registration in one call; adapters only, because the frozen
    # base has no requires_grad.
    fisher, optimum = ewc.consolidate(model, a)
    train(model, b, ewc)
    with torch.no_grad():
        penalty = float(ewc(model))
    return {"model": model, "ewc": ewc, "fisher": fisher, "optimum": optimum, "penalty": penalty}


def main() -> None:
    out = run()
    model, fisher = out["model"], out["fisher"]
    print("Fisher computed for:", sorted(fisher))
    n_adapter = sum(model.get_parameter(n).numel() for n in fisher)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"protected {n_adapter} of {n_all} parameters ({100 * n_adapter / n_all:.1f}%)")
    print(f"penalty after task B: {out['penalty']:.4f}")


if __name__ == "__main__":
    main()
