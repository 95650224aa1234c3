"""The contract every fused penalty backend keeps, tested on each against a float64 reference:
the Triton kernels (on CPU tensors under TRITON_INTERPRET=1, small tiles) and the fused C kernel
(split among three threads at shares that cut through parameters). What is particular to one of
them is in ``test_triton_kernels.py`` / ``test_cpu_kernel.py``.

Every backend here is built with ``poison=True``: the buffers it allocates start as NaN, so an
element it fails to write shows up.
"""

import pytest
import torch
import torch.nn as nn

import fastewc.penalty.backends as backends
from fastewc import EWCRegularizer
from fastewc.penalty.backends import TorchBackend
from plans import DTYPES, SHAPES, assert_grads, check_all_ops, make_plan, reference, split_cpu_backend, value_of

CPU = torch.device("cpu")
WHY_NOT = {"triton": backends.triton_status(CPU), "cpu": backends.cpu_backend_status(CPU)}


@pytest.fixture(params=["triton", "cpu"])
def fused(request, monkeypatch):
    """(backend name, a function making a fresh backend with test settings)."""
    name = request.param
    if WHY_NOT[name] is not None:
        pytest.skip(WHY_NOT[name])
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    if name == "triton":
        from fastewc.penalty.backends.triton_backend import TritonBackend

        return name, lambda: TritonBackend(block=16, poison=True)
    from fastewc.penalty.backends.cpu_backend import CpuBackend

    split_cpu_backend(monkeypatch)  # also what backend="cpu" gets in the regularizer test
    return name, lambda: CpuBackend(threads=3, poison=True)


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("storage", DTYPES)
def test_every_dtype_pair_all_ops(fused, param_dtype, storage):
    # Pairs a backend does not take run on the PyTorch backend, whole. The C kernel also gets two
    # odd tensors longer than its 2048-element chunk (as many 16-element tiles would make the
    # Triton interpreter slow; its multi-tile cases are in test_triton_kernels.py).
    name, make = fused
    extra = [(4099,), (2, 1031)] if name == "cpu" else []
    check_all_ops(make(), make_plan([*SHAPES, *extra], param_dtype, storage))


