"""The Triton backend's kernels on CPU tensors under TRITON_INTERPRET=1, against a float64 reference.

Every backend here is built with ``poison=True``: the buffers it allocates (gradient outputs,
partial sums, new grads) start as NaN, so an element or partial the kernels fail to write shows
up. Small ``block`` / ``max_tiles`` values give many tiles and split launches from small tensors,
which keeps the interpreter fast.
"""


import pytest
import torch
import torch.nn as nn

import fastewc.penalty.backends as backends
from fastewc import EWCRegularizer
from fastewc.penalty.backends import TorchBackend
from plans import DTYPES, SHAPES, assert_grads, make_plan, reference, value_rtol

pytestmark = pytest.mark.skipif(backends.triton_status(torch.device("cpu")) is not None,
                                reason=str(backends.triton_status(torch.device("cpu"))))

if backends.triton_status(torch.device("cpu")) is None:
    from fastewc.penalty.backends.triton_backend import TritonBackend
    from fastewc.kernels import ewc_penalty as K


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("storage", DTYPES)
def test_every_dtype_pair_all_ops(param_dtype, storage):
    plan = make_plan(SHAPES, param_dtype, storage)
    be = TritonBackend(block=16, poison=True)
    want_v, want_g = reference(plan, 0.7)
    rtol = value_rtol(plan)

    v = be.penalty_sum(plan)
    assert v.shape == () and v.dtype == plan.compute_dtype
    torch.testing.assert_close(v.double(), want_v, rtol=rtol, atol=0)

    v2, g2 = be.penalty_sum_and_grads(plan, 0.7)
    torch.testing.assert_close(v2.double(), want_v, rtol=rtol, atol=0)
    assert_grads(g2, want_g, param_dtype, plan)

    g3 = be.penalty_grads(plan, torch.tensor(0.7 * 3.0, dtype=plan.compute_dtype))
    assert_grads(g3, [3.0 * w for w in want_g], param_dtype, plan)

    # Fused update: some grads exist (added to), some are None (allocated, written).
    before = {}
    for i, p in enumerate(plan.params):
        p.grad = None
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, dtype=torch.float64).to(param_dtype)
            before[i] = p.grad.clone()
    v4 = be.accumulate_grad_(plan, 0.7)
    torch.testing.assert_close(v4.double(), want_v, rtol=rtol, atol=0)
    expect = [w + before[i].double() if i in before else w for i, w in enumerate(want_g)]
    assert_grads([p.grad for p in plan.params], expect, param_dtype, plan)


def test_grads_round_to_nearest_even():
    """bf16 / fp16 gradients equal the float32 result rounded once (torch's .to rounds to nearest even)."""
    for dtype in (torch.bfloat16, torch.float16):
        plan = make_plan([(1000,)], dtype, torch.float32)
        _, (g,) = TritonBackend(block=256, poison=True).penalty_sum_and_grads(plan, 1.0)
        p, a, m = plan.params[0].detach().float(), plan.importance_views[0], plan.anchor_views[0]
        want = (a * (p - m)).to(dtype)
        assert torch.equal(g, want), dtype


def test_odd_size_multi_tile():
    """278011 elements (not a multiple of any block) next to tiny tensors, several tiles each."""
    plan = make_plan([(278011,), (1,), (0,), (17, 3)], torch.float32, torch.float32)
    be = TritonBackend(block=4096, poison=True)
    want_v, want_g = reference(plan, 2.5)
    v, g = be.penalty_sum_and_grads(plan, 2.5)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float32, plan)
    for p in plan.params:
        p.grad = torch.ones_like(p)
    v2 = be.accumulate_grad_(plan, 2.5)
    torch.testing.assert_close(v2.double(), want_v, rtol=1e-5, atol=0)
    assert_grads([p.grad for p in plan.params], [w + 1 for w in want_g], torch.float32, plan)


def test_more_tiles_than_one_launch_and_bitwise_repeat():
    """Split launches (max_tiles=3) give the same bits as one launch, and repeats the same bits."""
    shapes = [(7, 11)] * 9 + [(129,), (1,), (0,), (40,)]
    plan = make_plan(shapes, torch.bfloat16, torch.float32)
    one, split = TritonBackend(block=16, poison=True), TritonBackend(block=16, max_tiles=3, poison=True)
    want_v, want_g = reference(plan, 1.5)
    v1, g1 = one.penalty_sum_and_grads(plan, 1.5)
    v2, g2 = split.penalty_sum_and_grads(plan, 1.5)
    torch.testing.assert_close(v2.double(), want_v, rtol=1e-5, atol=0)
    assert_grads(g2, want_g, torch.bfloat16, plan)
    assert torch.equal(v1, v2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    for _ in range(3):
        v3, g3 = split.penalty_sum_and_grads(plan, 1.5)
        assert torch.equal(v3, v2) and all(torch.equal(a, b) for a, b in zip(g3, g2))
        assert torch.equal(split.penalty_sum(plan), v2)


def test_empty_plans():
    be = TritonBackend(block=16, poison=True)
    for shapes in ([], [(0,)], [(0, 4), (0,)]):
        plan = make_plan(shapes, torch.float32, torch.float32)
        assert be.penalty_sum(plan).item() == 0.0
        v, g = be.penalty_sum_and_grads(plan, 1.0)
        assert v.item() == 0.0 and [x.shape for x in g] == [torch.Size(s) for s in shapes]
        assert be.accumulate_grad_(plan, 1.0).item() == 0.0


def test_one_element_tensors_only():
    plan = make_plan([(1,)] * 5, torch.float16, torch.bfloat16)
    want_v, want_g = reference(plan, 3.0)
    v, g = TritonBackend(poison=True).penalty_sum_and_grads(plan, 3.0)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float16, plan)


