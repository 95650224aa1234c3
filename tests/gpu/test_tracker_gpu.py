"""FisherTracker and check_tracking on a CUDA device: the tracked Fisher against estimate_fisher on
the same batches (float64 and float32), a Hugging Face model's own loss, and a check that leaves the
CUDA random state, the gradients and the buffers as they were.

Skipped without CUDA (``FASTEWC_TEST_DEVICE=cpu`` runs the same tests on the CPU, to check the
tests themselves). Run with the GPU suite: ``python -m pytest -q -m gpu tests/gpu``.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from fastewc import FisherTracker, check_tracking, estimate_fisher

from models import assert_fisher_close, hf_batches, hf_model, make_encoder, make_mlp

DEVICE = torch.device(os.environ.get("FASTEWC_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# float32: two summation orders of the same products (on the CPU the two agree to 4e-7; PyTorch's
# float32 matmuls on CUDA use no TF32 unless asked to, and these models have no convolution)
TOL = {torch.float64: dict(rtol=1e-9, atol_rel=1e-10), torch.float32: dict(rtol=1e-4, atol_rel=1e-6)}


def _on_device(data):
    return [(x.to(DEVICE), y.to(DEVICE)) for x, y in data]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("make", [make_mlp, make_encoder], ids=["mlp", "encoder"])
def test_tracked_equals_estimate_fisher_on_the_device(make, dtype):
    torch.manual_seed(0)
    model, data = make(dtype=dtype)
    model, data = model.to(DEVICE).eval(), _on_device(data)
    tracker = FisherTracker(model)
    with tracker:
        for x, y in data:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
    got = tracker.fisher()
    assert all(t.device.type == DEVICE.type for t in got.values())
    assert_fisher_close(got, estimate_fisher(model, data, kind="empirical"), **TOL[dtype])


def test_hf_model_own_loss_on_the_device():
    torch.manual_seed(0)
    model = hf_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to(DEVICE).eval()
    data = [{k: v.to(DEVICE) for k, v in b.items()} for b in hf_batches(6, 8, 40, "cls", batch_size=3)]
    tracker = FisherTracker(model)
    with tracker:
        for b in data:
            model.zero_grad()
            model(**b).loss.backward()
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data, kind="empirical"), **TOL[torch.float64])


def test_check_tracking_restores_the_device_random_state():
    torch.manual_seed(0)
    model, data = make_encoder(dtype=torch.float64)
    model = model.to(DEVICE).train()  # dropout draws on the device
    x, y = _on_device(data)[0]
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else torch.get_rng_state()
    check = check_tracking(model, lambda: F.cross_entropy(model(x), y))
    after = torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else torch.get_rng_state()
    assert torch.equal(state, after)
    assert set(check.params) == {n for n, _ in model.named_parameters()} - set(check.left_out)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
