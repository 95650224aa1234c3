"""PenaltyStore on plain tensors, without a model: merging (separate, online), growing the
layout, re-laying it out, and the state dict."""

import math

import pytest
import torch

from fastewc import EWCInputError
from fastewc.penalty.packing import FlatPacking
from fastewc.penalty.store import PenaltyStore, buffer_dtype

CPU = torch.device("cpu")


def task(shapes, gen, dtype=torch.float64):
    f = {n: torch.rand(s, generator=gen, dtype=dtype) for n, s in shapes.items()}
    a = {n: torch.randn(s, generator=gen, dtype=dtype) for n, s in shapes.items()}
    return f, a


def specs(shapes, dtype=torch.float64):
    return {n: (torch.Size(s), dtype, CPU) for n, s in shapes.items()}


def quadratic(store, theta):
    """sum_i A_i (theta_i - m_i)^2 + c from the store's views."""
    A, m = store.importance_views(), store.anchor_views()
    return sum(float((A[n].double() * (theta[n] - m[n].double()) ** 2).sum()) + store.constant.get(n, 0.0)
               for n in A)


def test_separate_merge_equals_the_sum_over_tasks():
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (3, 5), "b": (7,), "empty": (0,), "one": (1,)}
    store = PenaltyStore("separate", 1.0, torch.float64)
    tasks = [task(shapes, gen) for _ in range(4)]
    scales = {"w": 2.0, "b": 1.0, "empty": 1.0, "one": 0.5}
    for f, a in tasks:
        store = store.merge(f, a, scales, specs(shapes))
    theta = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    want = sum(scales[n] * float((f[n] * (theta[n] - a[n]) ** 2).sum()) for f, a in tasks for n in shapes)
    assert math.isclose(quadratic(store, theta), want, rel_tol=1e-12)
    assert store.tasks_seen == 4
    # the gradient A (theta - m) equals sum_t s F_t (theta - theta*_t)
    A, m = store.importance_views(), store.anchor_views()
    for n in shapes:
        want_g = sum(scales[n] * f[n] * (theta[n] - a[n]) for f, a in tasks)
        torch.testing.assert_close(A[n] * (theta[n] - m[n]), want_g, rtol=1e-12, atol=1e-14)


def test_online_merge_decays_and_keeps_the_latest_anchor():
    gen = torch.Generator().manual_seed(1)
    store = PenaltyStore("online", 0.5, torch.float64)
    f1, a1 = task({"x": (4,), "y": (2,)}, gen)
    f2, a2 = task({"x": (4,)}, gen)
    store = store.merge(f1, a1, {"x": 1.0, "y": 1.0}, specs({"x": (4,), "y": (2,)}))
    store = store.merge(f2, a2, {"x": 1.0}, specs({"x": (4,)}))
    A, m = store.importance_views(), store.anchor_views()
    torch.testing.assert_close(A["x"], 0.5 * f1["x"] + f2["x"])
    torch.testing.assert_close(m["x"], a2["x"])
    torch.testing.assert_close(A["y"], 0.5 * f1["y"])  # absent from task 2: decays, keeps its anchor
    torch.testing.assert_close(m["y"], a1["y"])
    assert store.constant == {"x": 0.0, "y": 0.0}


def test_merge_grows_the_layout_and_leaves_the_old_store_alone():
    gen = torch.Generator().manual_seed(2)
    store = PenaltyStore("separate", 1.0, None)
    f, a = task({"a": (5,)}, gen, torch.float32)
    s1 = store.merge(f, a, {"a": 1.0}, specs({"a": (5,)}, torch.float32))
    f2, a2 = task({"b": (3, 3)}, gen, torch.float64)
    s2 = s1.merge(f2, a2, {"b": 1.0}, specs({"b": (3, 3)}, torch.float64))
    assert store.packing is None and s1.names == ["a"] and s2.names == ["a", "b"]
    # None storage: one buffer per parameter dtype, in that dtype
    assert [b.dtype for b in s2.importance] == [torch.float32, torch.float64]
    assert s2.param_dtypes == {"a": torch.float32, "b": torch.float64}
    assert torch.equal(s2.importance_views()["a"], s1.importance_views()["a"])
    assert s1.importance[0].data_ptr() != s2.importance[0].data_ptr()  # grown: new buffers
    assert torch.equal(s1.importance_views()["a"], f["a"]) and s1.names == ["a"]


def test_state_round_trip_and_relayout():
    gen = torch.Generator().manual_seed(3)
    shapes = {"p": (6,), "q": (2, 3)}
    store = PenaltyStore("separate", 1.0, torch.bfloat16)
    for _ in range(2):
        store = store.merge(*task(shapes, gen), {"p": 1.0, "q": 3.0}, specs(shapes, torch.float32))
    back = PenaltyStore.from_state(store.to_state())
    assert back.names == store.names and back.storage_dtype == torch.bfloat16 and back.tasks_seen == 2
    assert back.constant == store.constant and back.param_dtypes == store.param_dtypes
    for n in shapes:
        assert torch.equal(back.importance_views()[n], store.importance_views()[n])
    # re-laid out under other names (a tied alias resolved to its canonical name)
    laid = FlatPacking([("p", (6,), torch.float32, CPU), ("r", (2, 3), torch.float32, CPU)])
    moved = store.relaid(laid, {"p": "p", "q": "r"})
    assert moved.names == ["p", "r"] and moved.constant["r"] == store.constant["q"]
    assert torch.equal(moved.anchor_views()["r"], store.anchor_views()["q"])
    assert store.names == ["p", "q"]  # unchanged


def test_buffer_dtype_rule():
    assert buffer_dtype(None, torch.float64) == torch.float64
    assert buffer_dtype(None, torch.float32) == torch.float32
    assert buffer_dtype(None, torch.bfloat16) == torch.float32
    assert buffer_dtype(torch.float16, torch.float64) == torch.float16


@pytest.mark.parametrize("change,match", [
    (dict(names=["p", "zz"]), "importance/anchor/constant names do not match 'names'"),
    (dict(storage_dtype="int8"), r"storage_dtype torch.int8 is not one of"),
    (dict(storage_dtype="nonsense"), r"unknown storage_dtype 'nonsense'"),
    (dict(mode="sideways"), r"unknown mode 'sideways'"),
    (dict(constant={"p": float("nan")}), r"non-finite constant for 'p'"),
    (dict(dtypes=["float32"]), r"1 dtypes for 2 names"),
    (dict(constant=[1.0]), "must be dicts keyed by parameter name"),
])
def test_from_state_refuses_bad_entries(change, match):
    gen = torch.Generator().manual_seed(4)
    shapes = {"p": (6,), "q": (2,)}
    state = PenaltyStore("separate", 1.0, None).merge(*task(shapes, gen), {"p": 1.0, "q": 1.0},
                                                       specs(shapes)).to_state()
    with pytest.raises(EWCInputError, match=match):
        PenaltyStore.from_state({**state, **change})


def test_a_store_is_never_half_built():
    with pytest.raises(ValueError, match="expected 1 importance and anchor buffers, got 0 and 0"):
        PenaltyStore(packing=FlatPacking([("a", (2,), torch.float32, CPU)]))
    with pytest.raises(EWCInputError, match="gamma=0.5 only applies to mode='online'"):
        PenaltyStore("separate", 0.5)
