"""pytest-benchmark suite for the Fisher diagonal: each estimate_fisher method and kind against the
reference per-sample loop, on the three benchmark models. Groups: ``fisher <model> <kind>``.

Every timed case's Fisher is checked against the float64 reference on the same model and data
(the per-sample loop; for ``method="batched"``, the original code's batch-squared approximation,
which is what that method computes): a fast case that computed something else would otherwise be
timed as if it were right."""

from __future__ import annotations

import copy
import warnings

import pytest

from fastewc import estimate_fisher, reference
from fastewc.bench import timing
from fastewc.bench.models import FISHER_MODELS, fisher_problem
from models import assert_fisher_close  # tests/models.py (benchmarks/conftest.py puts tests/ on the path)

REFERENCE = {"empirical": reference.compute_fisher, "exact": reference.compute_exact_fisher}
# float32 against float64: per-sample gradients rounded in float32, squared and summed over N.
RTOL, ATOL_REL = 1e-3, 1e-5


@pytest.fixture(scope="module", params=FISHER_MODELS)
def problem(request, fisher_samples, bench_device):
    model, data = fisher_problem(request.param, n=fisher_samples)
    return request.param, model.to(bench_device), [(x.to(bench_device), y.to(bench_device)) for x, y in data]


@pytest.fixture(scope="module")
def expected(problem, fisher_samples):
    """``{(kind, which): Fisher}`` computed in float64 on a copy of the problem, on first use."""
    _, model, data = problem
    model64 = copy.deepcopy(model).double()
    data64 = [(x.double() if x.is_floating_point() else x, y) for x, y in data]
    cache = {}

    def get(kind, which):
        if (kind, which) not in cache:
            if which == "batched":
                cache[kind, which] = reference.batch_fisher_estimation(model64, data64, fisher_samples)
            else:
                cache[kind, which] = REFERENCE[kind](model64, data64, fisher_samples)
        return cache[kind, which]
    return get


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("method", ["reference", "auto", "rules", "vmap", "loop", "batched"])
def test_fisher(benchmark, problem, expected, kind, method, fisher_samples, bench_device):
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
        timing.sync(bench_device)
        return out

    fisher = benchmark.pedantic(timed, rounds=1 if method == "reference" and kind == "exact" else 3,
                                warmup_rounds=0, iterations=1) if benchmark.enabled else benchmark(timed)
    assert_fisher_close(fisher, expected(kind, "batched" if method == "batched" else "per-sample"), RTOL, ATOL_REL)
