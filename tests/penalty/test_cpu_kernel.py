"""The fused CPU kernel (``kernels/quadratic_cpu.c`` through ``CpuBackend``) against a float64 reference.

Every backend here is built with ``poison=True``: the gradients it allocates start as NaN, so an
element the kernel fails to write shows up. ``split`` makes even tiny groups run on several
threads whose shares cut through parameters, chunks and alignment gaps.
"""

import multiprocessing
import os

import pytest
import torch
import torch.nn as nn

import fastewc.penalty.backends as backends
from fastewc import EWCRegularizer
from fastewc.errors import EWCInputError
from fastewc.penalty.backends import TorchBackend
from fastewc.penalty.backends import cpu_backend as C
from plans import DTYPES, SHAPES, assert_grads, make_plan, reference, value_rtol

pytestmark = pytest.mark.skipif(backends.cpu_backend_status(torch.device("cpu")) is not None,
                                reason=str(backends.cpu_backend_status(torch.device("cpu"))))

KERNEL_DTYPES = [torch.float32, torch.bfloat16]
# Two chunks of the kernel and a tail that is not a multiple of its 16 lanes, next to SHAPES.
ODD_SHAPES = [*SHAPES, (4099,), (2, 1031)]


@pytest.fixture
def split(monkeypatch):
    monkeypatch.setattr(C, "PARALLEL_FROM", 0)
    monkeypatch.setattr(C, "SHARE_ALIGN", 16)


def check_all_ops(be, plan, lam=0.7):
    want_v, want_g = reference(plan, lam)
    rtol = value_rtol(plan)
    v = be.penalty_sum(plan)
    assert v.shape == () and v.dtype == plan.compute_dtype
    torch.testing.assert_close(v.double(), want_v, rtol=rtol, atol=0)

    v2, g2 = be.penalty_sum_and_grads(plan, lam)
    torch.testing.assert_close(v2.double(), want_v, rtol=rtol, atol=0)
    assert_grads(g2, want_g, plan.param_dtype, plan)

    g3 = be.penalty_grads(plan, torch.tensor(lam * 3.0, dtype=plan.compute_dtype))
    assert_grads(g3, [3.0 * w for w in want_g], plan.param_dtype, plan)

    # Fused update: some grads exist (added to), some are None (allocated, written).
    before = {}
    for i, p in enumerate(plan.params):
        p.grad = None
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, dtype=torch.float64).to(plan.param_dtype)
            before[i] = p.grad.clone()
    v4 = be.accumulate_grad_(plan, lam)
    torch.testing.assert_close(v4.double(), want_v, rtol=rtol, atol=0)
    expect = [w + before[i].double() if i in before else w for i, w in enumerate(want_g)]
    assert_grads([p.grad for p in plan.params], expect, plan.param_dtype, plan)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("storage", DTYPES)
def test_every_dtype_pair_all_ops(param_dtype, storage, threads, split):
    # Pairs the kernel does not take (float16, float64) run on the PyTorch backend, whole.
    plan = make_plan(ODD_SHAPES, param_dtype, storage)
    be = C.CpuBackend(threads=threads, poison=True)
    check_all_ops(be, plan)
    assert (be.table_builds > 0) == (param_dtype in KERNEL_DTYPES and storage in KERNEL_DTYPES)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_large_odd_group_across_threads_and_bitwise_repeat(threads):
    # Big enough to be split among threads without test settings; sizes not multiples of 16.
    plan = make_plan([(300_007,), (1,), (0,), (17, 3), (65_537,)], torch.bfloat16, torch.float32)
    be = C.CpuBackend(threads=threads, poison=True)
    check_all_ops(be, plan, lam=2.5)
    v, g = be.penalty_sum_and_grads(plan, 2.5)
    for _ in range(3):
        v2, g2 = be.penalty_sum_and_grads(plan, 2.5)
        assert torch.equal(v2, v) and all(torch.equal(a, b) for a, b in zip(g2, g))


def test_gap_holding_a_frozen_parameter_is_not_touched(split):
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
    be = C.CpuBackend(threads=4, poison=True)
    check_all_ops(be, plan)
    _, grads = be.penalty_sum_and_grads(plan, 1.0)
    flat = grads[0]._base
    assert flat is not None and flat.numel() == full.importance.numel()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("storage", KERNEL_DTYPES)
def test_written_grads_equal_torch_rounding(dtype, storage):
    """Gradients equal the float32 result rounded once, to nearest even (torch's ``.to``)."""
    plan = make_plan([(1000,)], dtype, storage)
    _, (g,) = C.CpuBackend(poison=True).penalty_sum_and_grads(plan, 1.0)
    p, a, m = plan.params[0].detach().float(), plan.importance_views[0].float(), plan.anchor_views[0].float()
    assert torch.equal(g, (a * (p - m)).to(dtype))


