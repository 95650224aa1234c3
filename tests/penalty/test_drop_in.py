"""What a user of the plain EWC loop can do unchanged: snapshot every parameter as anchors while the
Fisher covers the trainable ones, float64 models at float64 precision by default, states that do
not depend on when they were saved, and clear errors for meta tensors and non-tensors."""

import copy
import io

import pytest
import torch
import torch.nn as nn

from fastewc import EWCInputError, EWCRegularizer, ModelMismatchError
from fastewc import reference as R

from models import frozen, make_tasks, mlp, perturb, register_both


def trainable_fisher(model, dtype=None):
    return {n: torch.rand(p.shape, dtype=dtype or p.dtype) for n, p in model.named_parameters() if p.requires_grad}


def value_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    v = fn(model)
    v.backward()
    return v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
def test_snapshot_of_all_parameters_with_a_trainable_only_fisher(mode, gamma, backend):
    """The recipe ``register_task(fisher, {n: p.detach().clone() for n, p in model.named_parameters()})``
    on a model with a frozen layer: the frozen anchors are accepted and ignored, as in the reference."""
    model = frozen().double()
    ewc = EWCRegularizer(30.0, mode=mode, gamma=gamma, backend=backend)
    ref = R.ReferenceEWC(30.0) if mode == "separate" else R.ReferenceOnlineEWC(30.0, gamma=gamma)
    for _ in range(3):
        fisher = trainable_fisher(model)
        assert set(fisher) == {"2.weight", "2.bias"}
        anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
        ewc.register_task(fisher, anchors)
        ref.register_task(fisher, anchors)
        perturb(model)
    assert ewc.protected_names == ["2.weight", "2.bias"]
    v, g = value_and_grads(ewc, model)
    want_v, want_g = value_and_grads(ref if mode == "separate" else ref.compute_penalty, model)
    torch.testing.assert_close(v, want_v, rtol=1e-12, atol=0)
    assert g.keys() == want_g.keys() == {"2.weight", "2.bias"}
    for n in g:
        torch.testing.assert_close(g[n], want_g[n], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad,match", [
    ("nan", r"optimal_params\['0.weight'\] contains 1 NaN and 0 Inf"),
    ("shape", r"optimal_params\['0.weight'\] has shape \(2, 2\), but the model's parameter has shape \(17, 13\)"),
    ("list", r"optimal_params\['0.weight'\] must be a torch.Tensor, got list"),
    ("meta", r"optimal_params\['0.weight'\] is a meta tensor"),
])
def test_extra_anchors_are_still_validated(bad, match):
    model = frozen()
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    if bad == "nan":
        anchors["0.weight"][0, 0] = float("nan")
    elif bad == "shape":
        anchors["0.weight"] = torch.zeros(2, 2)
    elif bad == "list":
        anchors["0.weight"] = [0.0]
    else:
        anchors["0.weight"] = torch.empty(17, 13, device="meta")
    ewc = EWCRegularizer(1.0)
    with pytest.raises(EWCInputError, match=match):
        ewc.register_task(trainable_fisher(model), anchors, model=model)
    assert ewc.tasks_seen == 0 and ewc.protected_names == []


def test_extra_anchor_for_a_name_the_model_lacks_is_ignored():
    model = mlp()
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchors["head.extra"] = torch.zeros(3)
    ewc = EWCRegularizer(1.0)
    ewc.register_task(trainable_fisher(model), anchors, model=model)
    assert "head.extra" not in ewc.protected_names


def test_fisher_name_without_anchor_is_an_error():
    model = mlp()
    fisher = trainable_fisher(model)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters() if n != "0.bias"}
    ewc = EWCRegularizer(1.0)
    with pytest.raises(EWCInputError, match=r"needs an anchor in optimal_params; missing for '0.bias'"):
        ewc.register_task(fisher, anchors)


@pytest.mark.parametrize("where", ["fisher", "optimal_params"])
def test_meta_tensors_and_non_tensors_are_named(where):
    model = mlp()
    fisher = trainable_fisher(model)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = fisher if where == "fisher" else anchors
    target["2.bias"] = torch.empty(5, device="meta")
    ewc = EWCRegularizer(1.0)
    with pytest.raises(EWCInputError, match=rf"{where}\['2.bias'\] is a meta tensor"):
        ewc.register_task(fisher, anchors)
    target["2.bias"] = 0.5
    with pytest.raises(EWCInputError, match=rf"{where}\['2.bias'\] must be a torch.Tensor, got float"):
        ewc.register_task(fisher, anchors)
    assert ewc.tasks_seen == 0


