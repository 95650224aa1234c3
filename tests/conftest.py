import os
import sys

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# triton is first imported (docs/design.md, "Testing without a GPU").
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests of every folder share one module of test models (tests/models.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

import fastewc.penalty.backends as backends  # noqa: E402

# Backends every regularizer test runs on: the PyTorch backend's two strategies (with a tiny block
# so that odd sizes span several blocks) and, where they can run, Triton and the fused C kernel.
BACKENDS = ["torch-blocked", "torch-foreach"]
if backends.triton_status(torch.device("cpu")) is None:
    BACKENDS.append("triton")
if backends.cpu_backend_status(torch.device("cpu")) is None:
    BACKENDS.append("cpu")


def split_cpu_backend(monkeypatch, threads: int = 3) -> None:
    """Make the fused CPU backend split even tiny groups among ``threads`` threads, at shares
    that cut through parameters, and fill the gradients it allocates with NaN first (so an
    element it fails to write shows up)."""
    from fastewc.penalty.backends import cpu_backend

    monkeypatch.setattr(cpu_backend, "PARALLEL_FROM", 0)
    monkeypatch.setattr(cpu_backend, "SHARE_ALIGN", 16)
    monkeypatch.setattr(backends, "_CPU", cpu_backend.CpuBackend(threads=threads, poison=True))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Constructor ``backend=`` value, with the PyTorch strategy forced where relevant."""
    name = request.param
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    if name.startswith("torch"):
        monkeypatch.setattr(backends._TORCH, "strategy", name.split("-")[1])
        monkeypatch.setattr(backends._TORCH, "block", 61)
        return "torch"
    if name == "cpu":
        split_cpu_backend(monkeypatch)
    return name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
