"""The penalty on an FSDP2 model (fully_shard, gloo, 2 CPU processes) equals the unsharded run.

One spawn runs every scenario (a spawn costs seconds); each rank writes what it saw and the tests
compare it with a single-process run of the same model, Fisher and anchors in float64. The model
has odd sizes: a weight with 3 rows splits 2/1 over the ranks, and one with a single row leaves
rank 1 an empty piece.
"""

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCRegularizer
from fastewc.errors import ModelMismatchError

from ranks import on_ranks

WORLD = 2
LAM = 30.0

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not dist.is_available():
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3), nn.Tanh(), nn.Linear(3, 4), nn.Tanh(),
                         nn.Linear(4, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def _tasks(model):
    """Two tasks' full (unsharded) Fisher and anchors, the same on every rank."""
    g = torch.Generator().manual_seed(2)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = []
    for shift in (0.2, -0.3):
        fisher = {n: torch.rand(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
        anchor = {n: torch.randn(s, generator=g, dtype=torch.float64) * 0.1 + shift for n, s in shapes.items()}
        out.append((fisher, anchor))
    return out


def _loss(model, x, y):
    return F.mse_loss(model(x), y)


def _train_step(model, ewc, style):
    """One step on ``_data()`` with the penalty in the loss or added by accumulate_grad_; its value.
    Every rank uses the same batch: FSDP's mean of equal gradients is the single-process gradient."""
    x, y = _data()
    if style == "loss":
        value = ewc(model)
        (_loss(model, x, y) + value).backward()
    else:
        _loss(model, x, y).backward()
        value = ewc.accumulate_grad_(model)
    return float(value.detach())


def _single(style):
    """Value and gradients of one step, unsharded and in one process."""
    model = _model()
    ewc = EWCRegularizer(LAM)
    for fisher, anchor in _tasks(model):
        ewc.register_task(fisher, anchor)
    value = _train_step(model, ewc, style)
    return value, {n: p.grad.clone() for n, p in model.named_parameters()}


def _sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _sharded_step(mesh, backend, style, when):
    """``_single``'s step on a model sharded over ``mesh``: what this rank saw."""
    model = _sharded_model(mesh)
    ewc = EWCRegularizer(LAM, backend=backend)
    for fisher, anchor in _tasks(_model()):
        if when == "with_model":  # split at registration
            ewc.register_task(fisher, anchor, model=model)
        else:  # stored full, split at the first step
            ewc.register_task(fisher, anchor)
    value = _train_step(model, ewc, style)
    return {"value": value, "grads": {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()},
            "stored": ewc._packing.numel, "local": sum(p.to_local().numel() for p in model.parameters()),
            "backends": ewc.active_backends, "placements": [repr(p.placements) for p in model.parameters()]}


def _assert_equal_unsharded(ranks, style):
    want_value, want_grads = _single(style)
    cases = [k for k in ranks[0] if isinstance(k, tuple) and style in k]
    assert cases
    for rank, seen in enumerate(ranks):
        for key in cases:
            got = seen[key]
            assert got["value"] == pytest.approx(want_value, rel=1e-12), (rank, key)
            for n, g in want_grads.items():
                torch.testing.assert_close(got["grads"][n], g, rtol=1e-10, atol=1e-12, msg=f"{rank} {key} {n}")


def _rank(rank, scratch):
    from torch.distributed.device_mesh import init_device_mesh

    out = os.path.join(scratch, "seen")
    seen = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    x, y = _data()
    backends = ["torch"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        if importlib.util.find_spec("triton") is not None:
            backends.append("triton")
    for backend in backends:
        for style in ("loss", "accumulate"):
            for when in ("with_model", "late"):
                seen[(backend, style, when)] = _sharded_step(mesh, backend, style, when)

    # State: each rank saves its pieces; the same rank reloads them; the other rank's are refused.
    model = _sharded_model(mesh)
    ewc = EWCRegularizer(LAM)
    for fisher, anchor in _tasks(_model()):
        ewc.register_task(fisher, anchor, model=model)
    want = float(ewc(model).detach())
    torch.save(ewc.state_dict(), f"{out}.state.{rank}")
    if importlib.util.find_spec("safetensors") is not None:
        from fastewc import load_regularizer, save_regularizer

        save_regularizer(ewc, f"{out}.{rank}.safetensors")
        seen["safetensors"] = (want, float(load_regularizer(f"{out}.{rank}.safetensors")(model).detach()))
    try:
        from fastewc import estimate_fisher

        estimate_fisher(model, [(x, y)], loss_fn=F.mse_loss)
        seen["estimate"] = None
    except Exception as e:  # noqa: BLE001 - the test checks type and message
        seen["estimate"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    again = EWCRegularizer()
    again.load_state_dict(torch.load(f"{out}.state.{rank}", weights_only=True))
    seen["reloaded"] = (want, float(again(model).detach()))
    other = EWCRegularizer()
    other.load_state_dict(torch.load(f"{out}.state.{1 - rank}", weights_only=True))
    try:
        other(model)
        seen["other_rank"] = None
    except ModelMismatchError as e:
        seen["other_rank"] = str(e)
    dist.barrier()
    # A third task registered after reloading folds into the pieces.
    fisher3 = {n: torch.full(p.shape, 0.5, dtype=torch.float64) for n, p in _model().named_parameters()}
    anchor3 = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in _model().named_parameters()}
    again.register_task(fisher3, anchor3, model=model)
    seen["third_task"] = float(again(model).detach())
    # Snapshots of a sharded model's parameters (DTensors) are accepted as anchors.
    snap = EWCRegularizer(LAM)
    snap.register_task(fisher3, {n: p.detach() for n, p in model.named_parameters()}, model=model)
    seen["snapshot"] = float(snap(model).detach())
    if rank == 0:
        plain = EWCRegularizer()
        plain.load_state_dict(torch.load(f"{out}.state.0", weights_only=True))
        try:
            plain(_model())
            seen["plain_model"] = None
        except ModelMismatchError as e:
            seen["plain_model"] = str(e)
    return seen


@pytest.fixture(scope="module")
def ranks():
    return on_ranks(_rank, WORLD)


def _cases(ranks):
    return [k for k in ranks[0] if isinstance(k, tuple)]


@pytest.mark.parametrize("style", ["loss", "accumulate"])
def test_value_and_gradients_equal_unsharded(ranks, style):
    _assert_equal_unsharded(ranks, style)
    for seen in ranks:
        for key in _cases(ranks):
            assert seen[key]["backends"] == (key[0],)


def test_each_rank_stores_only_its_pieces(ranks):
    for seen in ranks:
        for key in _cases(ranks):
            assert seen[key]["stored"] == seen[key]["local"]
    total = sum(p.numel() for p in _model().parameters())
    key = _cases(ranks)[0]
    assert sum(seen[key]["stored"] for seen in ranks) == total


def test_state_round_trips_on_the_same_rank(ranks):
    for seen in ranks:
        want, got = seen["reloaded"]
        assert got == pytest.approx(want, rel=1e-12)


def test_safetensors_round_trip_on_the_same_rank(ranks):
    if "safetensors" not in ranks[0]:
        pytest.skip("safetensors is not installed (extra 'safetensors')")
    for seen in ranks:
        want, got = seen["safetensors"]
        assert got == pytest.approx(want, rel=1e-12)


def test_estimate_fisher_on_sharded_parameters_says_what_to_do(ranks):
    for seen in ranks:
        assert seen["estimate"] is not None and seen["estimate"].startswith("EWCInputError")
        assert "unsharded model" in seen["estimate"] and "register_task" in seen["estimate"]


def test_state_of_another_rank_is_refused(ranks):
    for seen in ranks:
        assert seen["other_rank"] is not None and "mesh coordinate" in seen["other_rank"]
        assert "load the state that this rank saved" in seen["other_rank"]


def test_sharded_state_refused_by_a_plain_model(ranks):
    msg = ranks[0]["plain_model"]
    assert msg is not None and "plain tensor" in msg


def test_third_task_and_snapshot_anchors(ranks):
    model = _model()
    ewc = EWCRegularizer(LAM)
    for fisher, anchor in _tasks(model):
        ewc.register_task(fisher, anchor)
    fisher3 = {n: torch.full(p.shape, 0.5, dtype=torch.float64) for n, p in model.named_parameters()}
    ewc.register_task(fisher3, {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()})
    want = float(ewc(model).detach())
    for seen in ranks:
        assert seen["third_task"] == pytest.approx(want, rel=1e-12)
        assert seen["snapshot"] == pytest.approx(0.0, abs=1e-12)


def test_unreadable_sharding_entry_in_a_state_is_refused():
    from fastewc.errors import EWCInputError

    model = _model()
    ewc = EWCRegularizer(LAM)
    fisher, anchor = _tasks(model)[0]
    ewc.register_task(fisher, anchor)
    state = ewc.state_dict()
    extra = dict(state["_extra_state"])
    for bad in ({"nope": {}}, {"0.weight": {"global_shape": [9, 5]}}, ["0.weight"]):
        broken = EWCRegularizer()
        with pytest.raises(EWCInputError, match="sharding"):
            broken.load_state_dict({**state, "_extra_state": {**extra, "sharding": bad}})
        assert broken.tasks_seen == 0  # nothing half-loaded
    # A state written before sharding support (no 'sharding' key) still loads.
    extra.pop("sharding")
    old = EWCRegularizer()
    old.load_state_dict({**state, "_extra_state": extra})
    assert float(old(model).detach()) == pytest.approx(float(ewc(model).detach()), rel=1e-12)


# -- HSDP: a 2 x 2 mesh (replicate x shard), 4 processes ---------------------------------------
def _hsdp_rank(rank, scratch):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return {(style, when): _sharded_step(mesh, "torch", style, when)
            for style in ("loss", "accumulate") for when in ("with_model", "late")}


@pytest.fixture(scope="module")
def hsdp_ranks():
    return on_ranks(_hsdp_rank, 4)


@pytest.mark.parametrize("style", ["loss", "accumulate"])
def test_hsdp_value_and_gradients_equal_unsharded(hsdp_ranks, style):
    """Sharded along mesh dim 1, replicated along dim 0: the value is summed over dim 1 only."""
    for seen in hsdp_ranks:
        assert all("Replicate" in p and "Shard" in p for key in seen for p in seen[key]["placements"])
    _assert_equal_unsharded(hsdp_ranks, style)