def test_non_contiguous_params_and_grads_fall_back_per_tensor():
    base = [torch.randn(6, 9).t(), torch.randn(50), torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)]
    params = [nn.Parameter(t) for t in base]  # nn.Parameter keeps the strides
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    plan = make_plan(None, torch.float32, torch.float32, params=params)
    be = TritonBackend(block=16, poison=True)
    want_v, want_g = reference(plan, 0.5)
    v, g = be.penalty_sum_and_grads(plan, 0.5)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=0)
    assert_grads(g, want_g, torch.float32, plan)
    params[1].grad = torch.randn(100)[::2]  # a non-contiguous grad of a contiguous parameter
    before = params[1].grad.clone()
    v2 = be.accumulate_grad_(plan, 0.5)
    torch.testing.assert_close(v2.double(), want_v, rtol=1e-5, atol=0)
    assert_grads([p.grad for p in params], [want_g[0], want_g[1] + before.double(), want_g[2]], torch.float32, plan)


def test_pointer_table_cached_and_rebuilt_when_pointers_change():
    plan = make_plan([(40,), (3, 7)], torch.float32, torch.float32)
    be = TritonBackend(block=16, poison=True)
    v = be.penalty_sum(plan)
    be.penalty_sum(plan)
    assert be.table_builds == 1
    # The parameters move (as after .to() or load_state_dict(assign=True)): new addresses, new values.
    plan.params = [nn.Parameter(p.detach() + 1.0) for p in plan.params]
    v2 = be.penalty_sum(plan)
    assert be.table_builds == 2 and not torch.equal(v, v2)
    torch.testing.assert_close(v2.double(), reference(plan, 1.0)[0], rtol=1e-5, atol=0)
    # Fused update: same grads -> cached table; grads set to None, then new grads -> rebuilt.
    be.accumulate_grad_(plan, 1.0)      # allocates grads (fresh): table 3
    be.accumulate_grad_(plan, 1.0)      # same grads, no longer fresh: table 4
    be.accumulate_grad_(plan, 1.0)      # unchanged: cached
    assert be.table_builds == 4
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    be.accumulate_grad_(plan, 1.0)
    assert be.table_builds == 5
    assert_grads([p.grad for p in plan.params], reference(plan, 1.0)[1], torch.float32, plan)


def test_regularizer_after_load_state_dict_assign_and_new_grads():
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3))
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach() + torch.randn_like(p) for n, p in model.named_parameters()}
    ewc, ref = EWCRegularizer(3.0, backend="triton"), EWCRegularizer(3.0, backend="torch")
    for e in (ewc, ref):
        e.register_task(fisher, anchor)
    for step in range(3):
        if step == 1:  # reload: every parameter gets new storage
            model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items()}, assign=True)
        model.zero_grad(set_to_none=True)
        v = ewc.accumulate_grad_(model)
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        w = ref.accumulate_grad_(model)
        torch.testing.assert_close(v, w, rtol=1e-5, atol=0)
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    assert ewc.active_backends == ("triton",)


def test_unsupported_param_dtype_runs_on_torch_twin():
    plan = make_plan([(9,), (4, 4)], torch.float8_e5m2, torch.float32)
    be = TritonBackend(block=16)
    assert torch.equal(be.penalty_sum(plan), TorchBackend().penalty_sum(plan))
    assert be.table_builds == 0


def test_block_heuristic_and_arguments():
    assert K.tile_config(1000) == (K.SMALL_BLOCK, K.SMALL_WARPS)
    assert K.tile_config(K.LARGE_FROM + 1) == (K.LARGE_BLOCK, K.LARGE_WARPS)
    for blk in (K.SMALL_BLOCK, K.LARGE_BLOCK):
        assert blk & (blk - 1) == 0 and blk >= 16 * 32  # >= 16 elements per thread-group of a warp
    with pytest.raises(ValueError, match="power of two"):
        TritonBackend(block=24)
    with pytest.raises(ValueError, match="max_tiles"):
        TritonBackend(max_tiles=0)


def test_triton_status_refuses_cuda_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = backends.triton_status(torch.device("cuda"))
    assert why is not None and "TRITON_INTERPRET" in why
    monkeypatch.setenv("FASTEWC_BACKEND", "auto")
    assert backends.select_backend("auto", torch.device("cuda")).name == "torch"


def test_flat_offsets_are_aligned_for_vector_loads():
    plan = make_plan(SHAPES, torch.float32, torch.float32)
    assert all(o % 16 == 0 for o in plan.offsets)
    be = TritonBackend(block=16)
    be.penalty_sum(plan)
    lay = plan.cache[("triton-layout", 16)]
    assert lay.flat_align == 16
    assert plan.cache["triton-ptrs"].ptr_align == 16  # torch allocations are 16-byte aligned


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
def test_bfloat16_rounding_keeps_nan_and_overflows_to_inf():
    plan = make_plan([(4,)], torch.bfloat16, torch.float32)
    with torch.no_grad():
        plan.params[0].copy_(torch.tensor([float("nan"), 3e38, -3e38, 1.0]))
        plan.importance_views[0].fill_(1.0)
        plan.anchor_views[0].copy_(torch.tensor([0.0, -3e38, 3e38, 0.0]))
    _, (g,) = TritonBackend(block=16, poison=True).penalty_sum_and_grads(plan, 1.0)
    want = (plan.params[0].detach().float() - plan.anchor_views[0]).to(torch.bfloat16)
    assert g[0].isnan() and torch.equal(g[1:], want[1:]) and g[1].isinf() and g[2] == -float("inf")
