"""The C++ host helpers (``fastewc.penalty.backends.host``) against their Python twins: the
binding's fingerprint and the CPU backend's gradient column. Where the helpers cannot be built,
the tests that need them skip, saying why; the tests of how a build fails run everywhere."""

import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastewc import EWCInputError, EWCRegularizer
from fastewc import reference as R
from fastewc.penalty.backends import cpu_backend, host, native
from fastewc.penalty.binding import fingerprint
from models import assert_penalty_steps, make_tasks, perturb, register_both
from plans import make_plan, reference, value_of

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def helpers():
    module = host.build()
    if module is None:
        pytest.skip(f"the C++ host helpers are not available: {host.host_helpers_status()}")
    return module


def tensors():
    return [nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(5)),
            torch.zeros(3, 1, 2, dtype=torch.bfloat16, requires_grad=True), nn.Parameter(torch.randn(1)),
            nn.Parameter(torch.randn(0, 3)), nn.Parameter(torch.randn(2, 3, 4, dtype=torch.float64))]


# Every change the Python fingerprint notices, each applied to a fresh list: (what, change).
CHANGES = [
    ("data moved", lambda ts: setattr(ts[0], "data", ts[0].data.clone())),
    ("same address, transposed", lambda ts: setattr(ts[0], "data", ts[0].data.t())),
    ("same address, flattened", lambda ts: setattr(ts[0], "data", ts[0].data.view(-1))),
    ("same address, reshaped", lambda ts: setattr(ts[0], "data", ts[0].data.view(6, 4))),
    ("same address, another dtype", lambda ts: setattr(ts[2], "data", ts[2].data.view(torch.float16))),
    ("frozen", lambda ts: ts[1].requires_grad_(False)),
    ("one-element unsqueezed", lambda ts: setattr(ts[3], "data", ts[3].data.view(1, 1))),
    ("empty reshaped", lambda ts: setattr(ts[4], "data", torch.randn(3, 0))),
    ("replaced by None", lambda ts: ts.__setitem__(5, None)),
    ("replaced by another parameter", lambda ts: ts.__setitem__(1, nn.Parameter(torch.randn(5)))),
    ("two swapped", lambda ts: ts.__setitem__(slice(0, 2), [ts[1], ts[0]])),
    ("one dropped", lambda ts: ts.pop()),
    ("one added", lambda ts: ts.append(nn.Parameter(torch.randn(2)))),
]


@pytest.mark.parametrize("what,change", CHANGES, ids=[c[0] for c in CHANGES])
def test_record_answers_like_the_python_fingerprint(helpers, what, change):
    ts = tensors()
    key, rec = fingerprint(ts, False), helpers.record(ts)
    assert rec is not None and helpers.matches(ts, rec) and helpers.matches(tuple(ts), rec)
    change(ts)
    assert fingerprint(ts, False) != key, what  # the change is one the twin sees
    assert not helpers.matches(ts, rec), what


def test_record_is_stricter_than_the_fingerprint_about_the_class(helpers):
    # The same memory as a plain tensor instead of a Parameter: the Python fingerprint cannot
    # tell; the record says no, and the binding binds again (no harm, only a rebind).
    ts = tensors()
    key, rec = fingerprint(ts, False), helpers.record(ts)
    ts[0] = ts[0].data.requires_grad_(True)
    assert type(ts[0]) is torch.Tensor and fingerprint(ts, False) == key
    assert not helpers.matches(ts, rec)


def test_the_binding_keeps_the_recorded_classes_alive(helpers):
    # The record compares classes by address; were a recorded class freed, another type could
    # take its address. A parameter class made for this test, then dropped everywhere else,
    # must stay alive while the binding that recorded it does (frozen: no plan holds the
    # parameter, so nothing else keeps its class).
    import gc
    import weakref

    Odd = type("Odd", (nn.Parameter,), {})
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].weight = Odd(model[0].weight.detach().clone(), requires_grad=False)
    ewc = register_both(EWCRegularizer(1.0), R.ReferenceEWC(1.0), make_tasks(model, 1, dtype=torch.float64),
                        model=model)[0]
    ewc(model)
    ewc(model)  # the second check makes the record
    binding = ewc._binding
    assert binding.record is not None and Odd in binding.record_classes
    alive = weakref.ref(Odd)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone(), requires_grad=False)
    del Odd
    gc.collect()
    assert alive() is not None
    ewc(model)  # a new class under the name: bound again
    assert ewc._binding is not binding


