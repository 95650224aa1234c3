"""pytest-benchmark suite for the penalty step: every backend against the reference loop, the
per-task ``torch._foreach`` baseline and (``--bench-compile``) ``torch.compile`` of the loop.

Groups: ``penalty fwd+bwd <size>`` (``ewc(model).backward()``, adding into an existing grad) and
``penalty accumulate_grad_ <size>``. The timed target synchronises the device.
"""

from __future__ import annotations

import pytest
import torch

from fastewc import EWCRegularizer
from fastewc.bench import timing as bu
from fastewc.penalty.backends import triton_status
from fastewc.bench.baselines import ForeachEWC, compiled_reference
from fastewc.bench.models import transformer_like
from fastewc.reference import ReferenceEWC

TASKS = 3


@pytest.fixture(scope="module")
def problem(penalty_size, bench_device):
    torch.manual_seed(0)
    model = transformer_like(penalty_size).to(bench_device)
    tasks = []
    for _ in range(TASKS):
        tasks.append(({n: torch.rand_like(p) for n, p in model.named_parameters()},
                      {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, tasks


def _synced(fn, device):
    def run():
        fn()
        bu.sync(device)
    return run


def _reference(problem):
    ref = ReferenceEWC(1000.0)
    for f, a in problem[1]:
        ref.task_fishers.append(f)  # shared, not cloned: register_task's clone would double memory
        ref.task_params.append(a)
    return ref


def _fastewc(problem, backend, device):
    if backend == "triton" and triton_status(device) is not None:
        pytest.skip(f"triton backend unavailable: {triton_status(device)}")
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, not something to time")
    ewc = EWCRegularizer(1000.0, backend=backend)
    for f, a in problem[1]:
        ewc.register_task(f, a)
    return ewc


@pytest.mark.parametrize("method", ["reference", "foreach", "compile", "fastewc-torch", "fastewc-triton"])
def test_penalty_fwd_bwd(benchmark, problem, penalty_size, method, bench_device, bench_compile):
    benchmark.group = f"penalty fwd+bwd {penalty_size / 1e6:g}M"
    model = problem[0]
    if method == "reference":
        fn = _reference(problem)
    elif method == "foreach":
        fn = ForeachEWC(1000.0)
        fn.tasks = list(problem[1])
    elif method == "compile":
        if not bench_compile:
            pytest.skip("torch.compile of the loop is opt-in: --bench-compile")
        fn = compiled_reference(_reference(problem))
    else:
        fn = _fastewc(problem, method.split("-")[1], bench_device)
    value = fn(model)
    assert torch.isfinite(value)
    benchmark(_synced(lambda: fn(model).backward(), bench_device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_penalty_accumulate(benchmark, problem, penalty_size, backend, bench_device):
    benchmark.group = f"penalty accumulate_grad_ {penalty_size / 1e6:g}M"
    ewc = _fastewc(problem, backend, bench_device)
    model = problem[0]
    assert torch.isfinite(ewc.accumulate_grad_(model))
    benchmark(_synced(lambda: ewc.accumulate_grad_(model), bench_device))
