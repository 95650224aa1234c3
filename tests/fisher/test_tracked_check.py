"""``check_tracking``: the parameters ``FisherTracker`` refuses on a step, found in one call, the
rest tracked exactly, and nothing the training sees changed by the check. Float64 tiny models;
the zoo's families are checked in ``test_tracker_zoo.py``."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCInputError, FisherTracker, UntrackableParameters, check_tracking
from fastewc import reference as R

D = torch.float64


class Refusing(nn.Module):
    """Two parameters the tracker refuses, at two moments: a bare position vector added to the
    batch (refused when a tracker is made) and a table called without the batch that meets it
    in a product (refused in the forward); and a counter buffer the forward changes."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.randn(8))
        self.table = nn.Embedding(5, 8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.inp(x) + self.pos)
        h = h * self.table(torch.arange(5)).sum(0)
        return self.head(self.drop(h))


def _data(n=6, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)) for _ in range(batches)]


def test_what_is_refused_is_found_in_one_call_and_the_rest_tracks_exactly():
    torch.manual_seed(0)
    model, data = Refusing().to(D).eval(), _data()
    x, y = data[0]
    check = check_tracking(model, lambda: F.cross_entropy(model(x), y))
    assert set(check.left_out) == {"pos", "table.weight"}
    assert "used outside any module's forward" in check.left_out["pos"]
    assert "meets the batch in mul" in check.left_out["table.weight"]
    assert check.params == ["inp.weight", "inp.bias", "head.weight", "head.bias"]
    assert "tracks 4 of 6 parameters" in str(check) and "check_tracking" not in str(check)
    tracker = FisherTracker(model, params=check.params)
    with tracker:
        for x, y in data:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
    truth = R.estimate_fisher(model, data)
    for n, f in tracker.fisher().items():
        assert torch.allclose(f, truth[n], rtol=1e-10, atol=1e-12 * float(truth[n].abs().max())), n


def test_the_check_changes_no_gradient_buffer_or_random_state():
    """Dropout on (training mode): the check's runs draw masks, which must not move the user's
    random stream; the gradients the parameters had, and the buffer the forward counts in, are
    as before."""
    torch.manual_seed(0)
    model = Refusing(dropout=0.5).to(D).train()
    x, y = _data()[0]
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    copies = {n: g.clone() for n, g in grads.items()}
    calls, rng = model.calls.clone(), torch.get_rng_state()
    check_tracking(model, lambda: F.cross_entropy(model(x), y))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model.calls, calls)
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.equal(p.grad, copies[n]), n


def test_a_refusal_that_leaving_parameters_out_cannot_mend_is_raised_and_the_state_restored():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(D).train()
    x, y = _data()[0]
    stats = model[1].running_mean.clone()
    with pytest.raises(EWCInputError, match=r"BatchNorm '1' normalises with the batch's statistics") as e:
        check_tracking(model, lambda: F.cross_entropy(model(x), y))
    assert not isinstance(e.value, UntrackableParameters)
    assert torch.equal(model[1].running_mean, stats)
    assert all(p.grad is None for p in model.parameters())


def test_every_parameter_refused_leaves_nothing_to_track():
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(5, 3, dtype=D)

        def forward(self, x):
            return x[:, :3] * self.table(torch.arange(5)).sum(0)

    model = Table()
    x, y = _data()[0]
    check = check_tracking(model, lambda: F.cross_entropy(model(x), y))
    assert check.params == [] and list(check.left_out) == ["table.weight"]


def test_a_tracker_refusal_names_the_parameters_to_leave_out():
    model = Refusing().to(D)
    with pytest.raises(UntrackableParameters, match=r"\['pos'\] are used outside any module's forward.*"
                                                    r"fastewc\.check_tracking\(model, step\) finds every parameter") as e:
        FisherTracker(model)
    assert e.value.params == ("pos",) and "check_tracking" not in e.value.reason


@pytest.mark.parametrize("step,match", [
    (None, r"step must be a callable that runs the forward and returns the loss; got NoneType"),
    (lambda: torch.ones(2, requires_grad=True), r"step\(\) must return the scalar loss to back-propagate; got a "
                                                r"tensor of shape \(2,\)"),
    (lambda: torch.ones(()), r"got a tensor of shape \(\) that does not require grad"),
])
def test_a_step_that_is_not_a_loss_is_refused(step, match):
    model = nn.Linear(4, 3).to(D)
    with pytest.raises(EWCInputError, match=match):
        check_tracking(model, step)