@pytest.mark.parametrize("dtype, storage", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_written_grads_equal_torch_rounding(fused, dtype, storage):
    """Gradients equal the float32 result rounded once, to nearest even (torch's ``.to``)."""
    plan = make_plan([(1000,)], dtype, storage)
    _, (g,) = fused[1]().penalty_sum_and_grads(plan, 1.0)
    p, a, m = plan.params[0].detach().float(), plan.importance_views[0].float(), plan.anchor_views[0].float()
    assert torch.equal(g, (a * (p - m)).to(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bfloat16_rounding_keeps_nan_and_overflows_to_inf(fused):
    plan = make_plan([(20,)], torch.bfloat16, torch.float32)
    with torch.no_grad():
        plan.params[0].zero_()[:4].copy_(torch.tensor([float("nan"), 3e38, -3e38, 1.0]))
        plan.importance_views[0].fill_(1.0)
        plan.anchor_views[0].zero_()[:4].copy_(torch.tensor([0.0, -3e38, 3e38, 0.0]))
    be = fused[1]()
    v, (g,) = be.penalty_sum_and_grads(plan, 1.0)
    want = (plan.params[0].detach().float() - plan.anchor_views[0]).to(torch.bfloat16)
    assert value_of(be, plan, v).isnan()
    assert g[0].isnan() and g[1] == float("inf") and g[2] == -float("inf") and torch.equal(g[3:], want[3:])


def test_empty_plans(fused):
    be = fused[1]()
    for shapes in ([], [(0,)], [(0, 4), (0,)]):
        plan = make_plan(shapes, torch.float32, torch.float32)
        assert value_of(be, plan, be.penalty_sum(plan)).item() == 0.0
        v, g = be.penalty_sum_and_grads(plan, 1.0)
        assert value_of(be, plan, v).item() == 0.0 and [x.shape for x in g] == [torch.Size(s) for s in shapes]
        assert value_of(be, plan, be.accumulate_grad_(plan, 1.0)).item() == 0.0


def test_one_element_tensors_only(fused):
    check_all_ops(fused[1](), make_plan([(1,)] * 5, torch.bfloat16, torch.bfloat16), lam=3.0)


def test_non_contiguous_params_and_grads_fall_back_per_tensor(fused):
    base = [torch.randn(6, 9).t(), torch.randn(50), torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)]
    params = [nn.Parameter(t) for t in base]  # nn.Parameter keeps the strides
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    plan = make_plan(None, torch.float32, torch.float32, params=params)
    be = fused[1]()
    want_v, want_g = reference(plan, 0.5)
    v, g = be.penalty_sum_and_grads(plan, 0.5)
    torch.testing.assert_close(value_of(be, plan, v), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float32, plan)
    params[1].grad = torch.randn(100)[::2]  # a non-contiguous grad of a contiguous parameter
    before = params[1].grad.clone()
    v2 = be.accumulate_grad_(plan, 0.5)
    torch.testing.assert_close(value_of(be, plan, v2), want_v, rtol=1e-5, atol=0)
    assert_grads([p.grad for p in params], [want_g[0], want_g[1] + before.double(), want_g[2]], torch.float32, plan)
    # A gradient of another dtype than its parameter (allowed by grad_dtype=None) is left to
    # torch ops too.
    params[1].grad_dtype = None
    params[1].grad = torch.zeros(50, dtype=torch.float64)
    be.accumulate_grad_(plan, 0.5)
    torch.testing.assert_close(params[1].grad, want_g[1])


def test_table_cached_and_rebuilt_when_addresses_change(fused):
    plan = make_plan([(40,), (3, 7)], torch.float32, torch.float32)
    be = fused[1]()
    v = be.penalty_sum(plan)
    be.penalty_sum(plan)
    assert be.table_builds == 1
    # The parameters move (as after .to() or load_state_dict(assign=True)): new addresses, new values.
    plan.params = [nn.Parameter(p.detach() + 1.0) for p in plan.params]
    v2 = be.penalty_sum(plan)
    assert be.table_builds == 2 and value_of(be, plan, v) != value_of(be, plan, v2)
    torch.testing.assert_close(value_of(be, plan, v2), reference(plan, 1.0)[0], rtol=1e-5, atol=0)
    be.accumulate_grad_(plan, 1.0)      # allocates grads (written, not read): table 3
    be.accumulate_grad_(plan, 1.0)      # same grads, now added to: table 4
    be.accumulate_grad_(plan, 1.0)      # unchanged: cached
    assert be.table_builds == 4
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    be.accumulate_grad_(plan, 1.0)
    assert be.table_builds == 5
    assert_grads([p.grad for p in plan.params], reference(plan, 1.0)[1], torch.float32, plan)


@pytest.mark.parametrize("shapes", [[(40,), (3, 7), (0,)], [(40,), (3, 7)]], ids=["with an empty tensor", "without"])
def test_params_token_reuses_the_parameter_columns_and_always_reads_the_gradients(fused, shapes):
    # The binding hands the plan a token that stays the same only while the parameters do: the
    # backend may then skip looking at them, but never at the gradients.
    plan = make_plan(shapes, torch.float32, torch.float32)
    be = fused[1]()
    plan.params_token = object()
    be.penalty_sum(plan)
    builds = be.table_builds
    be.penalty_sum(plan)
    assert be.table_builds == builds
    plan.params = [nn.Parameter(p.detach() + 1.0) for p in plan.params]
    plan.params_token = object()  # new parameters come with a new token: checked again
    v = be.penalty_sum(plan)
    assert be.table_builds == builds + 1
    want_v, want_g = reference(plan, 1.0)
    torch.testing.assert_close(value_of(be, plan, v), want_v, rtol=1e-5, atol=0)
    kept = []
    for start in (0.0, 1.0, 2.0):
        for p in plan.params:
            p.grad = torch.full_like(p, start)  # new tensors at new addresses (the old are kept)
            kept.append(p.grad)
        torch.testing.assert_close(value_of(be, plan, be.accumulate_grad_(plan, 1.0)), want_v, rtol=1e-5, atol=0)
        assert_grads([p.grad for p in plan.params], [w + start for w in want_g], torch.float32, plan)
    for p in plan.params:
        p.grad = None  # allocated and written by the backend
    be.accumulate_grad_(plan, 1.0)
    assert_grads([p.grad for p in plan.params], want_g, torch.float32, plan)
    # Without a token, the same plan is checked in full: gradients back at the addresses the
    # table was first built with must not meet a table that was since pointed elsewhere.
    plan.params_token = None
    for p, g in zip(plan.params, kept[: len(plan.params)]):
        p.grad = g.zero_()
    be.accumulate_grad_(plan, 1.0)
    assert_grads([p.grad for p in plan.params], want_g, torch.float32, plan)


def test_unsupported_param_dtype_runs_on_torch_twin(fused):
    plan = make_plan([(9,), (4, 4)], torch.float8_e5m2, torch.float32)
    be = fused[1]()
    assert torch.equal(torch.as_tensor(be.penalty_sum(plan)), TorchBackend().penalty_sum(plan))
    assert be.table_builds == 0


def test_regularizer_matches_torch_backend_after_reload_and_new_grads(fused):
    name = fused[0]
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3)).to(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen: a gap in the flat buffers
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach() + torch.randn_like(p) for n, p in model.named_parameters()}
    ewc, ref = EWCRegularizer(3.0, backend=name), EWCRegularizer(3.0, backend="torch")
    for e in (ewc, ref):
        e.register_task(fisher, anchor, model=model)

    def same_grads(got):
        for g, p in zip(got, model.parameters()):
            assert (g is None) == (p.grad is None)
            if g is not None:
                torch.testing.assert_close(g, p.grad, rtol=2 ** -7, atol=1e-3)

    for step in range(3):
        if step == 1:  # reload: every parameter gets new storage
            model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()}, assign=True)
            model[0].bias.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        v = ewc.accumulate_grad_(model)
        got = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(v, ref.accumulate_grad_(model), rtol=1e-5, atol=0)
        same_grads(got)
        model.zero_grad(set_to_none=True)
        (2 * ewc(model)).backward()  # the value with the gradient, then scaled by grad_out
        got = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        (2 * ref(model)).backward()
        same_grads(got)
    assert ewc.active_backends == (name,) and model[0].bias.grad is None