def test_record_of_what_cannot_be_read_is_none(helpers):
    assert helpers.record([nn.Parameter(torch.randn(3)), None]) is None
    assert helpers.record([torch.randn(4, 4).to_sparse()]) is None
    assert helpers.record([]) == b"" and helpers.matches([], b"") and not helpers.matches([torch.ones(1)], b"")
    assert not helpers.matches([torch.ones(2)], b"\0" * 7)  # a record cut short


def test_wrong_arguments_raise_type_errors(helpers):
    with pytest.raises(TypeError, match="record\\(\\) takes a list or tuple of tensors"):
        helpers.record(torch.ones(2))
    with pytest.raises(TypeError, match="matches\\(\\) takes a list or tuple of tensors and a record"):
        helpers.matches([torch.ones(2)], "not bytes")
    with pytest.raises(TypeError, match="gather_grads\\(\\) takes a list or tuple of tensors and two addresses"):
        helpers.gather_grads([torch.ones(2)], 0)


def gather(helpers, params):
    grads, modes = np.zeros(len(params), dtype=np.int64), np.zeros(len(params), dtype=np.int8)
    done = helpers.gather_grads(params, grads.ctypes.data, modes.ctypes.data)
    return done, grads.tolist(), modes.tolist()


def test_gather_grads_writes_what_data_ptr_says_and_refuses_what_set_grads_refuses(helpers):
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(1))]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad = torch.randn(9)[1:8]  # contiguous, at an offset into its storage
    done, grads, modes = gather(helpers, params)
    assert done and grads == [p.grad.data_ptr() for p in params] and modes == [2, 2, 2]
    for refuse in (lambda: setattr(params[2], "grad", None),
                   lambda: setattr(params[0], "grad", torch.randn(4, 3).t()),
                   lambda: (setattr(params[1], "grad_dtype", None), setattr(params[1], "grad", torch.zeros(7).double()))):
        refuse()
        assert not gather(helpers, params)[0]
        for p in params:
            p.grad = None
            p.grad_dtype = p.dtype
            p.grad = torch.randn_like(p)
    assert gather(helpers, params)[0]


def cpu_plan():
    if cpu_backend.cpu_kernel_status() is not None:
        pytest.skip(cpu_backend.cpu_kernel_status())
    return make_plan([(5, 7), (1,), (33,), (3, 4, 5)], torch.float32, torch.float32), cpu_backend.CpuBackend(poison=True)


def test_cpu_backend_gradient_column_through_either_twin(host_helpers):
    # Steps with the same parameters (one token) and gradients that come and go: new tensors,
    # missing ones (allocated and written), one not contiguous (torch ops), one of another
    # dtype, then plain ones again. Each step adds exactly lam A (theta - m).
    plan, be = cpu_plan()
    plan.params_token = object()
    want_v, want_g = reference(plan, 1.5)
    kept = []
    steps = ["fresh", "fresh", "missing", "strided", "fresh", "dtype", "fresh", "missing", "fresh"]
    for kind in steps:
        start = []
        for i, p in enumerate(plan.params):
            p.grad = None
            p.grad_dtype = p.dtype
            g = torch.randn_like(p)
            if kind == "missing" and i % 2 == 0:
                g = None
            elif kind == "strided" and i == 3:
                g = torch.randn(5, 4, 3).permute(2, 1, 0)
            elif kind == "dtype" and i == 0:
                p.grad_dtype = None
                g = torch.randn(5, 7, dtype=torch.float64)
            p.grad = g
            kept.append(g)  # kept alive: every step's gradients have new addresses
            start.append(torch.zeros_like(p, dtype=torch.float64) if g is None else g.double().clone())
        v = be.accumulate_grad_(plan, 1.5)
        torch.testing.assert_close(value_of(be, plan, v), want_v, rtol=1e-5, atol=0)
        for p, w, s0 in zip(plan.params, want_g, start):
            torch.testing.assert_close(p.grad.double(), w + s0, rtol=1e-5, atol=1e-5)
    seg = plan.cache[("cpu-segments", "accumulate")]
    assert seg.gathers(plan.params_token)
    assert (seg.grad_column is cpu_backend._UNKNOWN) == (host_helpers == "c++")  # the last step's path


def test_regularizer_on_a_model_with_a_frozen_layer_and_tied_weights(host_helpers):
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 11))
    model[3].weight = model[0].weight  # tied
    model[1].bias.requires_grad_(False)
    ewc, ref = register_both(EWCRegularizer(3.0), R.ReferenceEWC(3.0), make_tasks(model, 2, dtype=torch.float64),
                             model=model)
    perturb(model)
    for _ in range(3):
        assert_penalty_steps(ewc, model, ref)
    assert (ewc._binding.record is not None) == (host_helpers == "c++")


