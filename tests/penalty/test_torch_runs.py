"""The PyTorch backend's CPU walk over many small parameters: consecutive small tensors handled as
one block (a run), against the reference loop in float64, including the cases where a run must
fall back to one tensor at a time (a missing or non-contiguous gradient) and a NaN next to
finite neighbours."""

import pytest
import torch
import torch.nn as nn

from fastewc import EWCRegularizer
from fastewc import reference as R
from fastewc.penalty.backends import torch_backend as TB
from plans import use_torch_backend

LAM = 3.0
# relative tolerance of the value and of each gradient, by parameter / storage dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


class ManySmall(nn.Module):
    """30 small tensors (odd sizes, an empty and a one-element one), then a large one, then more
    small ones: runs, a tensor walked in several blocks, and a run after it."""

    def __init__(self, dtype):
        super().__init__()
        sizes = [(3, 5), (0,), (1,), (7,), (2, 3, 4)] * 6 + [(40, 30)] + [(9,), (4, 4)] * 3
        for i, s in enumerate(sizes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)))


def _setup(dtype, monkeypatch, block=256, small=64):
    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    use_torch_backend(monkeypatch, strategy="blocked", block=block, small=small)
    torch.manual_seed(0)
    model = ManySmall(dtype)
    fisher = {n: torch.rand(p.shape).to(dtype) for n, p in model.named_parameters()}
    anchor = {n: (p.detach().double() + 0.3 * torch.randn(p.shape, dtype=torch.float64)).to(dtype)
              for n, p in model.named_parameters()}
    ewc = EWCRegularizer(LAM, storage_dtype=dtype, backend="torch")
    ewc.register_task(fisher, anchor)
    # the reference reads the stored (rounded) values, in float64
    f64 = {n: t.double() for n, t in fisher.items()}
    a64 = {n: t.double() for n, t in anchor.items()}
    return model, ewc, f64, a64


def _reference(model, f64, a64):
    model64 = ManySmall(torch.float64)
    model64.load_state_dict({n: p.detach().double() for n, p in model.named_parameters()})
    value = R.ewc_penalty_loop(model64, [f64], [a64], LAM)
    value.backward()
    return value.detach(), {n: p.grad for n, p in model64.named_parameters()}


def _count_runs(monkeypatch):
    taken = []
    real = TB._Run.run

    def spy(self, *a):
        got = real(self, *a)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(TB._Run, "run", spy)
    return taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", ["all", "some missing", "one transposed"])
def test_accumulate_grad_in_runs_matches_reference(dtype, grads, monkeypatch):
    model, ewc, f64, a64 = _setup(dtype, monkeypatch)
    taken = _count_runs(monkeypatch)
    want_v, want_g = _reference(model, f64, a64)
    before = {}
    for n, p in model.named_parameters():
        if grads == "some missing" and n in ("p2", "p6"):  # both in the first run
            continue
        g = torch.randn(p.shape, dtype=torch.float64)
        if grads == "one transposed" and n == "p0":
            g = g.t().contiguous().t()  # same values, not contiguous
        p.grad = g.to(dtype)
        before[n] = p.grad.double().clone()
    value = ewc.accumulate_grad_(model)
    torch.testing.assert_close(value.double(), want_v, rtol=TOL[dtype], atol=0)
    for n, p in model.named_parameters():
        want = want_g[n] + before.get(n, 0.0)
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(p.grad.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=n)
    # every run went through the run path (a missing gradient starts at zero there) except the
    # one holding the transposed gradient
    assert taken and (not all(taken) and any(taken) if grads == "one transposed" else all(taken)), taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalty_value_in_runs_matches_reference(dtype, monkeypatch):
    model, ewc, f64, a64 = _setup(dtype, monkeypatch)
    taken = _count_runs(monkeypatch)
    want_v, want_g = _reference(model, f64, a64)
    model.zero_grad(set_to_none=True)  # the penalty's backward starts every gradient, in runs too
    value = ewc(model)
    value.backward()
    torch.testing.assert_close(value.detach().double(), want_v, rtol=TOL[dtype], atol=0)
    for n, p in model.named_parameters():
        scale = float(want_g[n].abs().max()) if want_g[n].numel() else 1.0
        torch.testing.assert_close(p.grad.double(), want_g[n], rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=n)
    assert taken and all(taken)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_parameter_inside_a_run_is_left_out(dtype, monkeypatch):
    # the frozen tensor's slice of the flat buffers lies between two members of the run
    model, ewc, f64, a64 = _setup(dtype, monkeypatch)
    taken = _count_runs(monkeypatch)
    model.p3.requires_grad_(False)
    model.p8.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    value = ewc.accumulate_grad_(model)
    model64 = ManySmall(torch.float64)
    model64.load_state_dict({n: p.detach().double() for n, p in model.named_parameters()})
    model64.p3.requires_grad_(False)
    model64.p8.requires_grad_(False)
    want = R.ewc_penalty_loop(model64, [f64], [a64], LAM)
    torch.testing.assert_close(value.double(), want.detach(), rtol=TOL[dtype], atol=0)
    assert model.p3.grad is None and taken and all(taken)


