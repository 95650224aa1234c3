import os
import sys

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# triton is first imported (docs/design.md, "Testing without a GPU").
os.environ.setdefault("TRITON_INTERPRET", "1")
# The C++ host helpers are built (or loaded from the cache) by the first binding, so every test
# after it runs the same path; tests of the Python twins switch them off (fixture host_helpers).
os.environ.setdefault("FASTEWC_HOST_HELPERS", "wait")
# The tests of every folder share one module of test models (tests/models.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

import fastewc.penalty.backends as backends  # noqa: E402
from fastewc.penalty.backends import host  # noqa: E402
from plans import split_cpu_backend  # noqa: E402

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
        monkeypatch.setattr(backends._TORCH, "strategy", name.split("-")[1])
        monkeypatch.setattr(backends._TORCH, "block", 61)
        return "torch"
    if name == "cpu":
        split_cpu_backend(monkeypatch)
    return name


@pytest.fixture(params=["python", "c++"])
def host_helpers(request, monkeypatch):
    """Runs a test with the per-step checks in Python (the twins), then with the C++ helpers
    (skipped where they cannot be built, saying why)."""
    if request.param == "python":
        monkeypatch.setattr(host, "_module", None)
        monkeypatch.setattr(host, "_started_in", os.getpid())  # so that nothing starts a build
    elif host.build() is None:
        pytest.skip(f"the C++ host helpers are not available: {host.host_helpers_status()}")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
