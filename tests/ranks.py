"""Running a test body on several gloo processes, for the distributed tests."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def on_ranks(body, world: int, *args) -> list:
    """What ``body(rank, scratch, *args)`` returned on each of ``world`` gloo processes (one CPU
    thread each), in rank order. ``scratch``: a folder every rank sees, for files they exchange.
    ``body`` must be a module-level function (the processes are spawned)."""
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(_rank, args=(body, world, scratch, args), nprocs=world, join=True)
        return [torch.load(os.path.join(scratch, f"result.{r}"), weights_only=False) for r in range(world)]


def _rank(rank, body, world, scratch, args):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(scratch, 'init')}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(body(rank, scratch, *args), os.path.join(scratch, f"result.{rank}"))
        dist.barrier()  # no rank tears gloo's connections down while another is in a collective
    finally:
        dist.destroy_process_group()
