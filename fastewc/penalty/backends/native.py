"""Building native code on the user's machine: where builds are cached, which compiler, and an
atomic build.

Two things are compiled at first use and cached: the fused CPU kernel (``quadratic_cpu.c``,
``cpu_backend``) and the per-step host helpers (``host_cpu.cpp``, ``host``). Both are named by a
hash of everything the binary depends on, so a cache shared between machines or Python / torch
installations never loads a binary built for another.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "c_compiler", "compile_into", "compiler_version", "cpu_features", "cxx_compiler",
           "kernel_source"]


def kernel_source(name: str) -> Path:
    """A source file shipped in the installed package ``fastewc.kernels`` (found without
    importing that package). Raises ``FileNotFoundError`` when the package is not installed."""
    spec = importlib.util.find_spec("fastewc.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package fastewc.kernels is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / name


def cache_dir() -> Path:
    """Where built libraries are kept: ``$FASTEWC_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastewc``,
    else ``~/.cache/fastewc``."""
    env = os.environ.get("FASTEWC_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastewc"


def _find(variable: str, names: tuple[str, ...]) -> list[str] | None:
    chosen = os.environ.get(variable)
    if chosen:
        return shlex.split(chosen)
    for name in names:
        found = shutil.which(name)
        if found:
            return [found]
    return None


def c_compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else the first of cc, gcc, clang on the PATH; None if none."""
    return _find("CC", ("cc", "gcc", "clang"))


def cxx_compiler() -> list[str] | None:
    """The C++ compiler command: ``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    return _find("CXX", ("c++", "g++", "clang++"))


def compiler_version(cmd: list[str]) -> str:
    """What ``cmd --version`` prints (part of every cache key). Raises ``OSError`` (or
    ``subprocess.TimeoutExpired``) when the compiler does not run."""
    return subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60).stdout


def cpu_features() -> str:
    """The CPU's instruction-set flags (what ``-march=native`` depends on), for cache keys."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compile_into(cmd: list[str], out: Path, timeout: float = 300,
                 check: Callable[[Path], str | None] | None = None) -> str | None:
    """Run ``cmd -o <temporary file>`` and rename the result to ``out``; None on success, else
    the command and the compiler's complaint. Concurrent builds of the same ``out`` (DDP ranks,
    threads) each write their own temporary file; the rename is atomic, so a reader never sees
    a half-written library. ``check(temporary file)``, if given, runs before the rename: what it
    returns (None: fine) keeps a library that fails it out of the cache."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    full = [*cmd, "-o", str(tmp)]
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        tmp.unlink(missing_ok=True)
        return f"{shlex.join(full)} failed: {e}"
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        return f"{shlex.join(full)} exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
    why = check(tmp) if check is not None else None
    if why is not None:
        tmp.unlink(missing_ok=True)
        return why
    os.replace(tmp, out)
    return None
