"""Group plans for the penalty backends' own tests (Triton, fused CPU): a ``GroupPlan`` over fresh
parameters, the float64 reference of every backend operation, the tolerances to compare with,
and the test settings of the fused CPU backend."""

import torch
import torch.nn as nn

import fastewc.penalty.backends as backends
from fastewc.penalty.packing import FlatPacking
from fastewc.penalty.backends import GroupPlan

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Relative tolerance of one gradient element written in this dtype: float32 arithmetic rounds
# three times (theta - m, A * d, * lam), i.e. up to ~4 float32 ulps; half-precision outputs round
# once more, at most half a unit in their last place (the bounds below are one unit).
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
SHAPES = [(5, 7), (0,), (1,), (33,), (3, 4, 5), (16,), (2, 0, 3)]


def make_plan(shapes, param_dtype, storage, *, seed=0, params=None):
    """A GroupPlan over fresh parameters of ``shapes`` (A >= 0 with some zeros, m near theta), or
    over ``params``. Other parameters need another plan, as the binding makes one: a backend keeps
    what it derives from a plan's parameters for the plan's life (see ``GroupPlan``)."""
    g = torch.Generator().manual_seed(seed)
    if params is None:
        params = [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(param_dtype)) for s in shapes]
    packing = FlatPacking.from_tensors((f"p{i}", p) for i, p in enumerate(params))
    if not params:
        e = torch.empty(0, dtype=storage)
        return GroupPlan(torch.device("cpu"), param_dtype, torch.float32, e, e, (), (), [], [], params=[])
    a = {f"p{i}": torch.rand(p.shape, generator=g, dtype=torch.float64) * (torch.rand(p.shape, generator=g) > 0.1)
         for i, p in enumerate(params)}
    m = {f"p{i}": p.detach().double() + torch.randn(p.shape, generator=g, dtype=torch.float64)
         for i, p in enumerate(params)}
    (a_flat,), (m_flat,) = packing.pack(a, storage), packing.pack(m, storage)
    compute = torch.float64 if torch.float64 in (param_dtype, storage) else torch.float32
    names = packing.names
    return GroupPlan(
        device=torch.device("cpu"), param_dtype=param_dtype, compute_dtype=compute,
        importance=a_flat, anchor=m_flat, names=tuple(names), offsets=tuple(e.offset for e in packing.entries),
        importance_views=[packing.view([a_flat], n) for n in names],
        anchor_views=[packing.view([m_flat], n) for n in names], params=list(params))


def reference(plan, lam):
    """float64 ``(sum A (theta - m)^2, [lam A (theta - m)])`` from the stored (rounded) A and m."""
    total, grads = torch.zeros((), dtype=torch.float64), []
    for p, a, m in zip(plan.params, plan.importance_views, plan.anchor_views):
        d = p.detach().double() - m.double()
        u = a.double() * d
        total += (u * d).sum()
        grads.append(lam * u)
    return total, grads


def value_of(be, plan, v):
    """A backend's sum ``v`` as a float64 0-dim tensor, after checking its type: a float only from
    a backend with ``host_sums``, else a 0-dim tensor in the plan's compute dtype."""
    if type(v) is float:
        assert getattr(be, "host_sums", False), f"{type(be).__name__} returned a float"
        return torch.tensor(v, dtype=torch.float64)
    assert isinstance(v, torch.Tensor) and v.shape == () and v.dtype == plan.compute_dtype, v
    return v.double()


def value_rtol(plan):
    return 1e-12 if plan.compute_dtype == torch.float64 else 1e-5


def assert_grads(got, want, dtype, plan):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == w.shape, (i, g.dtype, g.shape)
        assert not g.isnan().any(), f"tensor {i}: unwritten (NaN) elements"
        scale = float(w.abs().max()) if w.numel() else 1.0
        # atol: one unit of the tensor's largest element (absorbs cancellation in grad + lam*u)
        torch.testing.assert_close(g.double(), w, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * scale,
                                   msg=lambda s: f"tensor {i} {tuple(w.shape)}: {s}")


def split_cpu(threads: int = 3, poison: bool = True):
    """A fused CPU backend that splits even tiny groups among ``threads`` threads, at shares that
    cut through parameters, and (``poison``) fills the gradients it allocates with NaN first (so
    an element it fails to write shows up)."""
    return backends.CpuBackend(threads=threads, poison=poison, parallel_from=0, share_align=16)


def split_cpu_backend(monkeypatch, threads: int = 3) -> None:
    """Make ``backend="cpu"`` run ``split_cpu(threads)`` for the rest of the test."""
    monkeypatch.setitem(backends.INSTANCES, "cpu", split_cpu(threads))


def use_torch_backend(monkeypatch, **settings) -> None:
    """Make ``backend="torch"`` run ``TorchBackend(**settings)`` for the rest of the test."""
    monkeypatch.setitem(backends.INSTANCES, "torch", backends.TorchBackend(**settings))


def check_all_ops(be, plan, lam=0.7):
    want_v, want_g = reference(plan, lam)
    rtol = value_rtol(plan)
    v = be.penalty_sum(plan)
    torch.testing.assert_close(value_of(be, plan, v), want_v, rtol=rtol, atol=0)

    v2, g2 = be.penalty_sum_and_grads(plan, lam)
    torch.testing.assert_close(value_of(be, plan, v2), want_v, rtol=rtol, atol=0)
    assert_grads(g2, want_g, plan.param_dtype, plan)

    g3 = be.penalty_grads(plan, torch.tensor(lam * 3.0, dtype=plan.compute_dtype))
    assert_grads(g3, [3.0 * w for w in want_g], plan.param_dtype, plan)

    # Fused update: some grads exist (added to), some are None (allocated, written).
    before = {}
    for i, p in enumerate(plan.params):
        p.grad = None
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, dtype=torch.float64).to(plan.param_dtype)
            before[i] = p.grad.clone()
    v4 = be.accumulate_grad_(plan, lam)
    torch.testing.assert_close(value_of(be, plan, v4), want_v, rtol=rtol, atol=0)
    expect = [w + before[i].double() if i in before else w for i, w in enumerate(want_g)]
    assert_grads([p.grad for p in plan.params], expect, plan.param_dtype, plan)
