"""How ``loss + ewc(model)``'s gradient reaches the parameters (``PenaltyFunction``): added into
``.grad`` after a plain ``backward()``, handed to autograd otherwise, differentiable under
``create_graph``. Every case against the float64 per-task loop (``fastewc.reference``) on every
backend, with the task loss in the graph as users write it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer
from fastewc.reference import ReferenceEWC

from models import make_tasks, perturb, register_both

TOL = 2e-5


class TwoHeads(nn.Module):
    """A trunk and two heads; ``forward(x, head)`` uses one, so the other's parameters get a
    gradient from the penalty only."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(7, 9)
        self.a = nn.Linear(9, 3)
        self.b = nn.Linear(9, 3)

    def forward(self, x, head="a"):
        return getattr(self, head)(torch.tanh(self.trunk(x)))


def setup(backend):
    torch.manual_seed(0)
    model = TwoHeads()
    ewc, ref = register_both(EWCRegularizer(50.0, backend=backend), ReferenceEWC(50.0), make_tasks(model, 2))
    perturb(model)
    x, y = torch.randn(5, 7), torch.randint(0, 3, (5,))
    return model, ewc, ref, x, y


def want_grads(model, ref, x, y, scale=1.0, times=1):
    """The float64 gradients of ``scale * (task loss + reference penalty)``, ``times`` backwards."""
    m64 = copy.deepcopy(model).double()
    m64.zero_grad(set_to_none=True)
    for _ in range(times):
        (scale * (F.cross_entropy(m64(x.double()), y) + ref(m64))).backward()
    return {n: p.grad for n, p in m64.named_parameters()}


def assert_grads(got: dict, want: dict):
    for n, w in want.items():
        g = got[n]
        assert g is not None, f"{n} got no gradient"
        torch.testing.assert_close(g.double(), w, rtol=TOL, atol=TOL * float(w.abs().max()), msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_backward_adds_the_penalty_once_also_where_the_task_gives_no_gradient(backend, set_to_none):
    model, ewc, ref, x, y = setup(backend)
    for _ in range(2):  # the second step: bound, tables cached
        model.zero_grad(set_to_none=set_to_none)
        (F.cross_entropy(model(x), y) + ewc(model)).backward()
    assert_grads({n: p.grad for n, p in model.named_parameters()}, want_grads(model, ref, x, y))


def test_accumulating_over_backwards_and_retained_graphs(backend):
    model, ewc, ref, x, y = setup(backend)
    model.zero_grad(set_to_none=True)
    loss = 0.5 * (F.cross_entropy(model(x), y) + ewc(model))  # a scale, as GradScaler or accumulation applies
    loss.backward(retain_graph=True)
    loss.backward()
    (0.5 * (F.cross_entropy(model(x), y) + ewc(model))).backward()
    assert_grads({n: p.grad for n, p in model.named_parameters()}, want_grads(model, ref, x, y, scale=0.5, times=3))


def test_autograd_grad_returns_the_gradient_and_leaves_dot_grad_alone(backend):
    model, ewc, ref, x, y = setup(backend)
    model.zero_grad(set_to_none=True)
    names, params = zip(*model.named_parameters())
    got = torch.autograd.grad(F.cross_entropy(model(x), y) + ewc(model), params, allow_unused=True)
    assert all(p.grad is None for p in params)
    assert_grads(dict(zip(names, got)), want_grads(model, ref, x, y))


def test_backward_with_inputs_writes_only_those(backend):
    model, ewc, ref, x, y = setup(backend)
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x), y) + ewc(model)).backward(inputs=[model.trunk.weight, model.b.bias])
    want = want_grads(model, ref, x, y)
    assert_grads({"trunk.weight": model.trunk.weight.grad, "b.bias": model.b.bias.grad},
                 {"trunk.weight": want["trunk.weight"], "b.bias": want["b.bias"]})
    assert model.a.weight.grad is None and model.trunk.bias.grad is None


def test_double_backward_sees_lambda_times_importance(backend):
    # create_graph: the gradient is differentiable, so a Hessian-vector product of the penalty
    # is lambda * A * v (the reference loop differentiated twice by autograd).
    model, ewc, ref, x, y = setup(backend)
    names, params = zip(*model.named_parameters())
    vs = [torch.randn_like(p) for p in params]
    g = torch.autograd.grad(ewc(model), params, create_graph=True)
    hv = torch.autograd.grad(sum((a * v).sum() for a, v in zip(g, vs)), params)
    m64 = copy.deepcopy(model).double()
    p64 = list(m64.parameters())
    g64 = torch.autograd.grad(ref(m64), p64, create_graph=True)
    hv64 = torch.autograd.grad(sum((a * v.double()).sum() for a, v in zip(g64, vs)), p64)
    assert_grads(dict(zip(names, hv)), dict(zip(names, hv64)))
    assert_grads(dict(zip(names, g)), dict(zip(names, [t.detach() for t in g64])))


def test_a_hook_on_a_parameter_sees_the_penalty_gradient(backend):
    model, ewc, ref, x, y = setup(backend)
    seen = []
    model.b.weight.register_hook(lambda g: seen.append(g.detach().clone()))
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x), y) + ewc(model)).backward()
    want = want_grads(model, ref, x, y)
    assert len(seen) == 1
    assert_grads({"b.weight": seen[0]}, {"b.weight": want["b.weight"]})
    assert_grads({n: p.grad for n, p in model.named_parameters()}, want)


def test_post_accumulate_hooks_see_the_whole_gradient(backend):
    # An optimizer stepping inside post-accumulate hooks (optimizer-in-backward) must see the
    # penalty's part too: such parameters take the path through autograd.
    model, ewc, ref, x, y = setup(backend)
    seen = {}
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: seen.__setitem__(n, p.grad.detach().clone()))
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x), y) + ewc(model)).backward()
    assert_grads(seen, want_grads(model, ref, x, y))


def test_the_in_place_path_is_taken_where_it_may_be():
    # On CPU groups without hooks or process groups the penalty's backward hands autograd no
    # gradient (the point of the path); with a hook it hands one over.
    model, ewc, ref, x, y = setup("cpu" if _has_cpu_kernel() else "torch")
    handed = []
    ewc(model)
    value = ewc(model)
    node = value.grad_fn
    node.register_hook(lambda grad_inputs, grad_outputs: handed.append(grad_inputs))
    (F.cross_entropy(model(x), y) + value).backward()
    assert handed and all(g is None for g in handed[0])
    model.trunk.weight.register_hook(lambda g: g)
    value = ewc(model)
    handed.clear()
    value.grad_fn.register_hook(lambda grad_inputs, grad_outputs: handed.append(grad_inputs))
    (F.cross_entropy(model(x), y) + value).backward()
    assert handed and all(g is not None for g in handed[0])


def _has_cpu_kernel() -> bool:
    import fastewc.penalty.backends as backends

    return backends.cpu_backend_status(torch.device("cpu")) is None
