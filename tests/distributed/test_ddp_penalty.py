"""The penalty under DistributedDataParallel (gloo, 2 CPU processes) equals a single-process run."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer

from models import dist_data, dist_model
from ranks import on_ranks

WORLD = 2


def _model():
    return dist_model()


def _data():
    return dist_data(8)


def _ewc(model):
    g = torch.Generator().manual_seed(2)
    ewc = EWCRegularizer(30.0)
    ewc.register_task({n: torch.rand(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()},
                      {n: p.detach() + 0.2 for n, p in model.named_parameters()})
    return ewc


def _step(net, ewc, x, y, style):
    """One backward of the loss with the penalty added (``loss``) or its gradient accumulated."""
    if style == "loss":
        (F.cross_entropy(net(x), y) + ewc(net)).backward()
    else:
        F.cross_entropy(net(x), y).backward()
        ewc.accumulate_grad_(net)


def _single(style):
    model, (x, y) = _model(), _data()
    _step(model, _ewc(model), x, y, style)
    return [p.grad for p in model.parameters()]


def _rank(rank, scratch, style):
    model = _model()
    ewc = _ewc(model)  # registered with the unwrapped names
    x, y = _data()
    _step(nn.parallel.DistributedDataParallel(model), ewc, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank], style)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("style", ["loss", "accumulate"])
def test_ddp_gradients_equal_single_process(style):
    want = _single(style)
    for got in on_ranks(_rank, WORLD, style):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
