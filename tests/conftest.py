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
from plans import split_cpu_backend, use_torch_backend  # noqa: E402

# Backends every regularizer test runs on: the PyTorch backend's two strategies (with a tiny block
# so that odd sizes span several blocks) and, where they can run, Triton and the fused C kernel.
BACKENDS = ["torch-blocked", "torch-foreach"]
if backends.triton_status(torch.device("cpu")) is None:
    BACKENDS.append("triton")
if backends.cpu_backend_status(torch.device("cpu")) is None:
    BACKENDS.append("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Constructor ``backend=`` value, with the PyTorch strategy forced where relevant."""
    name = request.param
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    if name.startswith("torch"):
        use_torch_backend(monkeypatch, strategy=name.split("-")[1], block=61)
        return "torch"
    if name == "cpu":
        split_cpu_backend(monkeypatch)
    return name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
