"""The fused CPU kernel's library (``fastewc/kernels/quadratic_cpu.c``): built, loaded, declared.

The first time a process asks for it, the source is compiled with the system C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) for this machine's CPU (``-O3 -march=native``; one
small C file; without ``-march=native`` where the compiler or CPU has none) through ``fastewc.native``'s
verified cache, in the calling process. Without a working compiler ``status()`` says why and
``backend="auto"`` takes the PyTorch backend instead.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from ...native.build import kernel_source
from ...native.library import BASE_FLAGS, NATIVE, Library, ProcessCopy, load_library

__all__ = ["SOURCE_NAME", "SUFFIX", "load", "library", "library_path", "source_path", "status"]

SOURCE_NAME = "quadratic_cpu.c"
# torch dtype name -> the suffix of the kernel functions for it (``ewc_quadratic_<param>_<storage>``).
SUFFIX = {"float32": "f32", "bfloat16": "bf16"}


def source_path() -> Path:
    """The C source shipped in the installed package (``fastewc/kernels/quadratic_cpu.c``)."""
    return kernel_source(SOURCE_NAME)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for p in SUFFIX.values():
        for s in SUFFIX.values():
            fn = getattr(lib, f"ewc_quadratic_{p}_{s}")
            fn.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, ptr]
            fn.restype = None


def load(*, cc: list[str] | None = None, folder: Path | None = None, features: str | None = None,
         force: bool = False) -> Library:
    """Build (or find in the cache) and load the kernel. ``cc``, ``folder``, ``features``: the
    compiler command, cache folder and CPU flags to use instead of this machine's (tests);
    ``force``: retry builds that failed before."""
    return load_library(SOURCE_NAME, _declare, [(*BASE_FLAGS, NATIVE), BASE_FLAGS], cc=cc, folder=folder, features=features,
                        force=force)


# This process's kernel, loaded at the first call of library().
_process = ProcessCopy(lambda force: load(force=force), lambda k: k.lib is not None)


def library(*, force: bool = False) -> ctypes.CDLL | None:
    """This process's kernel library (built or loaded on the first call), or None. ``force``:
    build again now, retrying a build that failed (``fastewc info``)."""
    return _process.get(force).lib


def library_path() -> Path | None:
    """The cached file of the loaded library (None when there is none, or it was built in a
    temporary folder)."""
    return _process.get().path


def status() -> str | None:
    """None when the fused CPU kernel is available; otherwise the reason it is not."""
    return _process.get().why
