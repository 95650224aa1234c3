"""The fused CPU kernel (``fastewc/kernels/quadratic_cpu.c`` through ``CpuBackend``): what is particular to
it (threads, its tables, choosing it; its build is tested in ``test_native_build.py``). The contract it shares with the Triton
backend is tested on both in ``test_fused_backends.py``.

Every backend here is built with ``poison=True``: the gradients it allocates start as NaN, so an
element the kernel fails to write shows up. ``split_cpu`` (tests/plans.py) makes even tiny groups
run on several threads whose shares cut through parameters, chunks and alignment gaps.
"""

import math
import multiprocessing
import warnings

import pytest
import torch
import torch.nn as nn

import fastewc.penalty.backends as backends
from fastewc import EWCRegularizer
from fastewc import reference as R
from fastewc.errors import EWCInputError
from fastewc.penalty.backends import cpu_backend as C
from fastewc.native.library import Library
from fastewc.penalty.native import quadratic as Q
from models import assert_penalty_steps, make_tasks, perturb, register_both
from plans import SHAPES, assert_grads, check_all_ops, make_plan, reference, split_cpu, value_of

pytestmark = pytest.mark.skipif(backends.cpu_backend_status(torch.device("cpu")) is not None,
                                reason=str(backends.cpu_backend_status(torch.device("cpu"))))

F32 = torch.float32
# Two chunks of the kernel and a tail that is not a multiple of its 16 lanes, next to SHAPES.
ODD_SHAPES = [*SHAPES, (4099,), (2, 1031)]


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_large_odd_group_across_threads_and_bitwise_repeat(threads):
    # Big enough to be split among threads without test settings; sizes not multiples of 16.
    plan = make_plan([(300_007,), (1,), (0,), (17, 3), (65_537,)], torch.bfloat16, torch.float32)
    be = C.CpuBackend(threads=threads, poison=True)
    check_all_ops(be, plan, lam=2.5)
    v, g = be.penalty_sum_and_grads(plan, 2.5)
    for _ in range(3):
        v2, g2 = be.penalty_sum_and_grads(plan, 2.5)
        assert v2 == v and all(torch.equal(a, b) for a, b in zip(g2, g))


def test_gap_holding_a_frozen_parameter_is_not_touched():
    # A parameter outside the plan (frozen) keeps its A and m in the flat buffers: the threads'
    # shares cover that gap, and the kernel must neither sum it nor write there.
    full = make_plan([(40,), (57,), (33,)], torch.float32, torch.float32)
    keep = [0, 2]
    plan = make_plan([], torch.float32, torch.float32)
    plan.importance, plan.anchor = full.importance, full.anchor
    plan.names = tuple(full.names[i] for i in keep)
    plan.offsets = tuple(full.offsets[i] for i in keep)
    plan.importance_views = [full.importance_views[i] for i in keep]
    plan.anchor_views = [full.anchor_views[i] for i in keep]
    plan.params = [full.params[i] for i in keep]
    be = split_cpu(4)
    check_all_ops(be, plan)
    _, grads = be.penalty_sum_and_grads(plan, 1.0)
    flat = grads[0]._base
    assert flat is not None and flat.numel() == full.importance.numel()


def test_nan_parameter_makes_the_value_nan_and_only_its_gradient():
    plan = make_plan([(50,), (70,)], torch.float32, torch.bfloat16)
    with torch.no_grad():
        plan.params[1][13] = float("nan")
    be = split_cpu(3)
    assert math.isnan(be.penalty_sum(plan))
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    assert math.isnan(be.accumulate_grad_(plan, 1.0))
    assert not plan.params[0].grad.isnan().any()
    assert plan.params[1].grad.isnan().nonzero().flatten().tolist() == [13]


def test_one_table_per_plan_serves_every_use():
    # A training loop alternating forward+backward (fresh gradients, a new buffer each step),
    # accumulate_grad_ (new gradients each step) and the value alone builds one table, at the
    # first call: the fresh gradients' column holds byte offsets from the buffer, not its
    # address, and the fused update's columns are written at every call.
    plan = make_plan([(40,), (3, 7)], torch.float32, torch.float32)
    be = C.CpuBackend(poison=True)
    want_v, want_g = reference(plan, 1.0)
    for step in range(4):
        _, g = be.penalty_sum_and_grads(plan, 1.0)
        assert_grads(g, want_g, torch.float32, plan)
        for p in plan.params:
            p.grad = torch.full_like(p, float(step))
        be.accumulate_grad_(plan, 1.0)
        assert_grads([p.grad for p in plan.params], [w + step for w in want_g], torch.float32, plan)
        assert be.penalty_sum(plan) == pytest.approx(float(want_v), rel=1e-5)
    assert be.table_builds == 1


