"""save_regularizer / load_regularizer: torch.save and safetensors round trips, and bad files."""

import re

import pytest
import torch

from fastewc import EWCInputError, EWCRegularizer, load_regularizer, save_regularizer
from fastewc._utils import MissingDependencyError

from models import mlp


def _registered(mode="separate", storage=torch.float32):
    torch.manual_seed(0)
    model = mlp()
    reg = EWCRegularizer(37.0, mode=mode, gamma=0.5 if mode == "online" else 1.0, storage_dtype=storage, layer_lambdas={"0.*": 3.0},
                         exclude=["2.bias"])
    for _ in range(2):
        reg.register_task({n: torch.rand_like(p) for n, p in model.named_parameters()},
                          {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()})
    return model, reg


def _value_and_grads(reg, model):
    params = [p for p in model.parameters()]
    value = reg(model)
    return value.detach(), torch.autograd.grad(value, params, allow_unused=True)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("mode,storage", [("separate", torch.float32), ("online", torch.bfloat16)])
def test_round_trip(tmp_path, suffix, mode, storage):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model, reg = _registered(mode, storage)
    path = save_regularizer(reg, tmp_path / f"ewc{suffix}")
    back = load_regularizer(path)
    assert (back.mode, back.gamma, back.lambda_ewc, back.tasks_seen, back.storage_dtype) == \
           (reg.mode, reg.gamma, reg.lambda_ewc, reg.tasks_seen, reg.storage_dtype)
    assert back.protected_names == reg.protected_names
    v0, g0 = _value_and_grads(reg, model)
    v1, g1 = _value_and_grads(back, model)
    assert torch.equal(v0, v1)
    for a, b in zip(g0, g1):
        assert (a is None and b is None) or torch.equal(a, b)
    # The loaded one keeps working: registering a third task gives what the original gives.
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.register_task(fisher, anchor)
    back.register_task(fisher, anchor)
    assert torch.equal(reg(model).detach(), back(model).detach())


def test_empty_regularizer_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    back = load_regularizer(save_regularizer(EWCRegularizer(5.0), tmp_path / "e.safetensors"))
    assert back.tasks_seen == 0 and back.lambda_ewc == 5.0


def test_missing_file(tmp_path):
    with pytest.raises(EWCInputError, match="no such file"):
        load_regularizer(tmp_path / "nope.safetensors")


def test_foreign_files_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(EWCInputError, match="does not hold an EWCRegularizer"):
        load_regularizer(tmp_path / "other.pt")
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EWCInputError, match="without fastewc metadata"):
        load_regularizer(tmp_path / "other.safetensors")


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    import fastewc._utils as opt

    real = opt.importlib.import_module
    monkeypatch.setattr(opt.importlib, "import_module",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name.startswith("safetensors")
                        else real(name, *a, **k))
    _, reg = _registered()
    with pytest.raises(MissingDependencyError, match=r"fastewc\[safetensors\]"):
        save_regularizer(reg, tmp_path / "x.safetensors")


# -- crash safety and damaged files -----------------------------------------------------------

_CHILD = r"""
import sys
import torch
from fastewc import EWCRegularizer, save_regularizer

path = sys.argv[1]
n = 1 << 22  # 4M elements per tensor: each save writes a few tens of MB
reg = EWCRegularizer(2.0)
reg.register_task({"w": torch.rand(n), "v": torch.rand(n)}, {"w": torch.randn(n), "v": torch.randn(n)})
print("ready", flush=True)
while True:
    save_regularizer(reg, path)
"""


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_kill_during_save_leaves_the_previous_file(tmp_path, suffix):
    import os
    import signal
    import subprocess
    import sys
    import time

    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model, reg = _registered()
    path = tmp_path / f"ewc{suffix}"
    save_regularizer(reg, path)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
        # Kill it while a save is under way: as soon as its temporary file shows (or after 2 s,
        # by when a save that wrote in place would be caught half way just as well).
        deadline = time.monotonic() + 2.0
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            assert child.poll() is None, "the child exited"
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    back = load_regularizer(path)  # the previous file, or a complete later one: never a torn one
    if back.protected_names == reg.protected_names:
        assert torch.equal(back(model).detach(), reg(model).detach())
    else:
        assert back.protected_names == ["w", "v"] and back.importance()["w"].numel() == 1 << 22
    stray = [p.name for p in tmp_path.iterdir() if p != path]
    assert all(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in stray), stray


