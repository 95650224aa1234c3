"""Per-step host helpers in C++ (``kernels/host_cpu.cpp``), built against the running torch.

What they do: the per-step bookkeeping that costs more than the kernel on models
with many small tensors (a few million parameters in hundreds of tensors), done as plain loads
from the tensors' C++ objects instead of Python attribute reads:

- ``record(params) -> bytes | None`` and ``matches(params, record) -> bool``: the twin of
  ``binding.fingerprint`` (a bound regularizer's check that the protected parameters are the
  ones it was bound to: address, shape, dtype, contiguity, requires_grad; the record also holds
  each parameter's Python class). ``record`` returns None for a tensor it cannot read (no
  storage, not strided); the binding then keeps the Python fingerprint.
- ``locate(edges, slots) -> list | None``: the twin of ``binding.ParamLocator.find`` (re-finding
  the protected parameters through their module paths), for modules whose ``_modules`` and
  ``_parameters`` are plain dicts.
- ``gather_grads(params, grad_column, mode_column) -> bool``: the twin of the CPU backend's
  ``_Segments.set_grads`` for the common case (every gradient present, contiguous, of its
  parameter's dtype): writes the gradients' addresses into the segment table.

Both twins give the same answers (``tests/penalty/test_host_helpers.py`` compares them on every
kind of change the binding tests make); the helpers only save time. They are compiled with the
system C++ compiler (``$CXX``, else c++, g++ or clang++) against torch's headers and libraries,
on Linux, once per torch build, Python version and compiler (about 20 s), and cached beside the
CPU kernel (``native.cache_dir()``); when several processes want them at once (the ranks of a
distributed job), one builds and the others wait for its library (``build_once``). The build
runs in a separate, detached Python process (``spawn_builder``): because the helpers read
torch's C++ objects, a new library must pass a self-test against the Python twins before it
enters the cache, and one that does not fit this torch would crash the process that loads it,
which must not be the user's; and a build started as a process exits must outlive it. Each
process that loads the library runs the self-test again.

When they are built is set by ``FASTEWC_HOST_HELPERS``:

- unset or ``deferred``: a binding loads them if they are cached; if not, they are built once,
  right after this process exits, for the processes after it (steps use the Python twins
  meanwhile). Not during the run: a compiler beside a training loop, even at idle priority,
  stalls torch's parallel regions whenever one of their threads shares its core;
- ``wait``: the first binding builds (or loads) them before it returns;
- ``off`` (or ``0``): never; the Python twins always.

The variable is read when a binding is made; helpers already loaded in the process stay in use.

``build()`` builds them now and waits (``fastewc info`` and the benchmarks call it), and
``host_helpers_status()`` says why they are not in use.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import importlib.machinery
import importlib.util
import os
import platform
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from ...errors import EWCInputError
from .native import cache_dir, compile_into, compiler_version, cxx_compiler, kernel_source

__all__ = ["build", "helpers", "host_helpers_status", "loaded", "SOURCE_NAME", "ENV"]

SOURCE_NAME = "host_cpu.cpp"
ENV = "FASTEWC_HOST_HELPERS"
FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared", "-fvisibility=hidden", "-w")
BUILD_TIMEOUT = 600  # seconds a compiler run may take (and the age of a lock left by a dead process)
_MODES = {"": "deferred", "deferred": "deferred", "wait": "wait", "off": "off", "0": "off"}

_lock = threading.Lock()
_module: ModuleType | None = None  # the loaded helpers; read without the lock on every step
_why: str | None = "not built yet"  # why _module is None
_started_in: int | None = None  # the process that loaded, built or deferred them (a forked child decides anew)


def mode() -> str:
    """``deferred``, ``wait`` or ``off``, from ``FASTEWC_HOST_HELPERS``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _MODES:
        raise EWCInputError(f"unknown {ENV} {os.environ.get(ENV)!r}; expected 'deferred', 'wait' or 'off'")
    return _MODES[value]


def loaded() -> ModuleType | None:
    """The helpers if they are loaded, else None; None as well while torch.compile traces (it
    cannot trace a foreign function and would warn; the Python twins break its graph quietly).
    Never builds: the per-step call."""
    if _module is None or torch.compiler.is_compiling():
        return None
    return _module


