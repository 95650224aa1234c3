"""Long runs do not grow: training steps with the penalty (in the loss, and through
``accumulate_grad_``) and repeated Fisher estimates on the same model keep the process's resident
memory, its live tensors and the regularizer's cached plans where they were after the first steps.

Resident memory is VmRSS from /proc/self/status, read after ``gc.collect()`` and glibc's
``malloc_trim(0)`` (glibc keeps freed blocks cached, which makes raw RSS noisy), and compared
with a reading taken after warm-up steps. The counts (live tensors, forward/backward hooks on the
model, the regularizer's binding and cache entries) are exact. The slow test runs 10,000 steps of
each kind and 20 estimates of each engine; the default-run version does the same in a few hundred
steps, with the memory bound scaled to its length (and a floor for the page-level noise of RSS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer, estimate_fisher

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/status")

MB = 2**20
# Resident growth allowed over the slow run's 10,000 steps / 20 estimates, and the floor of the
# scaled bound in the short run (RSS moves by whole pages and glibc's arenas after a trim).
LONG_BOUND = 10 * MB
NOISE_FLOOR = 2 * MB


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a machine shared with other jobs, every parallel region of a small
    step can wait for a second thread that another process has descheduled, which turns seconds
    into many minutes. The figures here are memory, which the thread count does not change."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


def _libc():
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


_LIBC = _libc()


def resident() -> int:
    """VmRSS in bytes after a collection and a heap trim."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def cached(ewc: EWCRegularizer) -> tuple:
    """The regularizer's binding (identity) and the size of everything cached on its plans."""
    b = ewc._binding
    assert b is not None
    sizes = [len(v) if isinstance(v, (list, tuple, dict)) else 1 for plan in b.plans for v in plan.cache.values()]
    return id(b), len(b.plans), len(sizes), sum(sizes), len(ewc._selection._cache)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    ewc = EWCRegularizer(100.0)
    for seed in (1, 2):  # two tasks: the merged (separate-mode) state, not a plain copy
        torch.manual_seed(seed)
        fisher = estimate_fisher(model, data)
        ewc.register_task(fisher, {n: p.detach().clone() for n, p in model.named_parameters()}, model=model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, data, ewc, opt


def _step(model, ewc, opt, x, y, in_loss: bool) -> None:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if in_loss:
        (loss + ewc(model)).backward()
    else:
        loss.backward()
        ewc.accumulate_grad_(model)
    opt.step()


def soak_training(steps: int, warmup: int = 200) -> dict:
    """``steps`` steps with the penalty in the loss and ``steps`` with ``accumulate_grad_``
    (alternating), after ``warmup`` of each; growth from the reading after warm-up."""
    model, data, ewc, opt = _problem()
    for i in range(2 * warmup):
        x, y = data[i % len(data)]
        _step(model, ewc, opt, x, y, in_loss=i % 2 == 0)
    opt.zero_grad(set_to_none=True)
    rss0, tensors0, cache0 = resident(), live_tensors(), cached(ewc)
    readings = []
    for i in range(2 * steps):
        x, y = data[i % len(data)]
        _step(model, ewc, opt, x, y, in_loss=i % 2 == 0)
        if (i + 1) % max(2, (2 * steps) // 5) == 0:
            readings.append(resident() - rss0)
    opt.zero_grad(set_to_none=True)
    rss1, tensors1, cache1 = resident(), live_tensors(), cached(ewc)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return {"steps": steps, "growth": rss1 - rss0, "readings": readings, "tensors": (tensors0, tensors1),
            "cache": (cache0, cache1), "rss0": rss0}


def soak_fisher(calls: int, warmup: int = 2) -> dict:
    """``calls`` estimates with the rules engine and ``calls`` with vmap on the same model."""
    model, data, _, _ = _problem()
    kw = {"max_memory": 16 * MB}

    def both():
        return estimate_fisher(model, data, method="rules", **kw), estimate_fisher(model, data, method="vmap", **kw)

    for _ in range(warmup):
        first = both()
    rss0, tensors0, hooks0 = resident(), live_tensors(), hooks(model)
    readings = []
    for i in range(calls):
        got = both()
        readings.append(resident() - rss0)
    del got
    rss1, tensors1, hooks1 = resident(), live_tensors(), hooks(model)
    for a, b in zip(first, both()):  # the model did not change: neither did the estimate
        for n in a:
            torch.testing.assert_close(a[n], b[n])
    return {"calls": calls, "growth": rss1 - rss0, "readings": readings, "tensors": (tensors0, tensors1),
            "hooks": (hooks0, hooks1)}


def _bound(n: int, full: int) -> int:
    return max(NOISE_FLOOR, LONG_BOUND * n // full)


def _check_training(r: dict, bound: int) -> None:
    assert r["cache"][0] == r["cache"][1], f"cached plans changed: {r['cache']}"
    assert r["tensors"][1] <= r["tensors"][0], f"live tensors grew: {r['tensors']}"
    assert r["growth"] < bound, (f"resident memory grew by {r['growth'] / MB:.2f} MB over {r['steps']} steps of each "
                                 f"kind (bound {bound / MB:.2f} MB); readings (MB): "
                                 f"{[round(x / MB, 2) for x in r['readings']]}")


def _check_fisher(r: dict, bound: int) -> None:
    assert r["hooks"][0] == r["hooks"][1] == 0, f"hooks left on the model: {r['hooks']}"
    assert r["tensors"][1] <= r["tensors"][0], f"live tensors grew: {r['tensors']}"
    assert r["growth"] < bound, (f"resident memory grew by {r['growth'] / MB:.2f} MB over {r['calls']} estimates of "
                                 f"each engine (bound {bound / MB:.2f} MB); readings (MB): "
                                 f"{[round(x / MB, 2) for x in r['readings']]}")


def _report(what: str, r: dict) -> None:
    print(f"\n{what}: resident growth {r['growth'] / MB:+.2f} MB; readings (MB) "
          f"{[round(x / MB, 2) for x in r['readings']]}; live tensors {r['tensors']}")


def test_training_steps_do_not_grow_short():
    r = soak_training(300, warmup=100)
    _check_training(r, _bound(300, 10_000))


def test_fisher_estimates_do_not_grow_short():
    r = soak_fisher(5)
    _check_fisher(r, _bound(5, 20))


@pytest.mark.slow
def test_training_steps_do_not_grow_10000():
    r = soak_training(10_000)
    _report("10,000 steps in the loss + 10,000 with accumulate_grad_", r)
    _check_training(r, LONG_BOUND)


@pytest.mark.slow
def test_fisher_estimates_do_not_grow_20():
    r = soak_fisher(20)
    _report("20 estimates with rules + 20 with vmap", r)
    _check_fisher(r, LONG_BOUND)


def test_a_leak_would_be_seen(monkeypatch):
    """The measurement sees a leak of one small tensor per step (the accumulate_grad_ value kept)."""
    kept = []
    real = EWCRegularizer.accumulate_grad_

    def leaky(self, model):
        out = real(self, model)
        kept.append(torch.ones(64 * 1024))  # 256 KB per step: 37.5 MB over 150 steps
        return out

    monkeypatch.setattr(EWCRegularizer, "accumulate_grad_", leaky)
    r = soak_training(150, warmup=20)
    with pytest.raises(AssertionError, match="live tensors grew"):
        _check_training(r, _bound(150, 10_000))
    assert r["growth"] > 30 * MB