# -- when and how they are built -----------------------------------------------------------------
@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """The module's state as in a process that has not built anything, with its own cache."""
    monkeypatch.setenv("FASTEWC_CACHE_DIR", str(tmp_path))
    for name, value in (("_module", None), ("_why", "not built yet"), ("_started_in", None)):
        monkeypatch.setattr(host, name, value)
    return tmp_path


def test_off_disables_and_says_so(fresh_state, monkeypatch):
    monkeypatch.setenv("FASTEWC_HOST_HELPERS", "off")
    assert host.helpers() is None and host.build() is None and host._started_in is None
    assert host.host_helpers_status() == "disabled by FASTEWC_HOST_HELPERS=off"


def test_an_unknown_mode_is_refused_by_name(fresh_state, monkeypatch):
    monkeypatch.setenv("FASTEWC_HOST_HELPERS", "sometimes")
    with pytest.raises(EWCInputError, match="unknown FASTEWC_HOST_HELPERS 'sometimes'; expected 'deferred', 'wait' or 'off'"):
        host.helpers()


def test_a_missing_compiler_is_reported(fresh_state, monkeypatch):
    monkeypatch.setattr(host, "cxx_compiler", lambda: None)
    assert host.build() is None
    assert host.host_helpers_status() == "no C++ compiler found (set CXX, or install c++, g++ or clang++)"


