"""Gradients that share memory are squared once: autograd may hand two parameters one buffer (or
views of one) — ``torch.cat([cls.expand(B, -1, -1), x], 1) + pos`` gives ``cls`` a view of the
buffer ``pos``'s gradient is summed from, and a fused RNN kernel gives its two biases one
tensor. Every engine, every kind, float64, against the reference loop; and the probe, whose own
truth shares nothing with the engines, keeps the rules for such parameters."""

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import reference as R

from models import assert_fisher_close, batches

D = torch.float64
METHODS = ["auto", "rules", "vmap", "loop"]
KINDS = ["empirical", "sampled", "exact"]


class ClsPos(nn.Module):
    """A class token in front of the sequence, a positional table added: ViT's pattern."""

    def __init__(self, d=6, T=4, classes=3):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, T + 1, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(h.tanh().mean(1))


class OneBuffer(torch.autograd.Function):
    """``h + a + b`` whose backward returns one tensor for both ``a`` and ``b``, as a fused LSTM
    kernel does for ``bias_ih`` and ``bias_hh``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, a, b):
        return h + a + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        s = g.sum(0) if g.dim() > 1 else g
        return g, s, s


class TwoBiases(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, h):
        return torch.tanh(OneBuffer.apply(h, self.a, self.b))


def _cls_pos():
    model = ClsPos().to(D)
    return model, batches(torch.randn(7, 4, 6, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)


def _two_biases():
    model = nn.Sequential(nn.Linear(4, 5), TwoBiases(), nn.Linear(5, 3)).to(D)
    return model, batches(torch.randn(7, 4, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [_cls_pos, _two_biases], ids=["cls_pos", "two_biases"])
def test_shared_gradient_memory_squared_once(make, method, kind):
    model, data = make()
    ref = R.estimate_fisher(model, data, kind=kind, generator=torch.Generator().manual_seed(4))
    got = fastewc.estimate_fisher(model, data, kind=kind, method=method, generator=torch.Generator().manual_seed(4))
    assert_fisher_close(got, ref, rtol=1e-10)


@pytest.mark.parametrize(("make", "rule", "names"), [
    (_cls_pos, "op-local", ["cls", "pos"]),
    (_two_biases, "module-local", ["1.a", "1.b"]),
], ids=["cls_pos", "two_biases"])
def test_probe_keeps_the_rules_of_parameters_with_shared_gradient_memory(make, rule, names):
    # The probe proves the plan against its own plain loop: a defect of the loop engine (squaring
    # one buffer twice) cannot make it reject the right rule and keep the wrong path.
    model, data = make()
    got, info = fastewc.estimate_fisher(model, data, method="auto", return_info=True)
    assert {n: info.methods.get(n) for n in names} == {n: rule for n in names}, info.summary()
    assert not info.vmap_params and not info.loop_params, info.summary()
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
