"""Fisher-weighted merging: the formula in float64, its limits, files against memory (same bits),
streaming over shards, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastewc import EWCInputError, fisher_merge, fisher_merge_files, save_fisher

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.norm = nn.BatchNorm1d(7)  # buffers: averaged; num_batches_tracked: copied
        self.b = nn.Linear(7, 3)
        self.b.bias.requires_grad_(False)  # frozen: no Fisher, averaged


def nets(k=3, dtype=torch.float64):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        n = Net().to(dtype)
        with torch.no_grad():
            n.norm.running_mean.uniform_()
        n.norm.num_batches_tracked += i
        out.append(n)
    return out


def fishers_of(models, seed=10, zero=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, m in enumerate(models):
        f = {n: torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for n, p in m.named_parameters()
             if p.requires_grad}
        if zero == i:
            f = {n: torch.zeros_like(t) for n, t in f.items()}
        out.append(f)
    return out


def test_formula_in_float64():
    ms = nets()
    fs = fishers_of(ms)
    w = [1.0, 2.0, 3.0]
    merged, report = fisher_merge(ms, fs, weights=w, floor=1e-6)
    l = [x / 6 for x in w]
    for n, p in ms[0].named_parameters():
        if n in fs[0]:
            c = [li * f[n].clamp_min(1e-6) for li, f in zip(l, fs)]
            want = sum(ci * dict(m.named_parameters())[n] for ci, m in zip(c, ms)) / sum(c)
        else:
            want = sum(li * dict(m.named_parameters())[n] for li, m in zip(l, ms))
        torch.testing.assert_close(merged[n], want.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(merged["norm.running_mean"], sum(li * m.norm.running_mean for li, m in zip(l, ms)),
                               rtol=1e-14, atol=0)
    assert merged["norm.num_batches_tracked"] == ms[0].norm.num_batches_tracked
    assert report.averaged == ["norm.running_mean", "norm.running_var", "b.bias"]
    assert report.copied == ["norm.num_batches_tracked"] and "a.weight" in report.fisher_merged
    assert "averaged 3 without a Fisher (norm.running_mean, norm.running_var, b.bias)" in str(report)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_are_left_as_they_were(dtype):
    # The merge scales and floors Fisher values in place in its scratch: never in the caller's
    # tensors, whatever their dtype (a float32 Fisher of float32 models needs no conversion).
    ms = nets(2, dtype)
    fs = fishers_of(ms)
    before = ([{k: v.clone() for k, v in m.state_dict().items()} for m in ms], [{k: v.clone() for k, v in f.items()} for f in fs])
    for normalize in (False, True):
        fisher_merge(ms, fs, normalize=normalize, weights=[1, 3])
    assert all(torch.equal(a, m.state_dict()[k]) for sd, m in zip(before[0], ms) for k, a in sd.items())
    assert all(torch.equal(a, f[k]) for sd, f in zip(before[1], fs) for k, a in sd.items())


def test_equal_fishers_give_the_weighted_average():
    ms = nets()
    f = fishers_of(ms[:1])[0]
    merged, _ = fisher_merge(ms, [f, f, f], weights=[1, 1, 2])
    for n, p in ms[0].named_parameters():
        want = (dict(ms[0].named_parameters())[n] + dict(ms[1].named_parameters())[n]
                + 2 * dict(ms[2].named_parameters())[n]) / 4
        torch.testing.assert_close(merged[n], want.detach(), rtol=1e-13, atol=1e-15)


def test_a_zero_fisher_gives_the_other_models_parameters_up_to_the_floor():
    ms = nets(2)
    fs = fishers_of(ms, zero=0)
    floor = 1e-8
    merged, _ = fisher_merge(ms, fs, floor=floor)
    for n, p in ms[1].named_parameters():
        if n in fs[1]:
            # weight of model 0 is floor / (floor + F_1) <= floor / min F_1
            bound = floor / float(fs[1][n].min()) * float((ms[0].state_dict()[n] - p.detach()).abs().max())
            assert float((merged[n] - p.detach()).abs().max()) <= bound * (1 + 1e-9)
    merged0, _ = fisher_merge(ms, fs, floor=0.0)  # no floor: the other model's (F theta / F, rounded once)
    for n, p in ms[1].named_parameters():
        if n in fs[1]:
            torch.testing.assert_close(merged0[n], p.detach(), rtol=4e-16, atol=0)


def test_normalize_makes_fisher_scale_irrelevant():
    ms = nets(2)
    fs = fishers_of(ms)
    scaled = [fs[0], {n: 1000.0 * t for n, t in fs[1].items()}]
    a, _ = fisher_merge(ms, fs, normalize=True, floor=0.0)
    b, _ = fisher_merge(ms, scaled, normalize=True, floor=0.0)
    for n in fs[0]:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=0)


def _write_checkpoint(model, folder, shard_names=None):
    folder.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shard_names is None:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    import json

    weight_map = {}
    for k, names in enumerate(shard_names, 1):
        name = f"model-{k:05d}-of-{len(shard_names):05d}.safetensors"
        save_file({n: sd[n] for n in names}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_files_and_memory_give_the_same_bits(tmp_path, dtype, monkeypatch):
    import fastewc.merge as M

    monkeypatch.setattr(M, "STREAM_CHUNK", 11)  # slices that cut rows: the streaming path, not one read
    ms = nets(3, dtype)
    fs = [{n: t.float() for n, t in f.items()} for f in fishers_of(ms)]
    names = list(ms[0].state_dict())
    paths = [_write_checkpoint(ms[0], tmp_path / "m0"),
             _write_checkpoint(ms[1], tmp_path / "m1", [names[:3], names[3:]]),
             _write_checkpoint(ms[2], tmp_path / "m2" / "x")]
    paths[2] = paths[2] / "model.safetensors"  # a single file given directly
    fpaths = []
    for i, f in enumerate(fs):
        save_fisher(f, tmp_path / f"f{i}", max_shard_bytes=100 if i == 1 else 2**30)
        fpaths.append(tmp_path / f"f{i}")
    report = fisher_merge_files(paths, fpaths, tmp_path / "out", weights=[1, 2, 3], max_shard_bytes=64)
    assert len(report.files) > 2 and report.files[-1].endswith("model.safetensors.index.json")
    merged, mem_report = fisher_merge(ms, fs, weights=[1, 2, 3])
    from safetensors import safe_open

    got = {}
    for f in report.files[:-1]:
        with safe_open(f, framework="pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(got) == set(merged)
    for n in merged:
        assert got[n].dtype == merged[n].dtype and torch.equal(got[n], merged[n]), n
    for kind in ("fisher_merged", "averaged", "copied"):
        assert sorted(getattr(report, kind)) == sorted(getattr(mem_report, kind))
    # every shard holds at most max_shard_bytes of tensors, unless one tensor alone is larger
    for f in report.files[:-1]:
        with safe_open(f, framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys()]
        assert sum(sizes) <= 64 or len(sizes) == 1, (f, sizes)


def test_refusals(tmp_path):
    ms = nets(2)
    fs = fishers_of(ms)
    with pytest.raises(EWCInputError, match="at least 2 models"):
        fisher_merge(ms[:1], fs[:1])
    with pytest.raises(EWCInputError, match="one Fisher per model"):
        fisher_merge(ms, fs[:1])
    with pytest.raises(EWCInputError, match=r"weights must be 2 finite numbers >= 0 with a positive sum"):
        fisher_merge(ms, fs, weights=[1, -1])
    with pytest.raises(EWCInputError, match="floor must be a finite number >= 0"):
        fisher_merge(ms, fs, floor=float("nan"))
    other = nn.Sequential(nn.Linear(5, 7))
    with pytest.raises(EWCInputError, match=r"models\[1\] does not have the entries and shapes of models\[0\]"):
        fisher_merge([ms[0], other], fs)
    partial = [fs[0], {n: t for n, t in fs[1].items() if n != "a.weight"}]
    with pytest.raises(EWCInputError, match=r"Fisher in some models only: \['a.weight'\]"):
        fisher_merge(ms, partial)
    with pytest.raises(EWCInputError, match=r"fishers\[0\] names entries the models lack: \['zzz'\]"):
        fisher_merge(ms, [{**fs[0], "zzz": torch.ones(1)}, fs[1]])
    with pytest.raises(EWCInputError, match=r"fishers\[1\]\['a.bias'\] has shape \[3\]"):
        fisher_merge(ms, [fs[0], {**fs[1], "a.bias": torch.ones(3)}])
    save_fisher({n: t.float() for n, t in fs[0].items()}, tmp_path / "f0")
    wrong = {n: torch.ones(2) if n == "a.bias" else t.float() for n, t in fs[1].items()}
    save_fisher(wrong, tmp_path / "f1")
    p0, p1 = _write_checkpoint(ms[0], tmp_path / "m0"), _write_checkpoint(ms[1], tmp_path / "m1")
    with pytest.raises(EWCInputError, match=r"f1: this Fisher does not fit the models \('a.bias': \[2\] vs \[7\]\)"):
        fisher_merge_files([p0, p1], [tmp_path / "f0", tmp_path / "f1"], tmp_path / "out")
    with pytest.raises(EWCInputError, match="no safetensors checkpoint at"):
        fisher_merge_files([p0, tmp_path / "nothing"], [tmp_path / "f0", tmp_path / "f0"], tmp_path / "out")


def test_merging_again_into_a_folder_leaves_only_the_new_layout(tmp_path):
    # A sharded merge after a single-file one (and back): the other layout's files would be
    # loaded instead of the new result (transformers prefers model.safetensors).
    ms = nets(2, torch.float32)
    fs = [{n: t.float() for n, t in f.items()} for f in fishers_of(ms)]
    paths = [_write_checkpoint(ms[i], tmp_path / f"m{i}") for i in range(2)]
    for i, f in enumerate(fs):
        save_fisher(f, tmp_path / f"f{i}")
    fpaths = [tmp_path / "f0", tmp_path / "f1"]
    out = tmp_path / "out"
    fisher_merge_files(paths, fpaths, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    sharded = fisher_merge_files(paths, fpaths, out, max_shard_bytes=64)
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(f).name for f in sharded.files)
    assert "model.safetensors" not in {p.name for p in out.iterdir()}
    fisher_merge_files(paths, fpaths, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
