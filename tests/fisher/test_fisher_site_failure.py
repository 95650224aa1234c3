"""A module whose per-sample replay fails (``torch.func`` cannot take it: ``.item()`` here, an
``nn.LSTM`` fused kernel in practice) costs that module only: the probe drops its site, the other
layers keep their rules, and the result matches the reference loop in float64."""

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import reference as R

from models import assert_fisher_close, batches

D = torch.float64


class ItemScale(nn.Module):
    """Reads a number out of the tensor (``.item()``): fine in a batched pass, not under vmap."""

    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, h):
        return torch.tanh(h * self.g) * (1.0 + 0.0 * h.abs().max().item())


def test_failed_replay_costs_its_module_only():
    model = nn.Sequential(nn.Linear(4, 5), ItemScale(5), nn.Linear(5, 3)).to(D)
    data = batches(torch.randn(7, 4, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)
    with pytest.warns(UserWarning, match="torch.func could not transform the model"):
        got, info = fastewc.estimate_fisher(model, data, method="auto", return_info=True)
    assert {n: info.methods.get(n) for n in ["0.weight", "0.bias", "2.weight", "2.bias"]} == dict.fromkeys(
        ["0.weight", "0.bias", "2.weight", "2.bias"], "linear"), info.summary()
    assert info.loop_params == ["1.g"], info.summary()
    assert "the per-sample replay of local:1 failed" in info.reasons["1.g"]
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
