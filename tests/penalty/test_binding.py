"""The binding's per-step check: protected parameters are re-found through their module paths
and fingerprinted, not by walking the whole model. Every way a model can change under a bound
regularizer must be picked up (or refused with ModelMismatchError) at the next step; nothing
may be rebuilt while nothing changed."""

import copy

import pytest
import torch
import torch.nn as nn

from fastewc import EWCRegularizer, ModelMismatchError
from fastewc import reference as R
from fastewc.penalty.binding import ParamLocator

from models import assert_penalty_steps, make_tasks, perturb, register_both


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 9))
        self.head = nn.Linear(9, 3)
        self.scale = nn.Parameter(torch.rand(3))

    def forward(self, x):
        return self.head(self.body(x)) * self.scale


def bound(backend, dtype=torch.float32):
    """A model, a regularizer bound to it (one step run) and the float64 reference."""
    model = Net().to(dtype)
    tasks = make_tasks(model, 2, dtype=torch.float64)
    ewc = EWCRegularizer(7.0, storage_dtype=torch.float32, backend=backend)
    ref = R.ReferenceEWC(7.0)
    register_both(ewc, ref, tasks, model=model)
    perturb(model)
    ewc(model)
    assert ewc._binding is not None
    return model, ewc, ref


def check_step(model, ewc, ref):
    assert_penalty_steps(ewc, model, ref)


