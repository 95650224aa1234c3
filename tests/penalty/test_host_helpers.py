"""The C++ host helpers (``fastewc.penalty.backends.host``) against their Python twins: the
binding's fingerprint and the CPU backend's gradient column. Where the helpers cannot be built,
the tests that need them skip, saying why; the tests of how a build fails run everywhere."""

import os
import platform
import sys
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
    rec = helpers.record(ts)
    ts[0] = ts[0].data.requires_grad_(True)
    assert fingerprint(ts, False) == fingerprint(tensors()[:0] + ts, False)
    assert not helpers.matches(ts, rec)


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
    for name, value in (("_module", None), ("_why", "not built yet"), ("_thread", None), ("_started_in", None)):
        monkeypatch.setattr(host, name, value)
    return tmp_path


def test_off_disables_and_says_so(fresh_state, monkeypatch):
    monkeypatch.setenv("FASTEWC_HOST_HELPERS", "off")
    assert host.helpers() is None and host.build() is None and host._started_in is None
    assert host.host_helpers_status() == "disabled by FASTEWC_HOST_HELPERS=off"


def test_an_unknown_mode_is_refused_by_name(fresh_state, monkeypatch):
    monkeypatch.setenv("FASTEWC_HOST_HELPERS", "sometimes")
    with pytest.raises(EWCInputError, match="unknown FASTEWC_HOST_HELPERS 'sometimes'; expected 'background', 'wait' or 'off'"):
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
    assert module is None and why.endswith("failed its self-test (matches() says yes to everything); "
                                           "the Python twins are used")


def test_self_test_catches_a_wrong_answer(helpers):
    class Lying:
        record, gather_grads = staticmethod(helpers.record), staticmethod(helpers.gather_grads)

        @staticmethod
        def matches(params, record):
            return True

    assert host.self_test(helpers) is None
    assert host.self_test(Lying) == "a changed tensor still matches"


def test_background_build_serves_steps_meanwhile_and_then_is_used(helpers, monkeypatch, tmp_path):
    # A fresh process state over the warm cache: the first binding starts the build on a thread
    # and returns at once; steps are right throughout; build() waits for that same thread.
    monkeypatch.setenv("FASTEWC_HOST_HELPERS", "background")
    for name, value in (("_module", None), ("_why", "not built yet"), ("_thread", None), ("_started_in", None)):
        monkeypatch.setattr(host, name, value)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    ewc, ref = EWCRegularizer(2.0), R.ReferenceEWC(2.0)
    f, a = make_tasks(model, 1, dtype=torch.float64)[0]
    ewc.register_task(f, a, model=model)
    ref.register_task(f, a)
    perturb(model)
    assert_penalty_steps(ewc, model, ref)
    assert host._thread is not None and host._thread.name == "fastewc-host-build"
    assert host._started_in == os.getpid()
    assert host.build() is not None and host.host_helpers_status() is None
    assert_penalty_steps(ewc, model, ref)
    assert_penalty_steps(ewc, model, ref)
    assert ewc._binding.record is not None


def test_one_process_builds_and_the_others_wait_for_it(tmp_path):
    # Another process holds the lock and its library appears a little later: this one waits
    # and does not run its compiler (``false`` would fail if it did).
    import threading
    import time

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


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "helpers.so"
    lock = tmp_path / "helpers.so.lock"
    lock.touch()
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    why = host.build_once(["false"], out, stale_after=60, poll=0.05)
    assert why is not None and "exited with 1" in why  # it ran its own compiler
    assert not lock.exists() and not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_a_new_library_is_checked_in_a_child_before_it_is_cached(helpers, tmp_path):
    # The cached library passes; a file that is no library for this torch fails in the child
    # (where a crash would not take the user's process with it) and never enters the cache.
    assert host.check_in_child(Path(helpers.__file__), helpers.__name__) is None
    bad = tmp_path / "not-a-library.so"
    bad.write_bytes(b"\x7fELF garbage")
    why = host.check_in_child(bad, helpers.__name__)
    assert why.startswith("the library built fails its self-test in a child process (exit status 1: ")
    assert why.endswith("; it is not cached")
    out = tmp_path / "cache" / "helpers.so"
    out.parent.mkdir()
    cmd = [sys.executable, "-c", "import sys; open(sys.argv[-1], 'wb').write(b'built')"]
    assert native.compile_into(cmd, out, check=lambda built: f"{built.name} is no good") is not None
    assert not out.exists() and not list(out.parent.iterdir())
    assert native.compile_into(cmd, out, check=lambda built: None) is None and out.read_bytes() == b"built"


def test_locate_answers_like_the_python_locator(helpers, monkeypatch):
    from collections import OrderedDict

    from fastewc.penalty.binding import ParamLocator

    def both(loc):
        got = helpers.locate(loc.edges, loc.slots)
        with monkeypatch.context() as m:
            m.setattr(host, "_module", None)
            want = loc.find()
        assert (got is None) == (want is None) and (got is None or all(a is b for a, b in zip(got, want)))
        assert got is None or len(got) == len(want)
        return got

    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 2)))
    names = [n for n, _ in model.named_parameters()]
    loc = ParamLocator(model, names)
    assert loc.plain and both(loc) == list(model.parameters())
    model[1][1]._parameters["bias"] = other = nn.Parameter(torch.zeros(2))  # written directly
    assert both(loc)[-1] is other
    del model[0]._parameters["weight"]
    assert both(loc)[0] is None
    model[1] = nn.Sequential(nn.Tanh(), nn.Linear(4, 2))  # a module on a path replaced
    assert both(loc) is None
    with pytest.raises(TypeError, match=r"locate\(\): a slot is not a \(dict, name\) tuple"):
        helpers.locate([], [(OrderedDict(), "weight")])
    with pytest.raises(TypeError, match=r"locate\(\): an edge is not a \(dict, name, child\) tuple"):
        helpers.locate([({}, "0")], [])
    with pytest.raises(TypeError, match=r"locate\(\) takes a list of edges and a list of slots"):
        helpers.locate((), [])
    # A module whose parameters live in a dict subclass is located in Python.
    odd = nn.Linear(2, 2)
    odd._parameters = OrderedDict(odd._parameters)
    loc = ParamLocator(odd, ["weight", "bias"])
    assert not loc.plain and loc.find() == [odd.weight, odd.bias]