def test_save_replaces_without_leaving_temporary_files(tmp_path):
    _, reg = _registered()
    path = tmp_path / "ewc.pt"
    for _ in range(3):
        save_regularizer(reg, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ewc.pt"]


@pytest.mark.parametrize("fails", [False, True])
def test_a_writers_own_temporary_file_stays_in_the_private_folder(tmp_path, fails):
    """A writer that writes its own temporary file first and renames it (safetensors does, as
    ``.tmpXXXXXX``) leaves nothing beside the target, whether it finishes or fails half way."""
    from pathlib import Path

    from fastewc._utils import write_atomically

    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def write(tmp):
        own = Path(tmp).parent / ".tmpab12cd"
        own.write_bytes(b"new")
        if fails:
            raise OSError("disk full")
        own.rename(tmp)

    if fails:
        with pytest.raises(OSError, match="disk full"):
            write_atomically(path, write)
    else:
        write_atomically(path, write)
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    assert path.read_bytes() == (b"old" if fails else b"new")


def test_saved_file_gets_ordinary_permissions(tmp_path):
    import os
    import stat

    _, reg = _registered()
    umask = os.umask(0o022)
    try:
        path = save_regularizer(reg, tmp_path / "new.pt")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not the temporary file's private 0600
        os.chmod(path, 0o640)
        save_regularizer(reg, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # an existing file keeps its mode
    finally:
        os.umask(umask)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model, reg = _registered()
    path = tmp_path / "ewc.pt"
    save_regularizer(reg, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_regularizer(EWCRegularizer(1.0), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ewc.pt"]


def _damaged(tmp_path, suffix, how):
    _, reg = _registered()
    path = save_regularizer(reg, tmp_path / f"ewc{suffix}")
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupted":
        mid = len(data) // 3
        path.write_bytes(data[:8] + bytes(b ^ 0xFF for b in data[8:mid]) + data[mid:])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # text
        path.write_text("not a regularizer\n")
    return path


@pytest.mark.parametrize("how", ["truncated", "corrupted", "empty", "text"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_damaged_files_are_refused_naming_the_file(tmp_path, suffix, how):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = _damaged(tmp_path, suffix, how)
    kind = "torch.save" if suffix == ".pt" else "safetensors"
    with pytest.raises(EWCInputError, match=rf"{re.escape(str(path))}.*(not a readable {kind} file|"
                                           rf"metadata|EWCRegularizer state)"):
        load_regularizer(path)


def _with_extra(state, **changes):
    return {**state, "_extra_state": {**state["_extra_state"], **changes}}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_newer_format_version_is_refused_with_both_numbers(tmp_path, suffix):
    import json

    from fastewc.penalty.regularizer import STATE_VERSION

    _, reg = _registered()
    path = tmp_path / f"ewc{suffix}"
    if suffix == ".pt":
        torch.save(_with_extra(reg.state_dict(), version=STATE_VERSION + 1), path)
    else:
        st = pytest.importorskip("safetensors.torch")
        state = reg.get_extra_state()
        tensors = {f"{k}/{n}": t.clone() for k in ("importance", "anchor") for n, t in state.pop(k).items()}
        st.save_file(tensors, str(path), metadata={"fastewc": json.dumps({**state, "version": STATE_VERSION + 1})})
    with pytest.raises(EWCInputError, match=rf"{re.escape(str(path))}: .*format version {STATE_VERSION + 1}, "
                                           rf"newer than the versions this fastewc reads \(1 to {STATE_VERSION}\)"):
        load_regularizer(path)


def test_bad_state_dict_leaves_an_existing_regularizer_unchanged():
    from test_penalty_bad_input import assert_same, snapshot

    model, reg = _registered()
    reg(model)
    before = snapshot(reg)
    v0 = reg(model).detach()
    sd = reg.state_dict()
    extra = sd["_extra_state"]
    bad = [
        ({}, "no '_extra_state' entry"),
        (_with_extra(sd, version=99), "format version 99, newer"),
        (_with_extra(sd, version="1"), "no valid format version"),
        ({"_extra_state": {k: v for k, v in extra.items() if k != "anchor"}}, "lacks the entry 'anchor'"),
        (_with_extra(sd, gamma="x"), "gamma must be a number"),
        (_with_extra(sd, tasks_seen="many"), "unreadable constant or tasks_seen"),
        (_with_extra(sd, importance={**extra["importance"], "0.weight": torch.zeros(2)}),
         r"fisher\['0.weight'\] has shape \(2,\) but optimal_params\['0.weight'\] has shape \(17, 13\)"),
    ]
    for state, match in bad:
        with pytest.raises(EWCInputError, match=match):
            reg.load_state_dict(state)
        assert_same(before, snapshot(reg))
        assert torch.equal(reg(model).detach(), v0)


def test_version_1_states_still_load():
    """Format 1 had no check_finite and always a storage dtype name."""
    model, reg = _registered()
    state = reg.state_dict()
    old = {k: v for k, v in state["_extra_state"].items() if k != "check_finite"}
    old.update(version=1, storage_dtype="float32")
    back = EWCRegularizer()
    back.load_state_dict({"_extra_state": old})
    assert back.check_finite is False and back.storage_dtype == torch.float32 and back.tasks_seen == 2
    assert torch.equal(back(model).detach(), reg(model).detach())


def test_saving_into_a_missing_folder_names_the_folder(tmp_path):
    target = tmp_path / "no-such-folder" / "ewc.pt"
    with pytest.raises(EWCInputError, match=r"cannot save to .*ewc\.pt: the folder .*no-such-folder does not exist"):
        save_regularizer(EWCRegularizer(), target)
    assert not (tmp_path / "no-such-folder").exists()