def test_meta_model_parameters_are_refused_at_registration():
    with torch.device("meta"):
        model = mlp()
    ewc = EWCRegularizer(1.0)
    fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(EWCInputError, match=r"optimal_params\['0.weight'\] is a meta tensor"):
        ewc.register_task(fisher, {n: p.detach() for n, p in model.named_parameters()})


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.7)])
def test_float64_model_with_default_settings_matches_float64_loop(mode, gamma, backend):
    model = mlp().double()
    tasks = make_tasks(model, 4)
    ewc = EWCRegularizer(41.0, mode=mode, gamma=gamma, backend=backend)
    assert ewc.storage_dtype is None
    ref = R.ReferenceEWC(41.0) if mode == "separate" else R.ReferenceOnlineEWC(41.0, gamma=gamma)
    register_both(ewc, ref, tasks)
    assert all(t.dtype == torch.float64 for t in ewc.importance().values())
    perturb(model)
    v, g = value_and_grads(ewc, model)
    want_v, want_g = value_and_grads(ref if mode == "separate" else ref.compute_penalty, model)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, want_v, rtol=1e-12, atol=0)
    for n in want_g:
        torch.testing.assert_close(g[n], want_g[n], rtol=1e-12, atol=1e-12 * float(want_g[n].abs().max()))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(ewc.accumulate_grad_(model), want_v, rtol=1e-12, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_g[n], rtol=1e-12, atol=1e-12 * float(want_g[n].abs().max()))


def test_default_storage_follows_each_parameter_dtype():
    model = mlp()
    model[2].double()
    ewc = EWCRegularizer(1.0)
    ewc.register_task(*make_tasks(model, 1)[0], model=model)
    dtypes = {n: t.dtype for n, t in ewc.importance().items()}
    assert dtypes == {"0.weight": torch.float32, "0.bias": torch.float32,
                      "2.weight": torch.float64, "2.bias": torch.float64}
    half = mlp().to(torch.bfloat16)
    ewc = EWCRegularizer(1.0)
    ewc.register_task(*make_tasks(half, 1)[0], model=half)
    assert {t.dtype for t in ewc.importance().values()} == {torch.float32}  # 16-bit params: float32 buffers
    explicit = EWCRegularizer(1.0, storage_dtype=torch.bfloat16)
    explicit.register_task(*make_tasks(model, 1)[0], model=model)
    assert {t.dtype for t in explicit.importance().values()} == {torch.bfloat16}


@pytest.mark.parametrize("storage", [None, torch.float32])
def test_storage_dtype_round_trips_through_state_dict(storage):
    ewc = EWCRegularizer(1.0, storage_dtype=storage)
    fresh = EWCRegularizer(1.0, storage_dtype=torch.bfloat16)
    fresh.load_state_dict(ewc.state_dict())
    assert fresh.storage_dtype is storage


def _saved(ewc):
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("with_model", [False, True])
def test_dtype_is_recorded_at_registration_not_at_the_first_step(with_model):
    """A state saved before the first step and one saved after it behave the same."""
    model = mlp()
    f, a = make_tasks(model, 1)[0]
    ewc = EWCRegularizer(2.0)
    ewc.register_task(f, a, model=model if with_model else None)
    before = _saved(ewc)
    assert before["_extra_state"]["param_dtypes"] == {n: "float32" for n in f}
    ewc(model)
    after = _saved(ewc)
    assert after["_extra_state"]["param_dtypes"] == before["_extra_state"]["param_dtypes"]
    for state in (before, after):
        other = copy.deepcopy(model).double()
        loaded = EWCRegularizer()
        loaded.load_state_dict(state)
        with pytest.raises(ModelMismatchError, match=r"'0.weight' changed dtype from torch.float32 to torch.float64"):
            loaded(other)
        loaded2 = EWCRegularizer()
        loaded2.load_state_dict(state)
        torch.testing.assert_close(loaded2(model).detach(), ewc(model).detach(), rtol=0, atol=0)


def test_anchor_dtype_is_recorded_without_a_model():
    model = mlp()
    f, a = make_tasks(model, 1, dtype=torch.float64)[0]
    ewc = EWCRegularizer(2.0)
    ewc.register_task(f, a)
    with pytest.raises(ModelMismatchError, match=r"changed dtype from torch.float64 to torch.float32"):
        ewc(model)
    ok = EWCRegularizer(2.0)
    ok.register_task(f, a, model=model)  # with the model, its dtype is the one recorded
    assert float(ok(model).detach()) > 0


def test_check_finite_must_be_a_bool():
    with pytest.raises(EWCInputError, match="check_finite must be True or False, got 1"):
        EWCRegularizer(1.0, check_finite=1)
    with pytest.raises(EWCInputError, match="check_finite must be True or False, got 'yes'"):
        EWCRegularizer(1.0).check_finite = "yes"


def test_frozen_anchor_snapshot_is_not_kept():
    """Ignored anchors cost nothing: only the Fisher's names get buffers."""
    model = nn.Sequential(nn.Linear(50, 50), nn.Linear(50, 2))
    model[0].requires_grad_(False)
    ewc = EWCRegularizer(1.0)
    ewc.register_task(trainable_fisher(model), {n: p.detach().clone() for n, p in model.named_parameters()})
    assert sum(t.numel() for t in ewc.importance().values()) == 102
