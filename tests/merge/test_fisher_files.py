"""Fisher files (``save_fisher`` / ``load_fisher``): round trips, shards, metadata, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from fastewc import EWCInputError, EWCRegularizer, FisherDict, estimate_fisher, load_fisher, save_fisher

pytest.importorskip("safetensors")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def fisher_of(m):
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    return estimate_fisher(m, data)


def test_one_file_round_trip_with_metadata(tmp_path):
    m = model()
    f = fisher_of(m)
    (path,) = save_fisher(f, tmp_path / "f.safetensors", kind="empirical", num_samples=8, data="toy",
                          metadata={"task": "A", "seed": 0})
    got = load_fisher(path, model=m)
    assert isinstance(got, FisherDict) and set(got) == set(f)
    assert all(torch.equal(got[n], f[n]) for n in f)
    md = got.metadata
    assert (md["kind"], md["num_samples"], md["data"], md["user"]) == ("empirical", 8, "toy", {"task": "A", "seed": 0})
    assert md["shapes"] == {n: tuple(t.shape) for n, t in f.items()} and md["dtype"] == "float32"
    assert md["fastewc_version"] and len(md["fingerprint"]) == 64


def test_shards_and_index_give_the_same_tensors(tmp_path):
    m = model()
    f = fisher_of(m)
    paths = save_fisher(f, tmp_path / "sharded", max_shard_bytes=64)
    assert [p.name for p in paths][-1] == "fisher.safetensors.index.json"
    assert paths[0].name == f"fisher-00001-of-{len(paths) - 1:05d}.safetensors" and len(paths) > 2
    index = json.loads(paths[-1].read_text())
    assert set(index["weight_map"]) == set(f)
    for where in (tmp_path / "sharded", paths[-1]):
        got = load_fisher(where)
        assert all(torch.equal(got[n], f[n]) for n in f)
    one = save_fisher(f, tmp_path / "single")
    assert [p.name for p in one] == ["fisher.safetensors"]


def test_a_loaded_fisher_registers_as_a_dict(tmp_path):
    m = model()
    f = fisher_of(m)
    save_fisher(f, tmp_path / "f")
    anchors = {n: p.detach().clone() for n, p in m.named_parameters()}
    a, b = EWCRegularizer(10.0), EWCRegularizer(10.0)
    a.register_task(f, anchors)
    b.register_task(load_fisher(tmp_path / "f", model=m), anchors)
    with torch.no_grad():
        m[0].weight.add_(0.1)
    assert torch.equal(a(m), b(m))


def test_a_fisher_for_another_model_is_refused(tmp_path):
    save_fisher(fisher_of(model()), tmp_path / "f")
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(EWCInputError, match=r"this Fisher does not fit the model: 3 shapes that differ \(0.weight \[5, 6\]"):
        load_fisher(tmp_path / "f", model=other)
    renamed = nn.Sequential(nn.Sequential(nn.Linear(6, 5)), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(EWCInputError, match=r"2 names the model lacks \(0.weight, 0.bias\)"):
        load_fisher(tmp_path / "f", model=renamed)


def test_bad_files_and_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(EWCInputError, match="no such Fisher file"):
        load_fisher(tmp_path / "missing.safetensors")
    with pytest.raises(EWCInputError, match="holds no Fisher file"):
        load_fisher(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(EWCInputError, match="not a readable safetensors file"):
        load_fisher(junk)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(EWCInputError, match="not a fastewc Fisher file"):
        load_fisher(tmp_path / "plain.safetensors")
    with pytest.raises(EWCInputError, match=r"fisher\['w'\] must be a floating-point tensor"):
        save_fisher({"w": torch.ones(2, dtype=torch.long)}, tmp_path / "x.safetensors")
    with pytest.raises(EWCInputError, match="fisher must be a non-empty dict"):
        save_fisher({}, tmp_path / "x.safetensors")
    with pytest.raises(EWCInputError, match="metadata must be a dict JSON can hold"):
        save_fisher({"w": torch.ones(2)}, tmp_path / "x.safetensors", metadata={"f": object()})
    with pytest.raises(EWCInputError, match="the folder .*nowhere does not exist"):
        save_fisher({"w": torch.ones(2)}, tmp_path / "nowhere" / "x.safetensors")
    # each refusal comes before anything is written
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob("*.tmp"))


def test_an_edited_index_is_caught(tmp_path):
    paths = save_fisher({"a": torch.ones(3), "b": torch.ones(4)}, tmp_path / "s", max_shard_bytes=8)
    index = json.loads(paths[-1].read_text())
    index["metadata"]["shapes"] = json.dumps({"a": [3], "b": [5]})
    paths[-1].write_text(json.dumps(index))
    with pytest.raises(EWCInputError, match="do not match its fingerprint"):
        load_fisher(tmp_path / "s")
