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

from models import assert_fisher_close, batches
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