def test_unchanged_model_keeps_its_binding_and_cpu_tables(backend):
    # A training loop (fresh gradients every step, kept alive so that they get new addresses)
    # rebinds nothing and builds no table after the first steps.
    model, ewc, ref = bound(backend)
    b = ewc._binding
    ewc(model)
    kept = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        ewc(model).backward()
        kept.append([p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        ewc.accumulate_grad_(model)
        kept.append([p.grad for p in model.parameters()])
    if backend == "cpu":
        builds = [be.table_builds for be in b.backends]
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            ewc(model).backward()
            ewc.accumulate_grad_(model)  # adds into the fresh gradients: the grad column moves
            kept.append([p.grad for p in model.parameters()])
        assert [be.table_builds for be in b.backends] == builds
    assert ewc._binding is b
    check_step(model, ewc, ref)


def test_submodule_replaced(backend):
    model, ewc, ref = bound(backend)
    model.body[2] = nn.Linear(6, 9)  # same names, new parameters
    check_step(model, ewc, ref)


def test_parameter_written_into_the_parameters_dict(backend):
    # accelerate and peft write module._parameters[name] directly, bypassing __setattr__.
    model, ewc, ref = bound(backend)
    model.head._parameters["weight"] = nn.Parameter(torch.randn(3, 9))
    check_step(model, ewc, ref)


def test_submodule_written_into_the_modules_dict(backend):
    model, ewc, ref = bound(backend)
    model.body._modules["0"] = nn.Linear(6, 6)
    check_step(model, ewc, ref)


def test_data_swapped_for_a_transposed_view_of_the_same_memory(backend):
    # Same address, same shape, now not contiguous: the values are read as the view says.
    model, ewc, ref = bound(backend)
    w = model.body[0].weight
    ptr = w.data_ptr()
    w.data = w.data.t()
    assert w.data_ptr() == ptr and not w.is_contiguous()
    check_step(model, ewc, ref)


@pytest.mark.parametrize("shape", [(-1,), (6, 9)], ids=["flattened", "same ndim"])
def test_data_swapped_for_another_shape_at_the_same_address_is_refused(backend, shape):
    model, ewc, ref = bound(backend)
    w = model.body[2].weight
    w.data = w.data.view(*shape)
    with pytest.raises(ModelMismatchError, match=r"body\.2\.weight"):
        ewc.accumulate_grad_(model)
    w.data = w.data.view(9, 6)
    check_step(model, ewc, ref)


def test_data_reinterpreted_as_another_dtype_is_refused(backend):
    model, ewc, ref = bound(backend, dtype=torch.bfloat16)
    w = model.head.weight
    w.data = w.data.view(torch.float16)
    with pytest.raises(ModelMismatchError, match=r"'head\.weight' changed dtype from torch\.bfloat16 to torch\.float16"):
        ewc(model)


def test_freezing_and_unfreezing_between_steps(backend):
    model, ewc, ref = bound(backend)
    model.body[0].weight.requires_grad_(False)
    check_step(model, ewc, ref)
    model.body[0].weight.requires_grad_(True)
    check_step(model, ewc, ref)


def test_protected_submodule_deleted_is_refused(backend):
    model, ewc, ref = bound(backend)
    del model.head
    with pytest.raises(ModelMismatchError, match=r"head\.weight"):
        ewc.accumulate_grad_(model)


def test_another_model_rebinds(backend):
    model, ewc, ref = bound(backend)
    other = copy.deepcopy(model)
    perturb(other)
    check_step(other, ewc, ref)
    check_step(model, ewc, ref)


class OwnNames(nn.Module):
    """Holds a parameter outside _parameters and names it itself, as some wrappers do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.hidden = [nn.Parameter(torch.randn(5))]

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        yield from super().named_parameters(prefix, recurse, remove_duplicate)
        yield prefix + "hidden", self.hidden[0]

    def parameters(self, recurse=True):
        for _, p in self.named_parameters():
            yield p


def test_parameters_the_module_tree_does_not_hold_are_walked_for():
    model = OwnNames()
    with pytest.raises(LookupError, match="hidden"):
        ParamLocator(model, ["lin.weight", "hidden"])
    f = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    a = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    ewc = EWCRegularizer(2.0, storage_dtype=torch.float32)
    ewc.register_task(f, a)

    def want():
        return sum(float((f[n].double() * (p.detach().double() - a[n].double()) ** 2).sum())
                   for n, p in model.named_parameters())

    torch.testing.assert_close(float(ewc(model).detach()), want(), rtol=1e-5, atol=0)
    assert ewc._binding.locator is None
    model.hidden[0] = nn.Parameter(torch.randn(5))  # replaced: found by the walk
    torch.testing.assert_close(float(ewc(model).detach()), want(), rtol=1e-5, atol=0)


def test_locator_finds_what_named_parameters_finds():
    model = Net()
    names = [n for n, _ in model.named_parameters()]
    loc = ParamLocator(model, names)
    found = loc.find()
    assert len(found) == len(names) and all(a is b for a, b in zip(found, model.parameters()))
    model.body[1] = nn.ReLU()  # a module on no parameter's path: no edge to it
    assert loc.find() is not None
    model.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 9))
    assert loc.find() is None


def test_gradients_of_another_layout_between_steps(backend):
    # The CPU backend's tables keep the parameters' columns while the binding serves; a
    # gradient that is not contiguous must still be added to as the view says, and the next
    # contiguous one be written through the kernel again.
    model, ewc, ref = bound(backend)
    model64 = copy.deepcopy(model).double()
    want = ref(model64)
    want.backward()
    w, w64 = model.head.weight, model64.head.weight
    for step in range(3):
        model.zero_grad(set_to_none=True)
        ewc.accumulate_grad_(model)  # binds the fast path, gradients allocated
        start = torch.randn(9, 3).t() if step != 1 else torch.randn(3, 9)
        w.grad = start.clone()
        assert w.grad.is_contiguous() == (step == 1)
        ewc.accumulate_grad_(model)
        torch.testing.assert_close(w.grad.double(), start.double() + w64.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("how", ["backward", "autograd.grad"])
def test_parameter_replaced_between_forward_and_backward(backend, how):
    # ``p.data = ...`` after forward passes autograd's check (the saved tensor is the same
    # Parameter): the backward must give the gradient at the new values, not run the backends on
    # addresses their plans no longer hold; the next step binds anew.
    model, ewc, ref = bound(backend)
    model.zero_grad(set_to_none=True)
    model.head.weight.grad = torch.ones(3, 9)  # added to, as autograd would
    value = ewc(model)
    model.head.weight.data = model.head.weight.data + 0.5  # new storage
    model64 = copy.deepcopy(model).double()
    ref(model64).backward()
    params = list(model.parameters())
    if how == "backward":
        value.backward()
        got = [p.grad - (1.0 if p is model.head.weight else 0.0) for p in params]
    else:
        got = torch.autograd.grad(value, params)
    for (n, p), g, q in zip(model.named_parameters(), got, model64.parameters()):
        torch.testing.assert_close(g.double(), q.grad, rtol=2e-5, atol=2e-5 * float(q.grad.abs().max()), msg=n)
    check_step(model, ewc, ref)
