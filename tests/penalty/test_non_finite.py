"""A protected parameter that turns NaN or Inf makes the penalty NaN or Inf on every backend (never
a finite number), and ``check_finite=True`` names it."""

import pytest
import torch

from fastewc import EWCInputError, EWCRegularizer, load_regularizer, save_regularizer

from models import frozen, make_tasks, mlp


def registered(backend, zero_importance=False, **kw):
    model = mlp()
    ewc = EWCRegularizer(3.0, backend=backend, **kw)
    for f, a in make_tasks(model, 2):
        if zero_importance:
            f["2.weight"].zero_()
        ewc.register_task(f, a)
    return model, ewc


def poison(model, value, name="2.weight"):
    with torch.no_grad():
        dict(model.named_parameters())[name][1, 3] = value


BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("zero_importance", [False, True])
@pytest.mark.parametrize("bad", BAD)
def test_value_is_not_finite_on_every_path(bad, zero_importance, backend):
    """``zero_importance``: the poisoned element has A = 0, where 0 * inf = nan must still show."""
    model, ewc = registered(backend, zero_importance)
    poison(model, bad)
    v = ewc(model)
    assert not torch.isfinite(v)
    v.backward()
    assert not torch.isfinite(model[2].weight.grad[1, 3])
    assert not torch.isfinite(ewc.accumulate_grad_(model))
    with torch.no_grad():
        assert not torch.isfinite(ewc(model))
    if bad != bad:  # NaN stays NaN
        assert torch.isnan(v)


def test_frozen_parameter_is_not_protected_so_stays_out():
    model = frozen()
    ewc = EWCRegularizer(3.0, check_finite=True)
    for f, a in make_tasks(model, 1):
        ewc.register_task(f, a)
    poison(model, float("nan"), "0.weight")
    assert torch.isfinite(ewc(model))


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
@pytest.mark.parametrize("path", ["forward", "accumulate", "no_grad"])
def test_check_finite_names_the_first_bad_parameter(bad, kind, path, backend):
    model, ewc = registered(backend, check_finite=True)
    ewc(model)  # fine while everything is finite
    poison(model, bad, "2.weight")
    with torch.no_grad():
        model[2].bias[0] = bad  # a later one too: the first in registration order is named
    match = rf"protected parameter '2.weight' holds {kind} values \(.*of 85\); the EWC penalty is"
    with pytest.raises(EWCInputError, match=match):
        if path == "forward":
            ewc(model)
        elif path == "accumulate":
            ewc.accumulate_grad_(model)
        else:
            with torch.no_grad():
                ewc(model)


def test_check_finite_overflow_is_explained():
    model = mlp()
    ewc = EWCRegularizer(3.0, check_finite=True, storage_dtype=torch.float32)
    f, a = make_tasks(model, 1)[0]
    ewc.register_task({n: t * 0 + 3e38 for n, t in f.items()}, a)
    with torch.no_grad():
        model[0].weight.add_(1e10)
    with pytest.raises(EWCInputError, match="every protected parameter is finite: A \\(theta - m\\)\\^2 overflowed"):
        ewc(model)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_check_finite_survives_state_round_trips(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    # check_finite is how an instance runs, not state: a regularizer keeps its own through
    # load_state_dict, and load_regularizer's fresh one takes the saved value unless told.
    model, ewc = registered("torch", check_finite=True)
    fresh = EWCRegularizer(check_finite=True)
    fresh.load_state_dict(ewc.state_dict())
    back = load_regularizer(save_regularizer(ewc, tmp_path / f"e{suffix}"))
    assert fresh.check_finite is True and back.check_finite is True
    plain = EWCRegularizer()
    plain.load_state_dict(ewc.state_dict())
    assert plain.check_finite is False
    assert load_regularizer(tmp_path / f"e{suffix}", check_finite=False).check_finite is False
    poison(model, float("nan"))
    for reg in (fresh, back):
        with pytest.raises(EWCInputError, match="protected parameter '2.weight' holds NaN"):
            reg(model)
    on = EWCRegularizer(check_finite=True)
    on.load_state_dict(registered("torch")[1].state_dict())  # saved with check_finite=False
    assert on.check_finite is True
