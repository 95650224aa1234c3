"""estimate_fisher under torch.distributed (gloo, 2 CPU processes): each rank estimates on its
half of the data; sums and counts are all-reduced, so every rank holds the Fisher of all the
data, equal to a single-process estimate."""

import pytest
import torch
import torch.distributed as dist

import fastewc
from fastewc import reference as R

from models import dist_data, dist_model
from ranks import on_ranks

WORLD = 2


def _model():
    return dist_model()


def _data():
    return dist_data(11)  # an uneven split (6 / 5), so counts must be all-reduced, not assumed equal


def _shard(rank):
    x, y = _data()
    lo, hi = (0, 6) if rank == 0 else (6, 11)
    return [(x[i : min(i + 4, hi)], y[i : min(i + 4, hi)]) for i in range(lo, hi, 4)]


def _rank(rank, scratch):
    model = _model()
    return {(kind, method): fastewc.estimate_fisher(model, _shard(rank), kind=kind, method=method)
            for kind in ("empirical", "exact") for method in ("vmap", "loop")}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_distributed_allreduce_equals_single_process():
    ranks = on_ranks(_rank, WORLD)
    x, y = _data()
    model = _model()
    for kind in ("empirical", "exact"):
        ref = R.estimate_fisher(model, [(x, y)], kind=kind)
        for method in ("vmap", "loop"):
            for rank in range(WORLD):
                got = ranks[rank][kind, method]
                assert set(got) == set(ref)
                for name in ref:
                    torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-6, atol=1e-12,
                                               msg=f"rank {rank} {kind} {method} {name}")
