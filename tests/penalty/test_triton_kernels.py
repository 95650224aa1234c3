"""The Triton backend's kernels on CPU tensors under TRITON_INTERPRET=1, against a float64 reference:
what is particular to them (tiles, split launches, launch heuristics, alignment). The contract
they share with the fused CPU kernel is tested on both in ``test_fused_backends.py``.

Every backend here is built with ``poison=True``: the buffers it allocates (gradient outputs,
partial sums, new grads) start as NaN, so an element or partial the kernels fail to write shows
up. Small ``block`` / ``max_tiles`` values give many tiles and split launches from small tensors,
which keeps the interpreter fast.
"""


import pytest
import torch

import fastewc.penalty.backends as backends
from plans import SHAPES, assert_grads, make_plan, reference

pytestmark = pytest.mark.skipif(backends.triton_status(torch.device("cpu")) is not None,
                                reason=str(backends.triton_status(torch.device("cpu"))))

if backends.triton_status(torch.device("cpu")) is None:
    from fastewc.penalty.backends.triton_backend import TritonBackend
    from fastewc.kernels import ewc_penalty as K


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
    assert backends.select_backend("auto", torch.device("cuda"), torch.float32, torch.float32).name == "torch"


def test_flat_offsets_are_aligned_for_vector_loads():
    plan = make_plan(SHAPES, torch.float32, torch.float32)
    assert all(o % 16 == 0 for o in plan.offsets)
    be = TritonBackend(block=16)
    be.penalty_sum(plan)
    lay = plan.cache[("triton-layout", 16)]
    assert lay.flat_align == 16
    assert plan.cache["triton-ptrs"].ptr_align == 16  # torch allocations are 16-byte aligned


def test_fused_update_table_is_rebuilt_when_the_gradients_move_only():
    plan = make_plan([(40,), (3, 7)], torch.float32, torch.float32)
    be = TritonBackend(block=16, poison=True)
    want_g = reference(plan, 1.0)[1]
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        be.accumulate_grad_(plan, 1.0)
    assert be.grad_table_builds == 1
    kept = [p.grad for p in plan.params]  # alive: the new gradients get new addresses
    for p in plan.params:
        p.grad = torch.zeros_like(p)
    be.accumulate_grad_(plan, 1.0)
    assert be.grad_table_builds == 2
    assert_grads([p.grad for p in plan.params], want_g, torch.float32, plan)
    assert all(g.data_ptr() != p.grad.data_ptr() for g, p in zip(kept, plan.params))
