import pytest
import torch
import torch.nn as nn

from fastewc import FlatPacking


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
