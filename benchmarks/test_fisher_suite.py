"""pytest-benchmark suite for the Fisher diagonal: each estimate_fisher method and kind against the
reference per-sample loop, on the three benchmark models. Groups: ``fisher <model> <kind>``."""

from __future__ import annotations

import warnings

import pytest
import torch

from fastewc.bench import timing as bu
from fastewc import estimate_fisher, reference
from fastewc.bench.models import FISHER_MODELS, fisher_problem

REFERENCE = {"empirical": reference.compute_fisher, "exact": reference.compute_exact_fisher}


@pytest.fixture(scope="module", params=FISHER_MODELS)
def problem(request, fisher_samples, bench_device):
    model, data = fisher_problem(request.param, n=fisher_samples)
    return request.param, model.to(bench_device), [(x.to(bench_device), y.to(bench_device)) for x, y in data]


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("method", ["reference", "auto", "rules", "vmap", "loop", "batched"])
def test_fisher(benchmark, problem, kind, method, fisher_samples, bench_device):
    name, model, data = problem
    benchmark.group = f"fisher {name} {kind}"
    if method == "batched" and kind != "empirical":
        pytest.skip("the batch-squared approximation exists for the empirical kind only")
    if method == "reference":
        def run():
            return REFERENCE[kind](model, data, fisher_samples)
    else:
        def run():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                return estimate_fisher(model, data, kind=kind, method=method)

    def timed():
        out = run()
        bu.sync(bench_device)
        return out

    fisher = benchmark.pedantic(timed, rounds=1 if method == "reference" and kind == "exact" else 3,
                                warmup_rounds=0, iterations=1) if benchmark.enabled else benchmark(timed)
    assert all(torch.isfinite(f).all() for f in fisher.values())
