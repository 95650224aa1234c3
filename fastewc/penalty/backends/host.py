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
distributed job), one builds and the others wait for its library (``build_once``). Because
they read torch's C++ objects, a new build must pass a self-test against the Python twins in a
child process before it enters the cache (a build that does not fit this torch would crash the
process that loads it), and again in each process that loads it.

When they are built is set by ``FASTEWC_HOST_HELPERS``:

- unset or ``background``: the first binding starts the build on a background thread; steps
  use the Python twins until it is ready (no step waits for a compiler);
- ``wait``: the first binding builds (or loads) them before it returns;
- ``off`` (or ``0``): never; the Python twins always.

The variable is read when a binding is made; helpers already loaded in the process stay in use.

``build()`` builds them now and waits (``fastewc info`` and the benchmarks call it), and
``host_helpers_status()`` says why they are not in use.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
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
_MODES = {"": "background", "background": "background", "wait": "wait", "off": "off", "0": "off"}

_lock = threading.Lock()
_module: ModuleType | None = None  # the loaded helpers; read without the lock on every step
_why: str | None = "not built yet"  # why _module is None
_thread: threading.Thread | None = None  # a build running in the background
_started_in: int | None = None  # the process that started a build (a forked child starts its own)


def mode() -> str:
    """``background``, ``wait`` or ``off``, from ``FASTEWC_HOST_HELPERS``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _MODES:
        raise EWCInputError(f"unknown {ENV} {os.environ.get(ENV)!r}; expected 'background', 'wait' or 'off'")
    return _MODES[value]


def loaded() -> ModuleType | None:
    """The helpers if they are loaded, else None; None as well while torch.compile traces (it
    cannot trace a foreign function and would warn; the Python twins break its graph quietly).
    Never builds: the per-step call."""
    if _module is None or torch.compiler.is_compiling():
        return None
    return _module


def helpers() -> ModuleType | None:
    """The helpers, starting their build if none was started in this process (see the module
    docstring for when it waits); None while they are not available."""
    if _module is not None or mode() == "off":
        return _module
    if _started_in != os.getpid():
        if mode() == "wait":
            return build()
        _start()
    return _module


def build() -> ModuleType | None:
    """Build (or load from the cache) the helpers now and wait for them; None if they cannot be
    had (``host_helpers_status()`` says why)."""
    global _started_in
    if _module is not None or mode() == "off":
        return _module
    thread = None
    with _lock:
        if _thread is not None and _started_in == os.getpid() and _thread.is_alive():
            thread = _thread
        elif _module is None:
            _started_in = os.getpid()
            _set(*_build())
    if thread is not None:
        thread.join()
    return _module


def host_helpers_status() -> str | None:
    """None when the helpers are in use; otherwise why not (disabled, still building, or the
    build's failure)."""
    if _module is not None:
        return None
    if mode() == "off":
        return f"disabled by {ENV}={os.environ.get(ENV)}"
    if _thread is not None and _thread.is_alive():
        return "still building in the background (build() waits for it)"
    return _why


def _start() -> None:
    global _thread, _started_in
    with _lock:
        if _started_in == os.getpid() or _module is not None:
            return
        _started_in = os.getpid()
        _thread = threading.Thread(target=lambda: _set(*_build()), name="fastewc-host-build", daemon=True)
        _thread.start()


def _set(module: ModuleType | None, why: str | None) -> None:
    global _module, _why
    _module, _why = module, why


def source_path() -> Path:
    """The C++ source shipped in the installed package (``fastewc/kernels/host_cpu.cpp``)."""
    return kernel_source(SOURCE_NAME)


def _build() -> tuple[ModuleType | None, str | None]:
    """(the loaded, self-tested module, None) or (None, why not)."""
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
    path = folder / f"{name}.so"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return None, f"cannot create the cache folder {folder} ({e}); set FASTEWC_CACHE_DIR"
        cmd = [*cxx, *FLAGS, abi, f"-DTORCH_EXTENSION_NAME={name}", *(f"-I{p}" for p in includes),
               f"-I{python_include}", str(source_path()), *(f"-L{p}" for p in libraries),
               *(f"-Wl,-rpath,{p}" for p in libraries), "-lc10", "-ltorch_cpu", "-ltorch_python"]
        why = build_once(cmd, path, check=lambda built: check_in_child(built, name))
        if why is not None:
            return None, f"the host helpers could not be built: {why}"
    try:
        module = load(path, name)
    except Exception as e:  # ImportError, OSError: a library that does not load here
        return None, f"cannot load {path}: {e}"
    try:
        why = self_test(module)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        return None, f"{path} failed its self-test ({why}); the Python twins are used"
    return module, None


def load(path: Path, name: str) -> ModuleType:
    """Import the built library at ``path`` (any file name) as the module ``name``."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


_CHILD_CHECK = """
import sys
from fastewc.penalty.backends import host
why = host.self_test(host.load(sys.argv[1], sys.argv[2]))
print(why or "ok")
"""


def check_in_child(path: Path, name: str) -> str | None:
    """Load a freshly built library in a child Python and run ``self_test`` there, before it
    enters the cache: a library that does not fit this torch would crash the process that loads
    it, and that must not be the user's. None when the child answers "ok", else what went wrong."""
    if not sys.executable:
        return None  # an embedded interpreter: the in-process self-test after loading still runs
    import fastewc

    roots = [str(Path(fastewc.__file__).resolve().parent.parent), str(Path(torch.__file__).resolve().parent.parent)]
    env = {**os.environ, ENV: "off", "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD_CHECK, str(path), name], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"its self-test in a child process did not run ({e})"
    answer = done.stdout.strip().splitlines()[-1:] or [""]
    if done.returncode == 0 and answer == ["ok"]:
        return None
    detail = answer[0] if done.returncode == 0 else f"exit status {done.returncode}: {done.stderr.strip()[-300:]}"
    return f"the library built fails its self-test in a child process ({detail}); it is not cached"


def build_once(cmd: list[str], path: Path, stale_after: float = BUILD_TIMEOUT, poll: float = 0.5,
               check: Callable[[Path], str | None] | None = None) -> str | None:
    """Build ``path`` unless another process is building it already: the ranks of a distributed
    job start at once, and each compiler run takes seconds of CPU and hundreds of MB. The first
    to create ``<path>.lock`` builds; the others wait for the library to appear (or for the lock
    to go, then build themselves: that build failed or its process died). A lock older than
    ``stale_after`` seconds is taken to be left by a dead process. ``check``: as in
    ``native.compile_into``. None on success, else why not."""
    lock = path.with_name(path.name + ".lock")
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > stale_after:
                    lock.unlink(missing_ok=True)
            except OSError:
                pass  # gone meanwhile
            time.sleep(poll)
            continue
        except OSError as e:
            return f"cannot create {lock} ({e}); set FASTEWC_CACHE_DIR"
        os.close(fd)
        try:
            return None if path.exists() else compile_into(cmd, path, timeout=BUILD_TIMEOUT, check=check)
        finally:
            lock.unlink(missing_ok=True)
    return None


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