@pytest.mark.parametrize("change", ["data swapped", "in place", "parameter replaced", "square transposed"])
def test_a_run_sees_parameters_changed_between_steps(change, monkeypatch):
    # the run keeps flat views of its members between steps: they must follow new storage
    # (``p.data = ...``, as ``module.to`` does), in-place updates and new Parameter objects
    model, ewc, f64, a64 = _setup(torch.float32, monkeypatch)
    taken = _count_runs(monkeypatch)
    for p in model.parameters():
        p.grad = torch.zeros(p.shape, dtype=p.dtype)  # contiguous, whatever the parameter's layout
    ewc.accumulate_grad_(model)
    with torch.no_grad():
        if change == "data swapped":
            model.p2.data = model.p2.data + 1.5
        elif change == "in place":
            model.p2.add_(1.5)
        elif change == "square transposed":  # same Parameter, storage and shape; another layout
            model.p32.data = model.p32.data.t()
        else:
            model.p2 = nn.Parameter(model.p2.detach() + 1.5)
    for p in model.parameters():
        p.grad = torch.zeros(p.shape, dtype=p.dtype)  # contiguous, whatever the parameter's layout
    value = ewc.accumulate_grad_(model)
    want_v, want_g = _reference(model, f64, a64)
    torch.testing.assert_close(value.double(), want_v, rtol=TOL[torch.float32], atol=0)
    for name in ("p2", "p32"):
        torch.testing.assert_close(getattr(model, name).grad.double(), want_g[name], rtol=TOL[torch.float32],
                                   atol=1e-6, msg=name)
    # the run holding the transposed matrix goes tensor by tensor; every other run stays a run
    assert taken and (not all(taken) and any(taken) if change == "square transposed" else all(taken)), taken


def test_nan_in_a_run_reaches_the_value_and_its_own_gradient_only(monkeypatch):
    model, ewc, f64, a64 = _setup(torch.float32, monkeypatch)
    taken = _count_runs(monkeypatch)
    with torch.no_grad():
        model.p3[2] = float("nan")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    value = ewc.accumulate_grad_(model)
    assert value.isnan(), value
    assert taken and all(taken)
    for n, p in model.named_parameters():
        if n == "p3":
            assert p.grad[2].isnan() and p.grad[[0, 1, 3, 4, 5, 6]].isfinite().all()
        else:
            assert p.grad.isfinite().all(), n


def test_block_and_small_are_checked():
    with pytest.raises(ValueError, match="block .* must be positive"):
        TB.TorchBackend(block=0)
    with pytest.raises(ValueError, match="small .* not negative"):
        TB.TorchBackend(small=-1)


def test_a_run_makes_its_views_once_and_new_parameters_get_a_new_plan(monkeypatch):
    # A run gathers theta through flat views of its members, made when its plan is first walked:
    # they hold while the binding serves (its fingerprint verified the parameters). A replaced
    # parameter is bound anew: a new plan, whose runs view the new parameter.
    model, ewc, f64, a64 = _setup(torch.float32, monkeypatch)

    def first_run():
        return next(u for u in ewc._binding.plans[0].cache["units"] if isinstance(u, TB._Run))

    ewc.accumulate_grad_(model)
    run = first_run()
    pieces = run.theta
    for _ in range(3):
        ewc.accumulate_grad_(model)
        ewc(model).backward()
    assert first_run() is run and run.theta is pieces
    name = ewc._binding.plans[0].names[run.members[0]]
    setattr(model, name, nn.Parameter(getattr(model, name).detach() + 1.0))
    value = ewc.accumulate_grad_(model)
    new = first_run()
    k = [i for i, _ in new.pieces].index(new.members[0])
    assert new is not run and new.theta[k].data_ptr() == getattr(model, name).data_ptr()
    torch.testing.assert_close(value.double(), _reference(model, f64, a64)[0], rtol=TOL[torch.float32], atol=0)
