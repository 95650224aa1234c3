"""pytest-benchmark suite for the penalty step: every backend against the reference loop, the
per-task ``torch._foreach`` baseline and (``--bench-compile``) ``torch.compile`` of the loop.

Groups: ``penalty fwd+bwd <size>`` (``ewc(model).backward()``, adding into an existing grad) and
``penalty accumulate_grad_ <size>``. The timed target synchronises the device. Before it is
timed, every case's value and the gradient it adds into ``.grad`` are checked against
:func:`fastewc.reference.ewc_penalty_loop` run in float64 on the same tasks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastewc import EWCRegularizer
from fastewc.bench import timing
from fastewc.bench.baselines import ForeachEWC, compiled_reference
from fastewc.bench.models import transformer_like
from fastewc.penalty.backends import triton_status
from fastewc.reference import ReferenceEWC, ewc_penalty_loop

TASKS = 3
LAMBDA = 1000.0
# float32 parameters and storage against the float64 loop: the collapsed form's (theta - m) on
# parameters near 1 (LayerNorm weights) loses a few float32 digits to cancellation.
RTOL = 1e-4


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


@pytest.fixture(scope="module")
def expected(problem):
    """The float64 reference loop's value and gradients on the problem's tasks (the float32 Fisher
    and anchors are promoted term by term, so no float64 copy of them is made)."""
    model, tasks = problem
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None  # not copied into the float64 model
    model64 = copy.deepcopy(model).double()
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    value = ewc_penalty_loop(model64, [f for f, _ in tasks], [a for _, a in tasks], LAMBDA)
    value.backward()
    return value.detach(), [p.grad.float() for p in model64.parameters()]


def check_step(step, model, expected) -> None:
    """``step()`` returns the penalty and adds its gradient into existing ``.grad`` (zeros here,
    so that what it added is the gradient); both must match the float64 loop."""
    value, grads = expected
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    got = step()
    torch.testing.assert_close(got.detach().double(), value, rtol=RTOL, atol=0)
    for (name, p), want in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, want, rtol=RTOL, atol=RTOL * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def _synced(fn, device):
    def run():
        fn()
        timing.sync(device)
    return run


def _reference(problem):
    ref = ReferenceEWC(LAMBDA)
    for f, a in problem[1]:
        ref.task_fishers.append(f)  # shared, not cloned: register_task's clone would double memory
        ref.task_params.append(a)
    return ref


def _fastewc(problem, backend, device):
    if backend == "triton" and triton_status(device) is not None:
        pytest.skip(f"triton backend unavailable: {triton_status(device)}")
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, not something to time")
    ewc = EWCRegularizer(LAMBDA, backend=backend)
    for f, a in problem[1]:
        ewc.register_task(f, a)
    return ewc


def _forward_backward(fn, model):
    def step():
        value = fn(model)
        value.backward()
        return value
    return step


# One test function for both steps: pytest then runs every case of one size before building the
# next size's problem (with two functions it interleaves the sizes and rebuilds each problem).
CASES = [("fwd+bwd", m) for m in ("reference", "foreach", "compile", "fastewc-torch", "fastewc-triton")] + \
        [("accumulate_grad_", m) for m in ("fastewc-torch", "fastewc-triton")]


@pytest.mark.parametrize("step,method", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_penalty(benchmark, problem, expected, penalty_size, step, method, bench_device, bench_compile):
    benchmark.group = f"penalty {step} {penalty_size / 1e6:g}M"
    model = problem[0]
    if method == "reference":
        fn = _reference(problem)
    elif method == "foreach":
        fn = ForeachEWC(LAMBDA)
        fn.tasks = list(problem[1])
    elif method == "compile":
        if not bench_compile:
            pytest.skip("torch.compile of the loop is opt-in: --bench-compile")
        fn = compiled_reference(_reference(problem))
    else:
        fn = _fastewc(problem, method.split("-")[1], bench_device)
    if step == "accumulate_grad_":
        check_step(lambda: fn.accumulate_grad_(model), model, expected)
        benchmark(_synced(lambda: fn.accumulate_grad_(model), bench_device))
    else:
        check_step(_forward_backward(fn, model), model, expected)
        benchmark(_synced(lambda: fn(model).backward(), bench_device))