def test_forced_on_float64_parameters_runs_those_on_pytorch(monkeypatch):
    # The kernel takes float32 and bfloat16; backend="cpu" on a model with float64 parameters
    # gives their group to the PyTorch backend when it binds, and says so.
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3).double())
    ewc, ref = register_both(EWCRegularizer(7.0, storage_dtype=torch.float32, backend="cpu"), R.ReferenceEWC(7.0),
                             make_tasks(model, 2, dtype=torch.float64), model=model)
    perturb(model)
    assert_penalty_steps(ewc, model, ref)
    assert ewc.active_backends == ("cpu", "torch")


def test_large_fresh_gradients_are_advised_huge_pages_and_correct(monkeypatch):
    # 3M float32 elements: the fresh gradient buffer spans whole 2 MB pages.
    calls = []
    real = C.advise_huge_pages
    monkeypatch.setattr(C, "advise_huge_pages", lambda t: (calls.append(t.numel() * t.element_size()), real(t))[1])
    plan = make_plan([(3_000_001,), (7,)], torch.float32, torch.float32)
    be = C.CpuBackend(threads=2, poison=True)
    want_v, want_g = reference(plan, 1.5)
    v, g = be.penalty_sum_and_grads(plan, 1.5)
    assert len(calls) == 1 and calls[0] >= 4 * 3_000_001
    torch.testing.assert_close(value_of(be, plan, v), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float32, plan)


def _child_step(plan, out):
    out.put(float(split_cpu(3, poison=False).penalty_sum(plan)))


def test_forked_child_runs_threaded_steps():
    # A child forked after the parent ran threaded steps inherits a pool without threads; it must
    # make its own instead of waiting forever.
    plan = make_plan([(5000,), (77,)], torch.float32, torch.float32)
    want = float(split_cpu(3, poison=False).penalty_sum(plan))
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_step, args=(plan, out))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a threaded step")
    assert child.exitcode == 0 and out.get(timeout=10) == want


# -- building the kernel, and choosing it ------------------------------------------------------
def test_build_reports_a_missing_compiler(tmp_path, monkeypatch):
    import fastewc.native.library as L

    monkeypatch.setattr(L, "c_compiler", lambda: None)  # no compiler on the PATH
    monkeypatch.delenv("CC", raising=False)
    k = Q.load(folder=tmp_path)
    assert k.lib is None and k.path is None and "no C compiler found" in k.why


def test_build_reports_a_failing_compiler(tmp_path):
    k = Q.load(cc=["false"], folder=tmp_path, features="flags: sse2")
    assert k.lib is None and "could not be built" in k.why and "exited with 1" in k.why
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))  # no half-written library


def test_build_is_cached_per_cpu(tmp_path):
    for flags in ("flags: sse2", "flags: sse2 avx2", "flags: sse2"):
        k = Q.load(folder=tmp_path / "cache", features=flags)
        assert k.why is None and k.lib.ewc_quadratic_f32_f32 is not None and k.path.parent == tmp_path / "cache"
    assert len(list((tmp_path / "cache").glob("quadratic_cpu-*.so"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_auto_falls_back_and_forcing_says_why(monkeypatch):
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    monkeypatch.setattr(Q._process, "value", Library(None, "no C compiler found (set CC, or install cc, gcc or clang)", None))
    monkeypatch.setattr(backends, "_TOLD_NO_CPU_KERNEL", False)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"fused CPU kernel is not available \(no C compiler found.*PyTorch backend"):
        assert backends.select_backend("auto", cpu, F32, F32).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert backends.select_backend("auto", cpu, F32, F32).name == "torch"
        assert backends.select_backend("torch", cpu, F32, F32).name == "torch"
    with pytest.raises(EWCInputError, match=r"backend 'cpu' is not available: no C compiler found"):
        backends.select_backend("cpu", cpu, F32, F32)
    why = backends.cpu_backend_status(torch.device("cuda"))
    assert why is not None and "runs on CPU tensors" in why


def test_auto_takes_the_kernel_on_cpu_and_env_forces_a_backend(monkeypatch):
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert backends.select_backend("auto", cpu, F32, F32).name == "cpu"
    monkeypatch.setenv("FASTEWC_BACKEND", "torch")
    assert backends.select_backend("auto", cpu, F32, F32).name == "torch"
    monkeypatch.setenv("FASTEWC_BACKEND", "cpu")
    assert backends.select_backend("torch", cpu, F32, F32).name == "cpu"
    monkeypatch.setenv("FASTEWC_BACKEND", "gpu")
    with pytest.raises(EWCInputError, match=r"unknown FASTEWC_BACKEND 'gpu'; expected .*'cpu'"):
        backends.select_backend("auto", cpu, F32, F32)


def test_constructor_arguments():
    with pytest.raises(ValueError, match=r"threads must be >= 1, got 0"):
        C.CpuBackend(threads=0)


def test_source_ships_beside_the_triton_kernels():
    src = C.source_path()
    assert src.name == "quadratic_cpu.c" and src.is_file()
    assert (src.parent / "ewc_penalty.py").is_file()
