"""The Triton backend on a real GPU: correctness against the PyTorch backend, determinism over 100
repeats (races only show on hardware), no host-device sync, CUDA-graph capture.

Skipped without CUDA. conftest sets TRITON_INTERPRET=1 unless it is already set, and the
interpreter cannot read CUDA tensors, so run these with the compiler:

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_triton_gpu.py
"""

import pytest
import torch

import fastewc.penalty.backends as backends
from fastewc import EWCRegularizer
from fastewc.bench.models import transformer_like

CUDA = torch.device("cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _triton_on_cuda():
    why = backends.triton_status(CUDA)
    if why is not None:
        pytest.skip(why)


def pair(param_dtype, storage, params=3e6, tasks=3):
    """A transformer-shaped model on the GPU, with grads, and two regularizers (triton, torch)
    holding the same 3 tasks."""
    torch.manual_seed(0)
    model = transformer_like(params, d_model=256, vocab=1000).to(CUDA, param_dtype)
    tri = EWCRegularizer(300.0, storage_dtype=storage, backend="triton")
    ref = EWCRegularizer(300.0, storage_dtype=storage, backend="torch")
    for _ in range(tasks):
        fisher = {n: torch.rand_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
        anchor = {n: p.detach().float() + 0.05 * torch.randn_like(p, dtype=torch.float32)
                  for n, p in model.named_parameters()}
        tri.register_task(fisher, anchor)
        ref.register_task(fisher, anchor)
    return model, tri, ref


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def close(got, want, rtol):
    for g, w in zip(got, want):
        scale = float(w.abs().max()) if w.numel() else 1.0
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("param_dtype,storage,rtol", [
    (torch.float32, torch.float32, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
    (torch.bfloat16, torch.float32, 1e-2), (torch.float16, torch.float16, 2e-3),
    (torch.float64, torch.float64, 1e-12)])
def test_matches_torch_backend(param_dtype, storage, rtol):
    model, tri, ref = pair(param_dtype, storage)
    out = {}
    for name, ewc in (("triton", tri), ("torch", ref)):
        model.zero_grad(set_to_none=True)
        v = ewc(model)
        v.backward()
        g1 = grads(model)
        for p in model.parameters():
            p.grad.fill_(0.25)
        v2 = ewc.accumulate_grad_(model)
        out[name] = (v.detach(), g1, v2, grads(model))
    assert tri.active_backends == ("triton",) and ref.active_backends == ("torch",)
    (v, g, v2, g2), (w, h, w2, h2) = out["triton"], out["torch"]
    torch.testing.assert_close(v, w, rtol=rtol, atol=0)
    torch.testing.assert_close(v2, w2, rtol=rtol, atol=0)
    close(g, h, rtol)
    close(g2, h2, rtol)


def test_bitwise_identical_over_100_repeats():
    model, tri, _ = pair(torch.float32, torch.bfloat16)
    model.zero_grad(set_to_none=True)
    v0 = tri(model)
    v0.backward()
    g0 = grads(model)
    start = [torch.randn_like(p) for p in model.parameters()]
    for p, s in zip(model.parameters(), start):
        p.grad.copy_(s)
    a0, ga0 = tri.accumulate_grad_(model), grads(model)
    for _ in range(100):
        model.zero_grad(set_to_none=True)
        v = tri(model)
        v.backward()
        assert torch.equal(v, v0) and all(torch.equal(a, b) for a, b in zip(grads(model), g0))
        for p, s in zip(model.parameters(), start):
            p.grad.copy_(s)
        a = tri.accumulate_grad_(model)
        assert torch.equal(a, a0) and all(torch.equal(x, y) for x, y in zip(grads(model), ga0))


def test_no_host_sync_in_forward_or_accumulate():
    model, tri, _ = pair(torch.float32, torch.float32)
    tri(model).backward()
    tri.accumulate_grad_(model)  # tables built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tri(model)
        tri.accumulate_grad_(model)
        model.zero_grad(set_to_none=True)
        tri.accumulate_grad_(model)  # new grads: the pointer table is rebuilt, still without a sync
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_accumulate_grad_captured_in_a_cuda_graph():
    model, tri, _ = pair(torch.float32, torch.float32)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tri.accumulate_grad_(model)  # warm-up on the capture stream: compiles, builds tables
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value = tri.accumulate_grad_(model)
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    got_v, got = value.clone(), grads(model)
    for p in model.parameters():
        p.grad.zero_()
    want_v = tri.accumulate_grad_(model)
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(got, grads(model)))