def helpers() -> ModuleType | None:
    """The helpers if they can be had now (see the module docstring for when they are built);
    None while they are not available."""
    if _module is not None or mode() == "off":
        return _module
    if _started_in != os.getpid():
        if mode() == "wait":
            return build()
        _defer()
    return _module


def build() -> ModuleType | None:
    """Build (or load from the cache) the helpers now and wait for them; None if they cannot be
    had (``host_helpers_status()`` says why)."""
    global _started_in
    if _module is not None or mode() == "off":
        return _module
    with _lock:
        if _module is None:
            _started_in = os.getpid()
            _set(*_build())
    return _module


def host_helpers_status() -> str | None:
    """None when the helpers are in use; otherwise why not (disabled, not built yet, or the
    build's failure)."""
    if _module is not None:
        return None
    if mode() == "off":
        return f"disabled by {ENV}={os.environ.get(ENV)}"
    return _why


def _defer() -> None:
    """Deferred mode: load the helpers now if they are cached, else build them when this
    process exits (``_build_at_exit``)."""
    global _started_in
    with _lock:
        if _started_in == os.getpid() or _module is not None:
            return
        _started_in = os.getpid()
        job, why = _job()
        if job is None or Path(job["path"]).exists():
            _set(*(_load_checked(job) if job is not None else (None, why)))
            return
        _set(None, f"not built yet: they are built once this process exits ({ENV}=wait builds them before "
                   "the first step)")
        atexit.register(_build_at_exit, job)


def _build_at_exit(job: dict) -> None:
    """Start the builder for ``job`` at idle priority and leave it running (it is detached)."""
    if _module is None and not Path(job["path"]).exists():
        spawn_builder({**job, "idle": True})


def _set(module: ModuleType | None, why: str | None) -> None:
    global _module, _why
    _module, _why = module, why


def source_path() -> Path:
    """The C++ source shipped in the installed package (``fastewc/kernels/host_cpu.cpp``)."""
    return kernel_source(SOURCE_NAME)


def _job() -> tuple[dict | None, str | None]:
    """What to build and where: ``({"cmd", "path", "name"}, None)``, or ``(None, why it cannot
    be built here)``. Cheap (one ``--version`` run of the compiler): the cache key is a hash of
    the source, the compiler's version, the flags, torch's version and build, Python's ABI tag,
    the machine and torch's header folders."""
    if platform.system() != "Linux":
        return None, f"the host helpers are built on Linux only (this is {platform.system()})"
    try:
        code = source_path().read_bytes()
    except OSError as e:
        return None, f"the source {SOURCE_NAME} is missing from this installation ({e})"
    cxx = cxx_compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install c++, g++ or clang++)"
    try:
        version = compiler_version(cxx)
    except Exception as e:  # OSError, TimeoutExpired
        return None, f"the C++ compiler {' '.join(cxx)} does not run: {e}"
    try:
        from torch.utils.cpp_extension import include_paths, library_paths

        includes, libraries = include_paths(), library_paths()
    except Exception as e:  # an installation without torch's headers
        return None, f"torch's C++ headers are not available ({type(e).__name__}: {e})"
    python_include = sysconfig.get_paths().get("include", "")
    if not Path(includes[0], "torch", "csrc", "autograd", "python_variable.h").exists():
        return None, f"torch's C++ headers are not installed (looked in {includes[0]})"
    if not Path(python_include, "Python.h").exists():
        return None, f"Python's C headers are not installed (no Python.h in {python_include})"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in [
        code, version, " ".join(FLAGS), abi, torch.__version__, str(torch.version.git_version),
        sys.implementation.cache_tag, platform.machine(), *includes])).hexdigest()[:20]
    name = f"fastewc_host_{key}"
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return None, f"cannot create the cache folder {folder} ({e}); set FASTEWC_CACHE_DIR"
    cmd = [*cxx, *FLAGS, abi, f"-DTORCH_EXTENSION_NAME={name}", *(f"-I{p}" for p in includes),
           f"-I{python_include}", str(source_path()), *(f"-L{p}" for p in libraries),
           *(f"-Wl,-rpath,{p}" for p in libraries), "-lc10", "-ltorch_cpu", "-ltorch_python"]
    return {"cmd": cmd, "path": str(folder / f"{name}.so"), "name": name}, None


