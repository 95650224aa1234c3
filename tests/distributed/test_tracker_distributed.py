"""FisherTracker under DDP (gloo, 2 CPU processes): each rank tracks the training steps on its
share of the data; fisher() all-reduces the sums and sample counts, so every rank holds the
tracked Fisher of all the data, equal to one process tracking every sample."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fastewc import FisherTracker

from models import assert_fisher_close, dist_data, dist_model

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


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(_model())
        tracker = _track(model, _batches(*((0, 6) if rank == 0 else (6, 11))))
        torch.save({"fisher": tracker.fisher(), "local": tracker.samples_seen}, f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo's connections down while another is in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_tracked_fisher_equals_one_process_over_all_the_data():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = os.path.join(tmp, "init"), os.path.join(tmp, "fisher")
        mp.spawn(_worker, args=(init_file, out), nprocs=WORLD, join=True)
        ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    single = _track(_model(), _batches(0, 11))
    assert single.samples_seen == 11 and [r["local"] for r in ranks] == [6, 5]
    ref = single.fisher()
    for r in ranks:
        assert_fisher_close(r["fisher"], ref, rtol=1e-12, atol_rel=1e-12)
    for name in ref:
        assert torch.equal(ranks[0]["fisher"][name], ranks[1]["fisher"][name]), name
