"""Models behind wrappers: torch.compile (names under "_orig_mod.") and DataParallel /
DistributedDataParallel (under "module."). Whichever of the wrapped or the plain model the
Fisher was named on, and whichever is handed to the regularizer, the same parameters are
protected under the plain model's names. (No test here calls a compiled forward: compiling
takes seconds and the penalty never runs through it.)"""


import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import EWCInputError, EWCRegularizer
from fastewc import reference as R
from fastewc._utils import unwrap_model, unwrapped_name

from models import assert_penalty_steps, make_tasks, perturb

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

WRAPS = {"compile": torch.compile, "data_parallel": nn.DataParallel,
         "both": lambda m: nn.DataParallel(torch.compile(m))}


def net():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def renamed(d, wrapped):
    """``d`` keyed by the wrapped model's names."""
    plain = {id(p): n for n, p in unwrap_model(wrapped).named_parameters()}
    wrapped_names = {plain[id(p)]: n for n, p in wrapped.named_parameters()}
    return {wrapped_names[n]: t for n, t in d.items()}


def reference(tasks):
    ref = R.ReferenceEWC(5.0)
    for f, a in tasks:
        ref.register_task(f, a)
    return ref


def check(ewc, handed, model, ref):
    assert_penalty_steps(ewc, model, ref, handed=handed, rtol=1e-5)
    assert ewc.protected_names == [n for n, _ in model.named_parameters()]


def test_unwrap_model_and_names():
    m = net()
    for wrap in WRAPS.values():
        assert unwrap_model(wrap(m)) is m
    names = {n for n, _ in m.named_parameters()}
    assert unwrapped_name("_orig_mod.0.weight", names) == "0.weight"
    assert unwrapped_name("module._orig_mod.2.bias", names) == "2.bias"
    assert unwrapped_name("other.0.weight", names) == "other.0.weight"  # not a wrapper prefix


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("named_on", ["plain", "wrapped"])
@pytest.mark.parametrize("with_model", [False, True])
def test_penalty_on_a_wrapped_model(wrap, named_on, with_model):
    model = net()
    wrapped = WRAPS[wrap](model)
    tasks = make_tasks(model, 2)
    ewc = EWCRegularizer(5.0, storage_dtype=torch.float32)
    for f, a in tasks:
        if named_on == "wrapped":
            f, a = renamed(f, wrapped), renamed(a, wrapped)
        ewc.register_task(f, a, model=wrapped if with_model else None)
    perturb(model)
    ref = reference(tasks)
    check(ewc, wrapped, model, ref)
    check(ewc, model, model, ref)  # the plain model is the same one
    state = ewc.state_dict()
    again = EWCRegularizer()
    again.load_state_dict(state)
    check(again, wrapped, model, ref)


def test_wrapped_names_registered_after_binding_merge_into_the_same_parameters():
    model = net()
    wrapped = torch.compile(model)
    tasks = make_tasks(model, 3)
    ewc = EWCRegularizer(5.0, storage_dtype=torch.float32)
    f, a = tasks[0]
    ewc.register_task(renamed(f, wrapped), renamed(a, wrapped))  # stored under "_orig_mod." names
    ewc(wrapped)  # bound: now under the plain names
    f, a = tasks[1]
    ewc.register_task(renamed(f, wrapped), renamed(a, wrapped))  # the bound model renames them
    f, a = tasks[2]
    ewc.register_task(f, a, model=wrapped)
    perturb(model)
    check(ewc, wrapped, model, reference(tasks))


def test_stored_wrapped_names_meet_a_model_at_registration():
    # Stored under wrapped names with no model seen; the next task comes with the model: the
    # stored names are renamed first, so each parameter is stored once.
    model = net()
    wrapped = nn.DataParallel(model)
    tasks = make_tasks(model, 2)
    ewc = EWCRegularizer(5.0, storage_dtype=torch.float32)
    ewc.register_task(*(renamed(d, wrapped) for d in tasks[0]))
    ewc.register_task(*tasks[1], model=model)
    assert ewc.protected_names == [n for n, _ in model.named_parameters()]
    perturb(model)
    check(ewc, model, model, reference(tasks))


def test_one_parameter_named_both_ways_is_refused():
    model = net()
    wrapped = torch.compile(model)
    f, a = make_tasks(model, 1)[0]
    f["_orig_mod.0.weight"] = f["0.weight"].clone()
    ewc = EWCRegularizer(5.0)
    with pytest.raises(EWCInputError, match=r"fisher names parameter '0\.weight' twice: as '0\.weight' and as "
                                            r"'_orig_mod\.0\.weight'"):
        ewc.register_task(f, a, model=wrapped)
    assert ewc.tasks_seen == 0


def test_consolidate_estimates_on_the_original_module():
    model = net()
    wrapped = torch.compile(model)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    ewc = EWCRegularizer(5.0)
    fisher, optimum = ewc.consolidate(wrapped, [(x, y)], method="rules")
    want = fastewc.estimate_fisher(model, [(x, y)], method="rules")
    assert list(fisher) == list(want) == [n for n, _ in model.named_parameters()]
    for n in want:
        torch.testing.assert_close(fisher[n], want[n])


def test_penalty_inside_a_compiled_training_step():
    # torch.compile over a step that adds ewc(model) to the loss: dynamo runs the regularizer
    # eagerly (the kernel is a foreign call), and loss and gradients are those of the eager step.
    model = net()
    ewc = EWCRegularizer(5.0)
    ewc.register_task(*make_tasks(model, 1)[0])
    perturb(model)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))

    def step(x, y):
        return nn.functional.cross_entropy(model(x), y) + ewc(model)

    model.zero_grad(set_to_none=True)
    want = step(x, y)
    want.backward()
    want_g = [p.grad.clone() for p in model.parameters()]
    # aot_eager: dynamo and AOT autograd as with the default backend, without inductor's C++
    # build (which depends on the machine's compiler, not on this library)
    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        got = compiled(x, y)
        got.backward()
        torch.testing.assert_close(got.detach(), want.detach())
        for p, g in zip(model.parameters(), want_g):
            torch.testing.assert_close(p.grad, g)
