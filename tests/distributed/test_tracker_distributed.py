"""FisherTracker under DDP (gloo, 2 CPU processes): each rank tracks the training steps on its
share of the data; fisher() all-reduces the sums and sample counts, so every rank holds the
tracked Fisher of all the data, equal to one process tracking every sample."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastewc import FisherTracker

from models import assert_fisher_close, dist_data, dist_model
from ranks import on_ranks

WORLD = 2


def _model():
    return dist_model()


def _data():
    return dist_data(11)  # split 6 / 5: the counts must be all-reduced, not assumed equal


def _batches(lo, hi, size=4):
    x, y = _data()
    return [(x[i : min(i + size, hi)], y[i : min(i + size, hi)]) for i in range(lo, hi, size)]


def _track(model, batches):
    """Training steps at learning rate 0 (parameters fixed), the loss a batch mean."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker = FisherTracker(model)
    with tracker:
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return tracker


def _rank(rank, scratch):
    model = nn.parallel.DistributedDataParallel(_model())
    tracker = _track(model, _batches(*((0, 6) if rank == 0 else (6, 11))))
    return {"fisher": tracker.fisher(), "local": tracker.samples_seen}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_tracked_fisher_equals_one_process_over_all_the_data():
    ranks = on_ranks(_rank, WORLD)
    single = _track(_model(), _batches(0, 11))
    assert single.samples_seen == 11 and [r["local"] for r in ranks] == [6, 5]
    ref = single.fisher()
    for r in ranks:
        assert_fisher_close(r["fisher"], ref, rtol=1e-12, atol_rel=1e-12)
    for name in ref:
        assert torch.equal(ranks[0]["fisher"][name], ranks[1]["fisher"][name]), name
