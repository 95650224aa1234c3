"""One C source of ``fastewc/kernels/`` built for this machine and loaded: the first set of
compiler flags that builds wins.

The source is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``)
through ``build.py``'s verified cache, in the calling process. A kernel offers its flag sets in
order of preference (``-march=native`` and ``-fopenmp`` first, where it uses them): some
compilers or CPUs have neither, and a set that fails to build is remembered and not retried.
Nothing here raises for a missing or broken compiler: ``Library.why`` says what went wrong and
the kernel's module takes its PyTorch twin.
"""

from __future__ import annotations

import ctypes
import platform
import shlex
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .build import build_library, c_compiler, compiler_version, cpu_features, key_of, kernel_source

__all__ = ["BASE_FLAGS", "NATIVE", "OPENMP", "Library", "ProcessCopy", "load_library"]

BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno")
NATIVE = "-march=native"
OPENMP = "-fopenmp"


@dataclass
class Library:
    """A loaded library (None where it could not be had, ``why`` saying why), its cached file
    (None when built in a temporary folder) and the flags it was built with."""

    lib: ctypes.CDLL | None
    why: str | None
    path: Path | None
    flags: tuple[str, ...] = ()


def load_library(source_name: str, declare: Callable[[ctypes.CDLL], None], flag_sets: Sequence[tuple[str, ...]], *,
                 cc: list[str] | None = None, folder: Path | None = None, features: str | None = None,
                 force: bool = False) -> Library:
    """Build (or find in the cache) ``fastewc/kernels/<source_name>`` with the first of
    ``flag_sets`` that builds and loads, and ``declare`` its functions. ``cc``, ``folder``,
    ``features``: the compiler command, cache folder and CPU flags to use instead of this
    machine's (tests); ``force``: retry builds that failed before."""
    what = Path(source_name).stem
    if platform.system() == "Windows":
        return Library(None, f"the CPU kernel {source_name} is built with a Unix C compiler; not supported on "
                             "Windows", None)
    try:
        src = kernel_source(source_name)
        code = src.read_bytes()
    except OSError as e:
        return Library(None, f"the kernel source {source_name} is missing from this installation ({e})", None)
    cc = c_compiler() if cc is None else cc
    if cc is None:
        return Library(None, "no C compiler found (set CC, or install cc, gcc or clang)", None)
    try:
        version = compiler_version(cc)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Library(None, f"the C compiler {shlex.join(cc)} does not run: {e}", None)
    features = cpu_features() if features is None else features
    errors = []
    for flags in flag_sets:
        native = NATIVE in flags  # the binary depends on the CPU only when built for it
        key = key_of(code, version.encode(), " ".join(flags).encode(), platform.machine().encode(),
                     features.encode() if native else b"")
        built = build_library(f"{what}-{key}", [*cc, *flags, str(src)], folder=folder, force=force)
        if built.path is None:
            errors.append(built.why)
            continue
        cached = built.path if built.temporary is None else None
        try:
            lib = ctypes.CDLL(str(built.path))
            declare(lib)
        except (OSError, AttributeError) as e:
            errors.append(f"cannot load {built.path}: {e}")
            continue
        finally:
            built.cleanup()
        return Library(lib, None, cached, tuple(flags))
    return Library(None, f"the CPU kernel {source_name} could not be built: " + " | ".join(errors), None)


class ProcessCopy:
    """A process's one loaded copy of a kernel: ``get()`` loads it at the first call (``load(force)``)
    and returns the same copy after that; ``get(force=True)`` loads it again when the copy it holds
    could not be had (``usable(copy)`` false), retrying a build that failed (``fastewc info``).
    ``value``: the copy held, None before the first call."""

    def __init__(self, load: Callable[[bool], object], usable: Callable[[object], bool]):
        self._load, self._usable = load, usable
        self._lock = threading.Lock()
        self.value = None

    def get(self, force: bool = False):
        if self.value is not None and not force:
            return self.value  # the common case, asked at every call of a kernel: no lock taken
        with self._lock:
            if self.value is None or (force and not self._usable(self.value)):
                self.value = self._load(force)
            return self.value
