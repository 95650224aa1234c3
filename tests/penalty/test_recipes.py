"""The README's training-loop recipes agree with each other, also under autocast + GradScaler."""

import pytest
import torch
import torch.nn.functional as F

from fastewc import EWCRegularizer

from models import make_tasks, mlp, perturb


def _setup():
    torch.manual_seed(0)
    model = mlp()
    ewc = EWCRegularizer(50.0)
    for fisher, anchor in make_tasks(model, 2):
        ewc.register_task(fisher, anchor)
    perturb(model)
    x, y = torch.randn(16, model[0].in_features), torch.randint(0, model[-1].out_features, (16,))
    return model, ewc, x, y


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_penalty_in_loss_equals_accumulate_after_backward():
    model, ewc, x, y = _setup()
    (F.cross_entropy(model(x), y) + ewc(model)).backward()
    in_loss = _grads(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    ewc.accumulate_grad_(model)
    for a, b in zip(in_loss, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [2.0**10, 2.0**16])
def test_grad_scaler_both_recipes_match_unscaled(scale):
    """Penalty in the scaled loss, or accumulate_grad_ after ``scaler.unscale_``: both leave the
    same unscaled gradient as a plain fp32 step (the task part computed under bf16 autocast)."""
    model, ewc, x, y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: compare gradients, not steps

    def task_loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(x).float(), y)

    # Reference: no scaler.
    (task_loss() + ewc(model)).backward()
    want = _grads(model)

    # Recipe 1: the penalty inside the loss that the scaler scales.
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(task_loss() + ewc(model)).backward()
    scaler.unscale_(opt)
    got1 = _grads(model)
    scaler.step(opt)
    scaler.update()

    # Recipe 2: backward on the scaled task loss, unscale, then add the penalty's gradient.
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(task_loss()).backward()
    scaler.unscale_(opt)
    ewc.accumulate_grad_(model)
    got2 = _grads(model)
    scaler.step(opt)
    scaler.update()

    for w, a, b in zip(want, got1, got2):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, w, rtol=1e-4, atol=1e-5)


def test_penalty_value_is_float32_and_unchanged_inside_autocast():
    model, ewc, _, _ = _setup()
    plain = ewc(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ewc(model)
    assert inside.dtype == torch.float32
    assert torch.equal(plain, inside)
