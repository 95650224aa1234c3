"""One module placed at two paths of the model (a block twice in an ``nn.ModuleList``, ALBERT's
shared layers): the model is left intact (``torch.func.functional_call`` alone would leave a
plain tensor where the parameter was), the rules cover the module as one site with two uses, and
every engine matches the reference loop in float64."""

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import reference as R
from fastewc.fisher.functional import call_once

from models import Scale, assert_fisher_close, batches
from random_models import UsedTwice

D = torch.float64


class Twice(nn.Module):
    """A Linear and a parameter-only block, each placed twice in the chain."""

    def __init__(self, d=5):
        super().__init__()
        lin, scale = nn.Linear(d, d), UsedTwice(d)
        self.chain = nn.ModuleList([lin, scale, nn.LayerNorm(d), lin, scale])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.chain:
            x = block(x)
        return self.head(x)


def _make():
    model = Twice().to(D)
    return model, batches(torch.randn(7, 5, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)


def test_call_once_restores_a_module_placed_twice():
    model, data = _make()
    before = {n: id(p) for n, p in model.named_parameters()}
    values = {n: p.detach() * 2 for n, p in model.named_parameters()}
    out = call_once(model, values, (data[0][0],))
    assert {n: id(p) for n, p in model.named_parameters()} == before
    assert all(isinstance(m.g, nn.Parameter) for m in model.chain if isinstance(m, UsedTwice))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.mul_(2)
        assert torch.equal(out, model(data[0][0]))  # the values were used at both paths


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("method", ["auto", "rules", "vmap", "loop"])
def test_module_placed_twice(method, kind):
    model, data = _make()
    before = {n: id(p) for n, p in model.named_parameters()}
    ref = R.estimate_fisher(model, data, kind=kind, generator=torch.Generator().manual_seed(2))
    got, info = fastewc.estimate_fisher(model, data, kind=kind, method=method, return_info=True,
                                        generator=torch.Generator().manual_seed(2))
    assert {n: id(p) for n, p in model.named_parameters()} == before, "the model's parameters were replaced"
    assert_fisher_close(got, ref, rtol=1e-10)
    if method in ("auto", "rules"):
        # one site per module, two uses: no per-sample fallback
        assert info.methods["chain.0.weight"] == "linear" and info.methods["chain.1.g"] == "module-local"
        assert not info.vmap_params and not info.loop_params, info.summary()


class SharedBlock(nn.Module):
    """ALBERT's sharing: one Linear, one LayerNorm and one scale applied to the hidden states
    three times; the Linear also to a pooled summary (no position axis) and to a view with two
    position axes, so that its calls have 3 x T, 1 and 4 positions."""

    def __init__(self, d=5):
        super().__init__()
        self.emb, self.lin, self.norm, self.scale = nn.Linear(3, d), nn.Linear(d, d), nn.LayerNorm(d), Scale(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        for _ in range(3):
            h = self.norm(self.scale(torch.tanh(self.lin(h))))
        pooled = self.lin(h.mean(1))
        pairs = self.lin(h[:, :2].unsqueeze(2).expand(-1, -1, 2, -1))
        return self.head(pooled + pairs.mean((1, 2)))


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
def test_a_position_wise_layer_called_several_times_is_summed_as_one_call(kind):
    """Each call's positions are joined into one call (the rule sees every call's positions at
    once, no per-sample blocks of each call added up); exact against the reference loop."""
    seen = []

    @fastewc.register_rule(Scale, sequence=True)
    def pos_scale(module, A, G):
        seen.append(A.shape[1:-1].numel())
        return {"weight": (G * A).reshape(A.shape[0], -1, A.shape[-1]).sum(1)}

    try:
        torch.manual_seed(5)
        model = SharedBlock().to(D)
        data = batches(torch.randn(7, 4, 3, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)
        fastewc.fisher.clear_plan_cache()
        gen = torch.Generator().manual_seed(1)
        got, info = fastewc.estimate_fisher(model, data, kind=kind, method="rules", return_info=True, generator=gen)
        ref = R.estimate_fisher(model, data, kind=kind, generator=torch.Generator().manual_seed(1))
        assert_fisher_close(got, ref, rtol=1e-10)
        assert {info.methods[p] for p in ("lin.weight", "norm.weight", "scale.weight")} == \
            {"linear", "layernorm", "pos_scale"}, info.summary()
        assert not info.vmap_params and not info.loop_params
        assert seen and set(seen) == {3 * 4}, seen  # the three calls' 4 positions each, joined
    finally:
        fastewc.fisher.unregister_rule(Scale)