def test_bfloat16_rounding_keeps_nan_and_overflows_to_inf():
    plan = make_plan([(20,)], torch.bfloat16, torch.float32)
    with torch.no_grad():
        plan.params[0].zero_()[:4].copy_(torch.tensor([float("nan"), 3e38, -3e38, 1.0]))
        plan.importance_views[0].fill_(1.0)
        plan.anchor_views[0].zero_()[:4].copy_(torch.tensor([0.0, -3e38, 3e38, 0.0]))
    v, (g,) = C.CpuBackend(poison=True).penalty_sum_and_grads(plan, 1.0)
    want = (plan.params[0].detach().float() - plan.anchor_views[0]).to(torch.bfloat16)
    assert v.isnan()
    assert g[0].isnan() and g[1] == float("inf") and g[2] == -float("inf") and torch.equal(g[3:], want[3:])


def test_nan_parameter_makes_the_value_nan_and_only_its_gradient(split):
    plan = make_plan([(50,), (70,)], torch.float32, torch.bfloat16)
    with torch.no_grad():
        plan.params[1][13] = float("nan")
    be = C.CpuBackend(threads=3, poison=True)
    assert be.penalty_sum(plan).isnan()
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    assert be.accumulate_grad_(plan, 1.0).isnan()
    assert not plan.params[0].grad.isnan().any()
    assert plan.params[1].grad.isnan().nonzero().flatten().tolist() == [13]


def test_empty_plans():
    be = C.CpuBackend(poison=True)
    for shapes in ([], [(0,)], [(0, 4), (0,)]):
        plan = make_plan(shapes, torch.float32, torch.float32)
        assert be.penalty_sum(plan).item() == 0.0
        v, g = be.penalty_sum_and_grads(plan, 1.0)
        assert v.item() == 0.0 and [x.shape for x in g] == [torch.Size(s) for s in shapes]
        assert be.accumulate_grad_(plan, 1.0).item() == 0.0


def test_one_element_tensors_only(split):
    plan = make_plan([(1,)] * 5, torch.bfloat16, torch.bfloat16)
    check_all_ops(C.CpuBackend(threads=2, poison=True), plan, lam=3.0)


def test_non_contiguous_params_and_grads_fall_back_per_tensor():
    base = [torch.randn(6, 9).t(), torch.randn(50), torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)]
    params = [nn.Parameter(t) for t in base]  # nn.Parameter keeps the strides
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    plan = make_plan(None, torch.float32, torch.float32, params=params)
    be = C.CpuBackend(poison=True)
    want_v, want_g = reference(plan, 0.5)
    v, g = be.penalty_sum_and_grads(plan, 0.5)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float32, plan)
    params[1].grad = torch.randn(100)[::2]  # a non-contiguous grad of a contiguous parameter
    before = params[1].grad.clone()
    v2 = be.accumulate_grad_(plan, 0.5)
    torch.testing.assert_close(v2.double(), want_v, rtol=1e-5, atol=0)
    assert_grads([p.grad for p in params], [want_g[0], want_g[1] + before.double(), want_g[2]], torch.float32, plan)
    # A gradient of another dtype than its parameter (allowed by grad_dtype=None) is left to
    # torch ops too.
    params[1].grad_dtype = None
    params[1].grad = torch.zeros(50, dtype=torch.float64)
    be.accumulate_grad_(plan, 0.5)
    torch.testing.assert_close(params[1].grad, want_g[1])


def test_segment_table_cached_and_rebuilt_when_addresses_change():
    plan = make_plan([(40,), (3, 7)], torch.float32, torch.float32)
    be = C.CpuBackend(poison=True)
    v = be.penalty_sum(plan)
    be.penalty_sum(plan)
    assert be.table_builds == 1
    # The parameters move (as after .to() or load_state_dict(assign=True)): new addresses, new values.
    plan.params = [nn.Parameter(p.detach() + 1.0) for p in plan.params]
    v2 = be.penalty_sum(plan)
    assert be.table_builds == 2 and not torch.equal(v, v2)
    torch.testing.assert_close(v2.double(), reference(plan, 1.0)[0], rtol=1e-5, atol=0)
    be.accumulate_grad_(plan, 1.0)      # allocates grads (written): table 3
    be.accumulate_grad_(plan, 1.0)      # same grads, now added to: table 4
    be.accumulate_grad_(plan, 1.0)      # unchanged: cached
    assert be.table_builds == 4
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    be.accumulate_grad_(plan, 1.0)
    assert be.table_builds == 5
    assert_grads([p.grad for p in plan.params], reference(plan, 1.0)[1], torch.float32, plan)
    # Each kind keeps its own table, and the fresh gradients' table does not depend on the new
    # buffer of each step: a training loop alternating them builds none after the first steps.
    be.penalty_sum_and_grads(plan, 1.0)
    assert be.table_builds == 6
    for _ in range(3):
        _, g = be.penalty_sum_and_grads(plan, 1.0)
        be.accumulate_grad_(plan, 1.0)
        be.penalty_sum(plan)
    assert be.table_builds == 6
    assert_grads(g, reference(plan, 1.0)[1], torch.float32, plan)


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
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float32, plan)