def _build() -> tuple[ModuleType | None, str | None]:
    """Build (in the builder process) if not cached, then load: (the self-tested module, None)
    or (None, why not)."""
    job, why = _job()
    if job is None:
        return None, why
    if not Path(job["path"]).exists():
        why = run_builder(job)
        if why is not None:
            return None, f"the host helpers could not be built: {why}"
    return _load_checked(job)


def _load_checked(job: dict) -> tuple[ModuleType | None, str | None]:
    """Load the cached library of ``job`` and self-test it: (module, None) or (None, why not)."""
    module, why = load_and_test(Path(job["path"]), job["name"])
    if why is not None:
        return None, f"{job['path']} cannot be used ({why}); the Python twins are used"
    return module, None


def load_and_test(path: Path, name: str) -> tuple[ModuleType | None, str | None]:
    """Import the library at ``path`` as ``name`` and run ``self_test`` on it: (module, None), or
    (None, what went wrong)."""
    try:
        module = load(path, name)
        why = self_test(module)
    except Exception as e:  # ImportError, OSError: not a library for this Python and torch
        return None, f"{type(e).__name__}: {e}"
    return (module, None) if why is None else (None, f"failed its self-test: {why}")


def load(path: Path, name: str) -> ModuleType:
    """Import the built library at ``path`` (any file name) as the module ``name``."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


_BUILDER = """
import json, os, sys
job = json.loads(sys.argv[1])
if job.get("idle"):
    # Background builds take the CPU only when nothing else wants it (the compiler inherits
    # this): on a machine whose cores are all training, a compiler at normal priority would
    # stall every parallel region of torch that waits for the thread it displaced.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
from pathlib import Path
from fastewc.penalty.backends import host
why = host.build_once(job["cmd"], Path(job["path"]), check=lambda built: host.check_here(built, job["name"]))
try:
    print(why or "ok", flush=True)
except BrokenPipeError:
    pass  # the process that asked for the build is gone; the library is in the cache for the next
