"""save_regularizer / load_regularizer: torch.save and safetensors round trips, and bad files."""

import pytest
import torch

from fastewc import EWCInputError, EWCRegularizer, load_regularizer, save_regularizer
from fastewc._utils import MissingDependencyError

from models import mlp


def _registered(mode="separate", storage=torch.float32):
    torch.manual_seed(0)
    model = mlp()
    reg = EWCRegularizer(37.0, mode=mode, gamma=0.5 if mode == "online" else 1.0, storage_dtype=storage, layer_lambdas={"0.*": 3.0},
                         exclude=["2.bias"])
    for _ in range(2):
        reg.register_task({n: torch.rand_like(p) for n, p in model.named_parameters()},
                          {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()})
    return model, reg


def _value_and_grads(reg, model):
    params = [p for p in model.parameters()]
    value = reg(model)
    return value.detach(), torch.autograd.grad(value, params, allow_unused=True)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("mode,storage", [("separate", torch.float32), ("online", torch.bfloat16)])
def test_round_trip(tmp_path, suffix, mode, storage):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model, reg = _registered(mode, storage)
    path = save_regularizer(reg, tmp_path / f"ewc{suffix}")
    back = load_regularizer(path)
    assert (back.mode, back.gamma, back.lambda_ewc, back.tasks_seen, back.storage_dtype) == \
           (reg.mode, reg.gamma, reg.lambda_ewc, reg.tasks_seen, reg.storage_dtype)
    assert back.protected_names == reg.protected_names
    v0, g0 = _value_and_grads(reg, model)
    v1, g1 = _value_and_grads(back, model)
    assert torch.equal(v0, v1)
    for a, b in zip(g0, g1):
        assert (a is None and b is None) or torch.equal(a, b)
    # The loaded one keeps working: registering a third task gives what the original gives.
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.register_task(fisher, anchor)
    back.register_task(fisher, anchor)
    assert torch.equal(reg(model).detach(), back(model).detach())


def test_empty_regularizer_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    back = load_regularizer(save_regularizer(EWCRegularizer(5.0), tmp_path / "e.safetensors"))
    assert back.tasks_seen == 0 and back.lambda_ewc == 5.0


def test_missing_file(tmp_path):
    with pytest.raises(EWCInputError, match="no such file"):
        load_regularizer(tmp_path / "nope.safetensors")


def test_foreign_files_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(EWCInputError, match="does not hold an EWCRegularizer"):
        load_regularizer(tmp_path / "other.pt")
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EWCInputError, match="without fastewc metadata"):
        load_regularizer(tmp_path / "other.safetensors")


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    import fastewc._utils as opt

    real = opt.importlib.import_module
    monkeypatch.setattr(opt.importlib, "import_module",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name.startswith("safetensors")
                        else real(name, *a, **k))
    _, reg = _registered()
    with pytest.raises(MissingDependencyError, match=r"fastewc\[safetensors\]"):
        save_regularizer(reg, tmp_path / "x.safetensors")
