"""The penalty under DistributedDataParallel (gloo, 2 CPU processes) equals a single-process run."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer

from models import dist_data, dist_model

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


def _single(style):
    model, (x, y) = _model(), _data()
    ewc = _ewc(model)
    if style == "loss":
        (F.cross_entropy(model(x), y) + ewc(model)).backward()
    else:
        F.cross_entropy(model(x), y).backward()
        ewc.accumulate_grad_(model)
    return [p.grad for p in model.parameters()]


def _worker(rank, init_file, style, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model()
        ewc = _ewc(model)  # registered with the unwrapped names
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _data()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        if style == "loss":
            (F.cross_entropy(ddp(xs), ys) + ewc(ddp)).backward()
        else:
            F.cross_entropy(ddp(xs), ys).backward()
            ewc.accumulate_grad_(ddp)
        torch.save([p.grad for p in model.parameters()], f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo's connections down while another is in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("style", ["loss", "accumulate"])
def test_ddp_gradients_equal_single_process(style, tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    out = os.path.join(tmp_path, "grads")
    mp.spawn(_worker, args=(init_file, style, out), nprocs=WORLD, join=True)
    want = _single(style)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
