"""estimate_fisher and consolidate bad input: each case raises EWCInputError naming the problem."""

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


@pytest.mark.parametrize("method", ["rules", "auto"])
@pytest.mark.parametrize("at", [1, 4])
def test_squares_that_overflow_in_a_later_batch_are_detected(method, at):
    # Finite gradients (~1e30) whose squares overflow float32; in a later batch the rules have
    # already added into the running sums, which are checked in place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x[at] *= 1e30
    with pytest.raises(EWCInputError, match=r"the squared gradients overflowed \(a gradient above ~1e19 in float32\)"):
        fastewc.estimate_fisher(model, batches(x, y, batch_size=3), method=method)


# -- every argument's type and range (issue 23) ------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"max_memory": "1GB"}, r"max_memory must be a positive finite number of bytes.*'1GB'"),
    ({"max_memory": float("nan")}, r"max_memory must be a positive finite number.*nan"),
    ({"max_memory": float("inf")}, r"max_memory must be a positive finite number.*inf"),
    ({"max_memory": 0}, r"max_memory must be a positive finite number.*got 0"),
    ({"max_memory": True}, r"max_memory must be a positive finite number.*True"),
    ({"generator": 0}, r"generator must be a torch\.Generator.*got int"),
    ({"generator": 0, "kind": "sampled"}, r"generator must be a torch\.Generator.*got int"),
    ({"num_samples": 2.5}, r"num_samples must be a positive int.*2\.5"),
    ({"num_samples": True}, r"num_samples must be a positive int.*True"),
    ({"num_samples": "10"}, r"num_samples must be a positive int.*'10'"),
    ({"chunk_size": 0}, r"chunk_size must be a positive int.*got 0"),
    ({"chunk_size": 2.0}, r"chunk_size must be a positive int.*2\.0"),
    ({"chunk_size": True}, r"chunk_size must be a positive int.*True"),
    ({"top_k": "3", "kind": "exact"}, r"top_k must be a positive int.*'3'"),
    ({"top_k": 0, "kind": "exact"}, r"top_k must be a positive int.*got 0"),
    ({"top_k": 3}, r"top_k=3 applies to kind='exact' only"),
    ({"kind": 3}, r"unknown kind 3; expected one of empirical, sampled, exact"),
    ({"kind": ["exact"]}, r"unknown kind \['exact'\]"),
    ({"method": None}, r"unknown method None; expected one of auto"),
    ({"loss_fn": "cross_entropy"}, r"loss_fn must be a callable.*got str"),
    ({"progress": "yes"}, r"progress must be True or False; got 'yes'"),
    ({"return_info": 1}, r"return_info must be True or False; got 1"),
    ({"params": 3}, r"params must be None, a parameter name or glob.*got int"),
    ({"params": [0]}, r"params must be None, a parameter name or glob.*holding int"),
])
def test_argument_type_and_range(kwargs, match):
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match=match):
        fastewc.estimate_fisher(model, data, **kwargs)


def test_params_given_as_tensors_says_to_pass_names():
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match=r"holding tensors \(pass names: \[n for n, p in model\.named_parameters"):
        fastewc.estimate_fisher(model, data, params=model.parameters())


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    model, data = make_mlp(n=10)
    got = fastewc.estimate_fisher(model, data, num_samples=np.int64(6), chunk_size=np.int32(2))
    plain = fastewc.estimate_fisher(model, data, num_samples=6, chunk_size=2)
    for n in plain:
        torch.testing.assert_close(got[n], plain[n])


def test_model_not_a_module():
    _, data = make_mlp()
    with pytest.raises(EWCInputError, match=r"model must be a torch\.nn\.Module; got function"):
        fastewc.estimate_fisher(lambda x: x, data)


def test_one_dict_batch_as_data_says_to_wrap_it():
    model = nn.Linear(4, 3)
    with pytest.raises(EWCInputError, match=r"data must be an iterable of batches.*one dict batch goes in a list"):
        fastewc.estimate_fisher(model, {"x": torch.randn(2, 4), "labels": torch.zeros(2, dtype=torch.long)})


def test_generator_on_another_device_than_the_parameters():
    # No second device here: a generator that says it is on CUDA stands in for one.
    model, data = make_mlp()

    class CudaGenerator(torch.Generator):
        @property
        def device(self):
            return torch.device("cuda", 0)

    with pytest.raises(EWCInputError, match=r"generator is a cuda generator but the parameters are on cpu.*"
                                            r"torch\.Generator\(device='cpu'\)"):
        fastewc.estimate_fisher(model, data, kind="sampled", generator=CudaGenerator())


def test_consolidate_refuses_what_is_not_a_regularizer():
    model, data = make_mlp()
    with pytest.raises(EWCInputError, match=r"regularizer must be an EWCRegularizer or OnlineEWC.*got Sequential"):
        fastewc.consolidate(model, model, data)  # arguments swapped


def test_an_output_holding_nan_is_refused_saying_so():
    """A model whose output is NaN for a sample (a float64 Hugging Face model with eager attention
    on a left-padded batch) raised torch's 'atol must be greater than or equal to zero, but got
    -nan' from inside the probe's comparison."""
    class NaNRow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            out = self.lin(x)
            return torch.where(x[:, :1] > 100, torch.full_like(out, float("nan")), out)

    model = NaNRow().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    x[1, 0] = 1000.0
    with pytest.raises(fastewc.EWCInputError, match=r"output on the first 4 samples of the data holds NaN"):
        fastewc.estimate_fisher(model, [(x, torch.zeros(4, dtype=torch.long))])


class StateInPlace(nn.Module):
    """In eval mode its forward changes in place a tensor its backward needs (RWKV's eval path in
    transformers does): no per-sample gradient exists."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.sigmoid(self.lin(x))
        if not self.training:
            y.mul_(2.0)
        return y


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_a_model_whose_eval_forward_cannot_be_differentiated(method):
    """A clear error naming what failed and why, not autograd's traceback from inside the probe."""
    model = StateInPlace()
    data = batches(torch.randn(6, 4), torch.randint(0, 3, (6,)), batch_size=3)
    with pytest.raises(EWCInputError, match="backward for one sample failed .*modified by an inplace operation.*eval mode"):
        fastewc.estimate_fisher(model, data, method=method)


class _OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise torch.OutOfMemoryError("out of memory (simulated in a backward)")


class OutOfMemory(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return _OutOfMemoryInBackward.apply(self.lin(x))


def test_running_out_of_memory_in_a_one_sample_backward_is_not_reworded():
    """Only autograd's own failure becomes the model error above: memory is the caller's to free."""
    data = batches(torch.randn(6, 4), torch.randint(0, 3, (6,)), batch_size=3)
    with pytest.raises(torch.OutOfMemoryError, match="simulated in a backward"):
        fastewc.estimate_fisher(OutOfMemory(), data, method="loop")