def test_regularizer_matches_torch_backend_after_reload_and_new_grads():
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3)).to(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen: a gap in the flat buffers
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach() + torch.randn_like(p) for n, p in model.named_parameters()}
    ewc, ref = EWCRegularizer(3.0, backend="cpu"), EWCRegularizer(3.0, backend="torch")
    for e in (ewc, ref):
        e.register_task(fisher, anchor, model=model)
    for step in range(3):
        if step == 1:  # reload: every parameter gets new storage
            model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()}, assign=True)
            model[0].bias.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        v = ewc.accumulate_grad_(model)
        got = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        w = ref.accumulate_grad_(model)
        torch.testing.assert_close(v, w, rtol=1e-5, atol=0)
        for g, p in zip(got, model.parameters()):
            assert (g is None) == (p.grad is None)
            if g is not None:
                torch.testing.assert_close(g, p.grad, rtol=2 ** -7, atol=1e-3)
        model.zero_grad(set_to_none=True)
        (2 * ewc(model)).backward()  # penalty_sum_and_grads, then the grads scaled by grad_out
        got = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        (2 * ref(model)).backward()
        for g, p in zip(got, model.parameters()):
            assert (g is None) == (p.grad is None)
            if g is not None:
                torch.testing.assert_close(g, p.grad, rtol=2 ** -7, atol=1e-3)
    assert ewc.active_backends == ("cpu",) and model[0].bias.grad is None


def _child_step(plan, out):
    out.put(float(C.CpuBackend(threads=3).penalty_sum(plan)))


def test_forked_child_runs_threaded_steps(split):
    # A child forked after the parent ran threaded steps inherits a pool without threads; it must
    # make its own instead of waiting forever.
    plan = make_plan([(5000,), (77,)], torch.float32, torch.float32)
    want = float(C.CpuBackend(threads=3).penalty_sum(plan))
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
def test_build_reports_a_missing_compiler(monkeypatch):
    monkeypatch.setattr(C, "_compiler", lambda: None)
    lib, why = C._build()
    assert lib is None and "no C compiler found" in why


def test_build_reports_a_failing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEWC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    lib, why = C._build()
    assert lib is None and "could not be built" in why and "exited with 1" in why
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_build_is_cached_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEWC_CACHE_DIR", str(tmp_path / "cache"))
    for flags in ("flags: sse2", "flags: sse2 avx2", "flags: sse2"):
        monkeypatch.setattr(C, "_cpu_features", lambda: flags)
        lib, why = C._build()
        assert why is None and lib.ewc_quadratic_f32_f32 is not None
    assert len(list((tmp_path / "cache").glob("quadratic_cpu-*.so"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_auto_falls_back_and_forcing_says_why(monkeypatch):
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    monkeypatch.setattr(C, "_built", (None, "no C compiler found (set CC, or install cc, gcc or clang)"))
    cpu = torch.device("cpu")
    assert backends.select_backend("auto", cpu).name == "torch"
    with pytest.raises(EWCInputError, match=r"backend 'cpu' is not available: no C compiler found"):
        backends.select_backend("cpu", cpu)
    why = backends.cpu_backend_status(torch.device("cuda"))
    assert why is not None and "runs on CPU tensors" in why


def test_auto_takes_the_kernel_on_cpu_and_env_forces_a_backend(monkeypatch):
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert backends.select_backend("auto", cpu).name == "cpu"
    monkeypatch.setenv("FASTEWC_BACKEND", "torch")
    assert backends.select_backend("auto", cpu).name == "torch"
    monkeypatch.setenv("FASTEWC_BACKEND", "cpu")
    assert backends.select_backend("torch", cpu).name == "cpu"
    monkeypatch.setenv("FASTEWC_BACKEND", "gpu")
    with pytest.raises(EWCInputError, match=r"unknown FASTEWC_BACKEND 'gpu'; expected .*'cpu'"):
        backends.select_backend("auto", cpu)


def test_constructor_arguments():
    with pytest.raises(ValueError, match=r"threads must be >= 1, got 0"):
        C.CpuBackend(threads=0)
    plan = make_plan([(9,), (4, 4)], torch.float8_e5m2, torch.float32)
    be = C.CpuBackend()
    assert torch.equal(be.penalty_sum(plan), TorchBackend().penalty_sum(plan))
    assert be.table_builds == 0


def test_source_ships_beside_the_triton_kernels():
    src = C.source_path()
    assert src.name == "quadratic_cpu.c" and src.is_file()
    assert (src.parent / "ewc_penalty.py").is_file() and os.path.samefile(src.parent, C.source_path().parent)
