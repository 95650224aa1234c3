"""The Fisher benchmark's anchors (``fisher_anchors.py``: BackPACK, ASDL, nngeometry) compute the
quantity fastewc does:
the mean over the N samples of the per-sample Fisher diagonal, with the cross-entropy loss.
Empirical and exact kinds are checked entry by entry against the reference loop; the sampled kind
(one drawn label per sample) by its scale against the exact Fisher. A missing package or a layer
an anchor cannot see gives ``(None, reason)``, which the benchmark records as a skipped row."""

import importlib
import importlib.util

import pytest
import torch
import torch.nn as nn

from fastewc import reference
from fastewc.bench import fisher_benchmark

import fisher_anchors
from models import assert_fisher_close  # tests/models.py (benchmarks/conftest.py puts tests/ on the path)

# (import name of the anchor's package, its case, the install command its skip reason names)
ANCHORS = {
    "BackPACK": ("backpack", fisher_anchors.backpack_case, "pip install --no-deps backpack-for-pytorch"),
    "ASDL": ("asdl", fisher_anchors.asdl_case, "pip install --no-deps asdfghjkl nngeometry"),
    "nngeometry": ("nngeometry", fisher_anchors.nngeometry_case, "pip install --no-deps asdfghjkl nngeometry"),
}


def batches(*tensors, batch_size):
    n = tensors[0].shape[0]
    return [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def make_mlp(n, batch_size):
    model = nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 5))
    return model, batches(torch.randn(n, 13), torch.randint(0, 5, (n,)), batch_size=batch_size)


def make_cnn(n, batch_size):
    """A tiny CNN as an nn.Sequential (BackPACK's second-order extensions need one) with a
    BatchNorm whose running statistics and affine weights are not the defaults."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.randn(4) * 0.5)
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.rand(4) + 0.5)
        bn.bias.copy_(torch.randn(4) * 0.1)
    return model, batches(torch.randn(n, 3, 6, 6), torch.randint(0, 3, (n,)), batch_size=batch_size)


MAKERS = {"mlp": make_mlp, "cnn": make_cnn}


def _case(anchor):
    package, case, _ = ANCHORS[anchor]
    pytest.importorskip(package)
    return case


@pytest.mark.parametrize("model_name", sorted(MAKERS))
@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("anchor", sorted(ANCHORS))
def test_anchor_matches_the_reference(anchor, kind, model_name):
    case = _case(anchor)
    # An uneven last batch: the anchors must divide by N, not by batches x batch size.
    model, data = MAKERS[model_name](n=19, batch_size=8)
    model.eval()
    fn, why = case(model, data, kind)
    assert fn is not None, why
    assert_fisher_close(fn(), reference.estimate_fisher(model, data, kind=kind), rtol=1e-4, atol_rel=1e-5)


@pytest.mark.parametrize("model_name", sorted(MAKERS))
@pytest.mark.parametrize("anchor", sorted(ANCHORS))
def test_anchor_sampled_fisher_has_the_exact_fishers_scale(anchor, model_name):
    case = _case(anchor)
    model, data = MAKERS[model_name](n=64, batch_size=16)
    model.eval()
    fn, why = case(model, data, "sampled")
    assert fn is not None, why
    exact = reference.estimate_fisher(model, data, kind="exact")
    # One drawn label per sample is noisy; eight draws bring the mean within a few percent.
    draws = [fn() for _ in range(8)]
    assert set(draws[0]) == set(exact)
    mc_mean = sum(float(d[n].sum()) for d in draws for n in exact) / len(draws)
    exact_mean = sum(float(t.sum()) for t in exact.values())
    assert mc_mean == pytest.approx(exact_mean, rel=0.2)


@pytest.mark.parametrize("anchor", sorted(ANCHORS))
def test_missing_package_gives_a_reason_with_the_install_command(anchor, monkeypatch):
    package, case, command = ANCHORS[anchor]
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"no {package} here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    model, data = make_mlp(n=4, batch_size=4)
    fn, why = case(model.eval(), data, "empirical")
    assert fn is None and command in why


class ScaledMLP(nn.Module):
    """A Linear layer followed by a bare parameter, which no anchor's layer hooks see."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("anchor", sorted(ANCHORS))
def test_parameter_outside_the_anchors_layers_skips_it(anchor):
    case = _case(anchor)
    model = ScaledMLP().eval()
    data = batches(torch.randn(6, 5), torch.randint(0, 3, (6,)), batch_size=3)
    fn, why = case(model, data, "empirical")
    assert fn is None and why.startswith(f"{anchor} does not support this model")


def test_fisher_benchmark_times_the_anchors_beside_fastewc():
    importable = [a for a, (package, _, _) in ANCHORS.items() if importlib.util.find_spec(package) is not None]
    if not importable:
        pytest.skip("no anchor library installed")
    result = fisher_benchmark(samples=8, repeats=1, models=("mlp",), methods=("auto",), kinds=("exact",),
                              floor=False, extra_cases=fisher_anchors.cases)
    methods = {r["method"] for r in result["rows"]}
    expected = {"BackPACK": "BackPACK DiagGGNExact", "ASDL": "ASDL fisher_exact",
                "nngeometry": "nngeometry FIM PMatDiag"}
    assert {expected[a] for a in importable} <= methods
    assert "fastewc auto" in methods and not result["skipped"]
    assert all(r["seconds"] > 0 for r in result["rows"])


def test_cases_name_every_anchor_and_leave_dict_batches_alone():
    model, data = make_mlp(n=4, batch_size=4)
    labels = [label for label, _, _ in fisher_anchors.cases(model.eval(), data, "exact")]
    assert labels == ["BackPACK DiagGGNExact", "ASDL fisher_exact", "nngeometry FIM PMatDiag"]
    assert fisher_anchors.cases(model, [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}], "exact") == []
