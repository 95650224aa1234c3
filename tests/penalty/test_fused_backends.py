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
from plans import DTYPES, SHAPES, assert_grads, check_all_ops, make_plan, reference, split_cpu, split_cpu_backend, value_of

CPU = torch.device("cpu")
WHY_NOT = {"triton": backends.triton_status(CPU), "cpu": backends.cpu_backend_status(CPU)}
# The parameter and storage dtypes each fused backend's kernels are written for.
TAKES = {"triton": set(DTYPES), "cpu": {torch.float32, torch.bfloat16}}


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
    split_cpu_backend(monkeypatch)  # also what backend="cpu" gets in the regularizer test
    return name, lambda: split_cpu(3)


def running(fused, param_dtype, storage):
    """The backend a group of these dtypes runs on when ``fused`` is asked for: a fresh one with
    test settings where it takes them, else the one ``select_backend`` gives instead."""
    name, make = fused
    chosen = backends.select_backend(name, CPU, param_dtype, storage)
    return make() if chosen.name == name else chosen


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("storage", DTYPES)
def test_every_dtype_pair_all_ops(fused, param_dtype, storage):
    # A pair the backend does not take is given to the PyTorch backend when the group is bound,
    # forced or not. The C kernel also gets two odd tensors longer than its 2048-element chunk
    # (as many 16-element tiles would make the Triton interpreter slow; its multi-tile cases are
    # in test_triton_kernels.py).
    name = fused[0]
    be = running(fused, param_dtype, storage)
    assert be.name == (name if {param_dtype, storage} <= TAKES[name] else "torch")
    extra = [(4099,), (2, 1031)] if name == "cpu" else []
    check_all_ops(be, make_plan([*SHAPES, *extra], param_dtype, storage))


@pytest.mark.parametrize("dtype, storage", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_written_grads_equal_torch_rounding(fused, dtype, storage):
    """Gradients equal the float32 result rounded once, to nearest even (torch's ``.to``)."""
    plan = make_plan([(1000,)], dtype, storage)
    _, (g,) = running(fused, dtype, storage).penalty_sum_and_grads(plan, 1.0)
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


@pytest.mark.parametrize("shapes", [[(40,), (3, 7), (0,)], [(40,), (3, 7)]], ids=["with an empty tensor", "without"])
def test_a_plan_builds_its_table_once_and_reads_the_gradients_every_call(fused, shapes):
    # The binding hands a plan only parameters its fingerprint verified, so what a backend
    # derives from them holds for the plan's life; the gradients it must read at every call.
    plan = make_plan(shapes, torch.float32, torch.float32)
    be = fused[1]()
    want_v, want_g = reference(plan, 1.0)

    def accumulate_onto(grads):
        """Hand the parameters ``grads``, run the fused update, check that it added to them."""
        start = []
        for p, g in zip(plan.params, grads):
            p.grad = g
            start.append(0.0 if g is None else g.double())  # a copy: the update is in place
        torch.testing.assert_close(value_of(be, plan, be.accumulate_grad_(plan, 1.0)), want_v, rtol=1e-5, atol=0)
        assert_grads([p.grad for p in plan.params], [w + s for w, s in zip(want_g, start)], torch.float32, plan)

    kept = []
    for step in range(3):
        torch.testing.assert_close(value_of(be, plan, be.penalty_sum(plan)), want_v, rtol=1e-5, atol=0)
        _, g = be.penalty_sum_and_grads(plan, 1.0)  # a fresh buffer each call
        assert_grads(g, want_g, torch.float32, plan)
        kept.append([torch.full_like(p, float(step)) for p in plan.params])  # new addresses, the old kept
        accumulate_onto(kept[-1])
    accumulate_onto([None] * len(shapes))  # allocated and written by the backend
    # Back at the addresses of the first step's gradients, after the table pointed elsewhere.
    accumulate_onto([g.zero_() for g in kept[0]])
    # A gradient of another layout (added to as the view says), then a contiguous one again.
    rest = [torch.zeros_like(p) for p in plan.params[1:]]
    accumulate_onto([torch.ones(80)[::2], *rest])
    accumulate_onto([torch.full((40,), 2.0), *rest])
    assert be.table_builds == 1


def test_new_parameters_come_with_a_new_plan(fused):
    # Moved parameters (as after .to() or load_state_dict(assign=True)) are bound anew: a new
    # plan with a table of its own, while the old plan still serves its own parameters.
    old = make_plan([(40,), (3, 7)], torch.float32, torch.float32)
    new = make_plan(None, torch.float32, torch.float32, params=[nn.Parameter(p.detach() + 1.0) for p in old.params])
    be = fused[1]()
    for _ in range(2):
        for plan in (old, new):
            want_v, want_g = reference(plan, 1.0)
            torch.testing.assert_close(value_of(be, plan, be.penalty_sum(plan)), want_v, rtol=1e-5, atol=0)
            for p in plan.params:
                p.grad = torch.zeros_like(p)
            be.accumulate_grad_(plan, 1.0)
            assert_grads([p.grad for p in plan.params], want_g, torch.float32, plan)
    assert be.table_builds == 2


def test_dtypes_a_fused_backend_does_not_take_get_the_torch_backend(fused):
    name = fused[0]
    assert backends.select_backend(name, CPU, torch.float32, torch.float32).name == name
    assert backends.select_backend(name, CPU, torch.float8_e5m2, torch.float32).name == "torch"
    assert backends.select_backend(name, CPU, torch.float32, torch.float8_e5m2).name == "torch"
    assert backends.select_backend("auto", CPU, torch.float8_e5m2, torch.float32).name == "torch"


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
