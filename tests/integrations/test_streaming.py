"""StreamingEWC: online EWC on a stream, with the Fisher tracked from the training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCInputError, StreamingEWC
from fastewc.reference import estimate_fisher as reference_fisher


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    batches = [(torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(6)]
    return model, batches


def run(model, stream, batches, opt):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        stream.step()
        opt.step()


def test_consolidations_fold_the_tracked_fisher_with_gamma():
    model, batches = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # parameters fixed: the tracked Fisher is the plain one
    with StreamingEWC(model, lambda_ewc=5.0, gamma=0.5, every=3) as stream:
        run(model, stream, batches, opt)
    assert stream.consolidations == 2 and stream.ewc.tasks_seen == 2
    f1 = reference_fisher(model, batches[:3], kind="empirical", num_samples=15)
    f2 = reference_fisher(model, batches[3:], kind="empirical", num_samples=15)
    for n, a in stream.ewc.importance().items():
        torch.testing.assert_close(a, 0.5 * f1[n] + f2[n], rtol=1e-10, atol=1e-14)
    assert not stream.tracker.active  # closed with the block: no hooks left on the model


def test_the_penalty_gradient_is_added_after_a_consolidation():
    model, batches = setup(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stream = StreamingEWC(model, lambda_ewc=7.0, every=3)
    run(model, stream, batches[:3], opt)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    x, y = batches[3]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    task = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    value = stream.step()
    imp = stream.ewc.importance()
    want_value = 0.0
    for n, p in model.named_parameters():
        d = p.detach() - anchors[n]
        torch.testing.assert_close(p.grad, task[n] + 7.0 * imp[n] * d, rtol=1e-10, atol=1e-14)
        want_value += float((imp[n] * d * d).sum())
    assert float(value) == pytest.approx(3.5 * want_value, rel=1e-10)
    stream.close()


def test_bad_arguments():
    model, _ = setup()
    with pytest.raises(EWCInputError, match="every must be a positive int"):
        StreamingEWC(model, every=0)
    with pytest.raises(EWCInputError, match="fraction must be a number in"):
        StreamingEWC(model, fraction=2.0)