def test_a_failing_compiler_leaves_nothing_behind(fresh_state, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    assert host.build() is None
    why = host.host_helpers_status()
    assert why.startswith("the host helpers could not be built: ") and "exited with 1" in why
    assert not list(fresh_state.iterdir())


def test_other_systems_are_told_linux_only(fresh_state, monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert host.build() is None and host.host_helpers_status() == "the host helpers are built on Linux only (this is Darwin)"


def test_a_build_that_fails_its_self_test_is_not_used(helpers, monkeypatch):
    monkeypatch.setattr(host, "self_test", lambda module: "matches() says yes to everything")
    module, why = host._build()
    assert module is None and why.endswith("cannot be used (failed its self-test: matches() says yes to "
                                           "everything); the Python twins are used")


def test_self_test_catches_a_wrong_answer(helpers):
    class Lying:
        record, gather_grads = staticmethod(helpers.record), staticmethod(helpers.gather_grads)

        @staticmethod
        def matches(params, record):
            return True

    assert host.self_test(helpers) is None
    assert host.self_test(Lying) == "a changed tensor still matches"


@pytest.fixture
def slow_compiler(helpers, tmp_path):
    """A stand-in for the C++ compiler with the real one's ``--version`` (so the same cache key):
    it waits a second, then copies the library built for this session to its ``-o`` target."""
    fake = tmp_path / "slow-c++"
    fake.write_text("#!/bin/sh\n"
                    f'if [ "$1" = "--version" ]; then exec {shlex.join(native.cxx_compiler())} --version; fi\n'
                    'for a; do last="$a"; done\n'
                    f"sleep 1; cp {shlex.quote(helpers.__file__)} \"$last\"\n")
    fake.chmod(0o755)
    return fake


def test_deferred_mode_builds_when_the_process_exits(fresh_state, slow_compiler, monkeypatch):
    # Not cached: steps run the Python twins (right), and the build is left for the exit of the
    # process; run here by hand, it builds into the cache and the next process loads it at once.
    import atexit

    monkeypatch.delenv("FASTEWC_HOST_HELPERS")
    monkeypatch.setenv("CXX", str(slow_compiler))
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    ewc, ref = register_both(EWCRegularizer(2.0), R.ReferenceEWC(2.0), make_tasks(model, 1, dtype=torch.float64),
                             model=model)
    perturb(model)
    assert_penalty_steps(ewc, model, ref)
    assert host.host_helpers_status() == ("not built yet: they are built once this process exits "
                                          "(FASTEWC_HOST_HELPERS=wait builds them before the first step)")
    assert ewc._binding.record is None and len(at_exit) == 1 and host._started_in == os.getpid()
    fn, args = at_exit[0]
    fn(*args)  # what the interpreter does at exit: starts the builder, does not wait for it
    built = fresh_state / Path(args[0]["path"]).name
    deadline = time.time() + 120
    while not (built.exists() and not list(fresh_state.glob("*.lock"))) and time.time() < deadline:
        time.sleep(0.2)
    assert built.exists()
    for name, value in (("_module", None), ("_started_in", None)):  # the next process
        monkeypatch.setattr(host, name, value)
    assert host.helpers() is not None and len(at_exit) == 1
    model2 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    ewc2, ref2 = register_both(EWCRegularizer(2.0), R.ReferenceEWC(2.0), make_tasks(model2, 1, dtype=torch.float64),
                               model=model2)
    perturb(model2)
    assert_penalty_steps(ewc2, model2, ref2)
    assert_penalty_steps(ewc2, model2, ref2)
    assert ewc2._binding.record is not None


def test_one_process_builds_and_the_others_wait_for_it(tmp_path):
    # Another process holds the lock and its library appears a little later: this one waits
    # and does not run its compiler (``false`` would fail if it did).
    import threading

    out = tmp_path / "helpers.so"
    lock = tmp_path / "helpers.so.lock"
    lock.touch()

    def other_process_finishes():
        time.sleep(0.3)
        out.write_bytes(b"built")
        lock.unlink()

    t = threading.Thread(target=other_process_finishes)
    t.start()
    assert host.build_once(["false"], out, poll=0.05) is None
    t.join()
    assert out.read_bytes() == b"built" and not lock.exists()


@pytest.mark.parametrize("left_by", ["a process that is gone", "a process long ago"])
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, left_by):
    out = tmp_path / "helpers.so"
    lock = tmp_path / "helpers.so.lock"
    (tmp_path / "helpers.so.4242.1.tmp").write_bytes(b"half a library")  # what that builder left
    if left_by == "a process that is gone":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        lock.write_text(f"{socket.gethostname()} {gone.pid}")
    else:
        lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # alive, but the lock is an hour old
        old = lock.stat().st_mtime - 3600
        os.utime(lock, (old, old))
    why = host.build_once(["false"], out, stale_after=60, poll=0.05)
    assert why is not None and "exited with 1" in why  # it ran its own compiler
    assert not lock.exists() and not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_new_library_is_self_tested_by_the_builder_before_it_is_cached(helpers, tmp_path):
    # The cached library passes; a file that is no library for this torch fails in the builder
    # process (where a crash would not take the user's process with it) and never enters the
    # cache, leaving neither its temporary file nor the lock behind.
    assert host.check_here(Path(helpers.__file__), helpers.__name__) is None
    bad = tmp_path / "not-a-library.so"
    bad.write_bytes(b"\x7fELF garbage")
    why = host.check_here(bad, helpers.__name__)
    assert why.startswith("the library built cannot be used (ImportError: ") and why.endswith("; it is not cached")
    out = tmp_path / "cache" / "helpers.so"
    out.parent.mkdir()
    garbage = [sys.executable, "-c", "import sys; open(sys.argv[-1], 'wb').write(b'\\x7fELF garbage')"]
    why = host.run_builder({"cmd": garbage, "path": str(out), "name": helpers.__name__})
    assert why.startswith("the library built cannot be used (ImportError: ") and why.endswith("; it is not cached")
    assert not list(out.parent.iterdir())
    # compile_into's check runs before the rename, whatever it checks.
    cmd = [sys.executable, "-c", "import sys; open(sys.argv[-1], 'wb').write(b'built')"]
    assert native.compile_into(cmd, out, check=lambda built: f"{built.name} is no good") is not None
    assert not out.exists() and not list(out.parent.iterdir())
    assert native.compile_into(cmd, out, check=lambda built: None) is None and out.read_bytes() == b"built"


def test_a_scripts_first_run_builds_them_for_the_next(helpers, slow_compiler, tmp_path):
    # A script in the default (deferred) mode exits; the detached builder outlives it and puts
    # the library into the cache, and the next run loads it at its first binding.
    env = {k: v for k, v in os.environ.items() if k != "FASTEWC_HOST_HELPERS"}
    env.update(FASTEWC_CACHE_DIR=str(tmp_path / "cache"), CXX=str(slow_compiler))
    probe = "from fastewc.penalty.backends import host; host.helpers(); print(host.host_helpers_status())"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().startswith("not built yet"), done.stderr
    cache = tmp_path / "cache"
    deadline = time.time() + 120
    while not list(cache.glob("fastewc_host_*.so")) and time.time() < deadline:
        time.sleep(0.2)
    while list(cache.glob("*.lock")) and time.time() < deadline:
        time.sleep(0.2)
    assert [p.name for p in cache.glob("fastewc_host_*")] == [Path(helpers.__file__).name]
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
