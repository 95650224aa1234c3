"""estimate_fisher bad input: each case raises EWCInputError naming the problem."""

import re

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import EWCInputError

from models import batches, make_mlp


def test_error_type_is_value_error():
    assert issubclass(EWCInputError, ValueError)


@pytest.mark.parametrize("data", [[], iter(()), torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.empty(0, 13), torch.empty(0, dtype=torch.long)), batch_size=4)])
def test_empty_data(data):
    model, _ = make_mlp()
    with pytest.raises(EWCInputError, match=r"(?i)empty|no samples|yielded no"):
        fastewc.estimate_fisher(model, data)


@pytest.mark.parametrize("n", [0, -1, -5])
def test_num_samples_not_positive(n):
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match="num_samples"):
        fastewc.estimate_fisher(model, data, num_samples=n)


@pytest.mark.parametrize("batch, got", [
    ("not a batch", "str"),
    (("a", "b", "c"), "str"),
    (42, "int"),
])
def test_unreadable_batch(batch, got):
    model, _ = make_mlp()
    with pytest.raises(EWCInputError, match=got) as info:
        fastewc.estimate_fisher(model, [batch])
    msg = str(info.value)
    assert got in msg, msg  # what it got
    assert re.search(r"(?i)tuple|\(inputs", msg) and re.search(r"(?i)dict", msg), msg  # what it accepts


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_loss_not_scalar(method):
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match=r"(?i)scalar"):
        fastewc.estimate_fisher(model, data, method=method,
                                loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none").repeat(2))


@pytest.mark.parametrize("params", [["nope.weight"], "nothing*", lambda n, p: False])
def test_params_select_nothing(params):
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match=r"(?i)param"):
        fastewc.estimate_fisher(model, data, params=params)


def test_all_parameters_frozen():
    model, data = make_mlp()
    model.requires_grad_(False)
    with pytest.raises(EWCInputError, match=r"(?i)param"):
        fastewc.estimate_fisher(model, data)


def test_empirical_needs_labels():
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match=r"(?i)label|target"):
        fastewc.estimate_fisher(model, [(x,) for x, _ in data], kind="empirical")


def test_unknown_kind():
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match="bogus-kind"):
        fastewc.estimate_fisher(model, data, kind="bogus-kind")


def test_unknown_method():
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match="bogus-method"):
        fastewc.estimate_fisher(model, data, method="bogus-method")


class NaNAtIndex3(nn.Module):
    """Output NaN for the sample whose first feature is 3.0 (sample index 3 in the data)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        out = self.lin(x)
        return out + torch.where(x[:, :1] == 3.0, torch.full_like(out[:, :1], float("nan")),
                                 torch.zeros_like(out[:, :1]))


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("method", ["vmap", "loop", "auto"])
def test_nan_gradient_names_parameter_and_sample(method, kind):
    model = NaNAtIndex3()
    x = torch.randn(8, 4)
    x[:, 0] = torch.arange(8.0) + 0.5
    x[3, 0] = 3.0
    data = batches(x, torch.randint(0, 3, (8,)), batch_size=2)  # index 3 = second row of batch 1
    with pytest.raises(EWCInputError, match=r"lin\.(weight|bias)") as info:
        fastewc.estimate_fisher(model, data, method=method, kind=kind)
    msg = str(info.value)
    assert re.search(r"lin\.(weight|bias)", msg), msg
    assert re.search(r"\b3\b", msg), msg
    assert re.search(r"(?i)nan|inf|finite", msg), msg


def test_inf_gradient_detected():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(1e38)
    data = batches(torch.full((4, 4), 1e38), torch.zeros(4, dtype=torch.long), batch_size=4)
    with pytest.raises(EWCInputError, match=r"(?i)nan|inf|finite"):
        fastewc.estimate_fisher(model, data)