"""


def spawn_builder(job: dict) -> subprocess.Popen | str:
    """Start building ``job`` (see ``_job``; ``"idle": True`` runs it at idle CPU priority) in a
    separate Python process; the process, or why it could not be started.

    Separate because the library is self-tested before it enters the cache (``check_here``), and
    a library that does not fit the running torch would crash the process that loads it: that
    must not be the user's. Detached (its own session, nothing it needs from this process once
    started) because a short script may exit before the build ends: the build then completes,
    and the next process loads the library from the cache.
    """
    if not sys.executable:
        return "there is no Python executable to build them with (an embedded interpreter)"
    import fastewc

    roots = [str(Path(fastewc.__file__).resolve().parent.parent), str(Path(torch.__file__).resolve().parent.parent)]
    env = {**os.environ, ENV: "off", "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.Popen([sys.executable, "-c", _BUILDER, json.dumps(job)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    except OSError as e:
        return f"the builder process did not start ({e})"


def run_builder(job: dict) -> str | None:
    """Build ``job`` with ``spawn_builder`` and wait for it; None when the library is in the
    cache, else why not."""
    builder = spawn_builder(job)
    if isinstance(builder, str):
        return builder
    try:
        out, _ = builder.communicate(timeout=2 * BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        builder.kill()
        return f"the builder process did not finish within {2 * BUILD_TIMEOUT} s"
    lines = out.strip().splitlines()
    if builder.returncode == 0 and lines[-1:] == ["ok"]:
        return None
    if builder.returncode == 0 and lines:
        return lines[-1]
    return f"the builder process exited with status {builder.returncode}: {out.strip()[-300:]}"


def check_here(path: Path, name: str) -> str | None:
    """The builder's check of a freshly built library (in the builder process): None when it
    loads and passes ``self_test``, else why it does not enter the cache."""
    why = load_and_test(path, name)[1]
    return None if why is None else f"the library built cannot be used ({why}); it is not cached"


def build_once(cmd: list[str], path: Path, stale_after: float = BUILD_TIMEOUT, poll: float = 0.5,
               check: Callable[[Path], str | None] | None = None) -> str | None:
    """Build ``path`` unless another process is building it already: the ranks of a distributed
    job start at once, and each compiler run takes seconds of CPU and hundreds of MB. The first
    to create ``<path>.lock`` (holding its host name and process id) builds; the others wait for
    the library to appear, or for the lock to go (then they build themselves: that build
    failed). A lock whose process is gone (same host) or older than ``stale_after`` seconds is
    taken over. ``check``: as in ``native.compile_into``. None on success, else why not."""
    lock = path.with_name(path.name + ".lock")
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _abandoned(lock, stale_after):
                lock.unlink(missing_ok=True)
            else:
                time.sleep(poll)
            continue
        except OSError as e:
            return f"cannot create {lock} ({e}); set FASTEWC_CACHE_DIR"
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
        finally:
            os.close(fd)
        try:
            for left in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
                left.unlink(missing_ok=True)  # a half-written library of a builder that died
            return None if path.exists() else compile_into(cmd, path, timeout=BUILD_TIMEOUT, check=check)
        finally:
            lock.unlink(missing_ok=True)
    return None


def _abandoned(lock: Path, stale_after: float) -> bool:
    """Whether the process that holds ``lock`` is gone (or the lock is older than ``stale_after``)."""
    try:
        holder = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False  # gone meanwhile: the caller looks again
    if age > stale_after:
        return True
    host, _, pid = holder.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's (a shared cache folder), or not written yet
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def self_test(module: ModuleType) -> str | None:
    """None when ``module`` answers like the Python twins on a few tensors, else what differs."""
    import numpy as np

    a = torch.nn.Parameter(torch.zeros(3, 5))
    b = torch.zeros(7, dtype=torch.bfloat16, requires_grad=True)
    params = [a, b]
    rec = module.record(params)
    if rec is None or not module.matches(params, rec):
        return "a record does not match its own tensors"
    changes = [lambda: a.requires_grad_(False), lambda: setattr(a, "data", a.data.t()),
               lambda: setattr(a, "data", a.data.view(5, 3)),
               lambda: setattr(a, "data", torch.zeros(5, 3)), lambda: setattr(b, "data", b.data.float())]
    for change in changes:
        saved = (a.data, a.requires_grad, b.data)
        change()
        if module.matches(params, rec):
            return "a changed tensor still matches"
        a.data, b.data = saved[0], saved[2]
        a.requires_grad_(saved[1])
    if not module.matches(params, rec) or module.matches([a], rec) or module.matches([b, a], rec):
        return "matches() compares the wrong entries"
    a.grad, b.grad = torch.ones(3, 5), torch.ones(7, dtype=torch.bfloat16)
    grads, modes = np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int8)
    if not module.gather_grads(params, grads.ctypes.data, modes.ctypes.data):
        return "gather_grads() refuses plain gradients"
    if grads.tolist() != [a.grad.data_ptr(), b.grad.data_ptr()] or modes.tolist() != [2, 2]:
        return "gather_grads() writes other addresses than Tensor.data_ptr()"
    b.grad = torch.ones(14, dtype=torch.bfloat16)[::2]
    if module.gather_grads(params, grads.ctypes.data, modes.ctypes.data):
        return "gather_grads() accepts a gradient that is not contiguous"
    b.grad = None
    if module.gather_grads(params, grads.ctypes.data, modes.ctypes.data):
        return "gather_grads() accepts a missing gradient"
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    slots = [(net[0]._parameters, "weight"), (net[0]._parameters, "nothing")]
    found = module.locate([(net._modules, "0", net[0])], slots)
    if found is None or found[0] is not net[0].weight or found[1] is not None:
        return "locate() finds other parameters than dict.get"
    if module.locate([(net._modules, "0", net)], slots) is not None:
        return "locate() misses a replaced module"
    return None
