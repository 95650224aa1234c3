import sys

import pytest
import torch
import torch.nn as nn

from fastewc.penalty.packing import FlatPacking


def test_groups_offsets_and_round_trip():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].double()
    p = FlatPacking.from_tensors(m.named_parameters())
    assert [(g.dtype, g.entries, g.numel) for g in p.groups] == [
        (torch.float32, (0, 1), 20), (torch.float64, (2, 3), 18)]
    assert [e.offset for e in p.entries] == [0, 16, 0, 16]  # offsets aligned to 16 elements
    assert p.numel == 16 + 10  # parameter elements, gaps not counted
    src = {n: torch.randn(t.shape) for n, t in m.named_parameters()}
    flats = p.pack(src, torch.float32)
    assert [f.shape for f in flats] == [(20,), (18,)]
    assert torch.all(flats[0][12:16] == 0) and torch.all(flats[1][8:16] == 0)  # gaps zeroed
    out = p.unpack(flats)
    assert list(out) == list(src) and all(torch.equal(out[n], src[n]) for n in src)
    out["0.bias"].fill_(7.0)  # views, not copies
    assert torch.all(flats[0][16:20] == 7.0)


def test_pack_with_one_dtype_per_group():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].double()
    p = FlatPacking.from_tensors(m.named_parameters())
    src = {n: torch.randn(t.shape, dtype=torch.float64) for n, t in m.named_parameters()}
    flats = p.pack(src, [torch.float32, torch.float64])
    assert [f.dtype for f in flats] == [torch.float32, torch.float64]
    assert torch.equal(p.unpack(flats)["1.weight"], src["1.weight"])  # float64 group kept exactly
    assert [f.dtype for f in p.empty([torch.bfloat16, torch.float32])] == [torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="1 dtypes given for 2 groups"):
        p.pack(src, [torch.float32])


def test_empty_and_duplicate():
    p = FlatPacking([])
    assert p.numel == 0 and p.pack({}, torch.float32) == []
    with pytest.raises(ValueError, match="duplicate"):
        FlatPacking([("a", (1,), torch.float32, "cpu"), ("a", (2,), torch.float32, "cpu")])


@pytest.fixture
def dirty_empty(monkeypatch):
    """``FlatPacking.empty`` returns NaN-filled buffers, as reused memory may hold anything."""
    real = FlatPacking.empty
    monkeypatch.setattr(FlatPacking, "empty", lambda self, dtype: [f.fill_(float("nan")) for f in real(self, dtype)])


def _gaps(packing, flats):
    """The elements of ``flats`` no entry covers."""
    out = []
    for g, flat in zip(packing.groups, flats):
        covered = torch.zeros(g.numel, dtype=torch.bool)
        for i in g.entries:
            e = packing.entries[i]
            covered[e.offset:e.offset + e.numel] = True
        out.append(flat[~covered])
    return torch.cat(out)


def test_gaps_are_zeroed_without_zeroing_whole_buffers(dirty_empty):
    m = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 7), nn.Linear(7, 1))
    p = FlatPacking.from_tensors(m.named_parameters())
    gapped = p.empty_with_zero_gaps(torch.float32)
    gaps = _gaps(p, gapped)
    assert gaps.numel() > 10 and torch.equal(gaps, torch.zeros_like(gaps))
    flats = p.pack(dict(m.named_parameters()), torch.bfloat16)
    assert not any(f.isnan().any() for f in flats)  # every entry written, every gap zeroed


def test_growing_registrations_leave_no_stale_memory(dirty_empty):
    # New names grow the layout into fresh buffers: every entry must be written and every gap
    # zero (the PyTorch backend's runs read across gaps, the value must not see stale memory).
    from fastewc import EWCRegularizer
    from fastewc import reference as R

    m = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 7), nn.Linear(7, 1))
    names = [n for n, _ in m.named_parameters()]
    ewc, ref = EWCRegularizer(2.0, backend="torch"), R.ReferenceEWC(2.0)
    for chosen in (names[:2], names[1:5], names):  # each task adds names
        fisher = {n: torch.rand_like(p) for n, p in m.named_parameters() if n in chosen}
        anchors = {n: p.detach() + torch.randn_like(p) for n, p in m.named_parameters() if n in chosen}
        ewc.register_task(fisher, anchors)
        ref.register_task(fisher, anchors)
        store = ewc._store
        for flats in (store.importance, store.anchor):
            gaps = _gaps(store.packing, flats)
            assert torch.equal(gaps, torch.zeros_like(gaps))
            assert not any(f.isnan().any() for f in flats)
        torch.testing.assert_close(ewc(m), ref(m).float(), rtol=1e-5, atol=1e-6)


def _thp_mode():
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def test_fresh_large_buffers_are_advised_huge_pages_and_keep_their_values():
    from fastewc._utils import HUGE_PAGES_FROM, advise_huge_pages

    big = torch.empty(HUGE_PAGES_FROM // 4 + (4 << 20), dtype=torch.float32)
    advised = advise_huge_pages(big)
    assert advised == (sys.platform.startswith("linux") and _thp_mode() in ("always", "madvise"))
    big.copy_(torch.arange(big.numel(), dtype=torch.float32))
    assert big[-1] == big.numel() - 1 and big[12345] == 12345
    assert not advise_huge_pages(torch.empty(1000))            # small: not worth a system call
    assert not advise_huge_pages(big.view(-1, 2)[:, 0])       # not contiguous
    assert not advise_huge_pages(torch.empty(HUGE_PAGES_FROM, dtype=torch.uint8, device="meta"))  # not on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shapes", [
    [(5, 7), (0,), (1,), (33,), (3, 4, 5), (2, 0, 3), (16,)],  # gaps, empties between and at the start
    [(0, 4), (3,)],
    [(8,), (4, 2)],                                               # no gaps at all
    [],
])
def test_plan_views_of_a_flat_buffer_match_slicing(shapes, dtype):
    # GroupPlan.views_of makes every view in one C++ call over cached templates; the slicing
    # loop is its twin (and what runs where torch lacks the call).
    from plans import make_plan
    import fastewc.penalty.backends.base as base

    plan = make_plan(shapes, dtype, dtype)
    flat = torch.arange(plan.importance.numel(), dtype=torch.float64).to(dtype)
    want = [flat[o : o + v.numel()].view(v.shape) for o, v in zip(plan.offsets, plan.importance_views)]
    for _ in range(2):  # built, then from the cache
        got = plan.views_of(flat)
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == dtype and torch.equal(g, w)
            if w.numel():
                assert g.data_ptr() == w.data_ptr() and g.stride() == w.stride() and g._base is flat
    if any(o != sum(v.numel() for v in plan.importance_views[:i]) for i, o in enumerate(plan.offsets)
           if plan.importance_views[i].numel()):
        assert plan.cache["flat-views"][1] is not None  # gaps were skipped over
    original = base._UNFLATTEN
    try:
        base._UNFLATTEN = None
        assert all(torch.equal(g, w) and g.shape == w.shape for g, w in zip(plan.views_of(flat), want))
    finally:
        base._UNFLATTEN = original
