"""Compiling a C source into a cache of shared libraries that is checked before every load.

A library is cached as ``<name>-<key>.so``, where ``key`` hashes everything the binary depends
on (source, compiler, flags, CPU), so a cache shared between machines or installations never
serves a library built for another. Beside it:

* ``<name>-<key>.json``: its size and SHA-256, written when it was built. A library is loaded
  only when it matches them: a truncated or replaced file is never mapped into the process (a
  truncated library kills the process with SIGBUS when a page past its end is touched), it is
  rebuilt in place.
* ``<name>-<key>.failed``: the compiler's message when the build failed. It is not retried until
  the key changes (another source or compiler) or the caller forces it (``fastewc info``): a
  compiler that fails fails again, and every process would pay for it.

Builds take an OS file lock on ``.lock`` in the cache folder (``fcntl.flock``). The kernel
releases it when its holder dies, whatever the PID namespace, so no lock outlives a killed
process, and concurrent processes (the ranks of a job) build once: the others wait and load
the result. Whoever holds the lock may delete any ``*.tmp`` file in the folder: every writer
holds the lock, so those are left by processes killed mid-build.

Every ``OSError`` on the cache folder (read-only, full, not ours) makes the build run in a
temporary folder of this process instead, removed once the library is loaded, with one warning.
Nothing here starts a process that outlives the call.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .._utils import write_atomically

__all__ = ["Built", "build_library", "cache_dir", "c_compiler", "compiler_version", "cpu_features", "key_of",
           "kernel_source"]

COMPILE_TIMEOUT = 300  # seconds one compiler run may take
LOCK_TIMEOUT = 2 * COMPILE_TIMEOUT  # seconds to wait for another process's build
_told_temporary = False  # the fallback to a temporary folder is announced once per process
_told_lock = threading.Lock()


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


def c_compiler() -> list[str] | None:
    """The C compiler command: ``$CC``, else the first of cc, gcc, clang on the PATH; None if none."""
    chosen = os.environ.get("CC")
    if chosen:
        return shlex.split(chosen)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


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


@dataclass
class Built:
    """The outcome of ``build_library``: the library's file (None when it could not be had), why
    not, and whether it lives in a temporary folder that the caller removes once it is loaded."""

    path: Path | None
    why: str | None = None
    temporary: Path | None = None

    def cleanup(self) -> None:
        """Remove the temporary folder (a loaded library stays mapped after its file is gone)."""
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _verified(lib: Path, meta: Path) -> bool:
    """Whether ``lib`` is the file recorded in ``meta`` (size, then SHA-256)."""
    try:
        want = json.loads(meta.read_text())
        if lib.stat().st_size != want["size"]:
            return False
        return _digest(lib) == (want["size"], want["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(folder: Path, timeout: float) -> Iterator[None]:
    """Hold the folder's build lock (``OSError`` if it cannot be opened; ``TimeoutError`` after
    ``timeout`` seconds of another holder)."""
    import fcntl

    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {folder / '.lock'} for over {timeout:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete ``*.tmp`` entries, the private folders ``write_atomically`` writes in (called with the
    lock held: no live writer has one open)."""
    for tmp in folder.glob("*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()


class _CompileFailed(Exception):
    """The compiler could not be run or refused the source (the message says which)."""


def _compile(cmd: list[str], out: Path, timeout: float) -> str | None:
    """Run ``cmd -o <temporary file>`` and put the result at ``out`` atomically and flushed to
    disk (before its checksum is recorded); None on success, else the command and the
    compiler's complaint."""
    def build(tmp) -> None:
        full = [*cmd, "-o", str(tmp)]
        try:
            done = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _CompileFailed(f"{shlex.join(full)} failed: {e}") from e
        if done.returncode != 0:
            raise _CompileFailed(f"{shlex.join(full)} exited with {done.returncode}: "
                                 f"{(done.stderr or done.stdout).strip()[-500:]}")

    try:
        write_atomically(out, build)
    except _CompileFailed as e:
        return str(e)
    return None


def _build_in(folder: Path, stem: str, cmd: list[str], force: bool, timeout: float) -> Built:
    """Find or build ``stem.so`` in ``folder`` (see the module docstring). Raises ``OSError``
    when the folder cannot be written where it has to be."""
    lib, meta, failed = (folder / f"{stem}{ext}" for ext in (".so", ".json", ".failed"))
    if _verified(lib, meta):  # read-only: a prebuilt cache on a read-only mount serves as it is
        return Built(lib)
    if not force and failed.exists():
        return Built(None, f"an earlier build failed (remembered in {failed}; `fastewc info` retries): "
                           f"{failed.read_text(errors='replace').strip()}")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder, LOCK_TIMEOUT):
        _remove_stale_temporaries(folder)
        if _verified(lib, meta):  # another process built it while this one waited
            return Built(lib)
        if failed.exists():
            if not force:
                return Built(None, f"an earlier build failed (remembered in {failed}): "
                                   f"{failed.read_text(errors='replace').strip()}")
            failed.unlink()
        why = _compile(cmd, lib, timeout)
        if why is not None:
            write_atomically(failed, lambda tmp: Path(tmp).write_text(why))
            return Built(None, why)
        size, sha = _digest(lib)
        record = json.dumps({"size": size, "sha256": sha, "command": shlex.join(cmd)})
        write_atomically(meta, lambda tmp: Path(tmp).write_text(record))
        return Built(lib)


def _warn_temporary(folder: Path, error: BaseException) -> None:
    global _told_temporary
    with _told_lock:
        if _told_temporary:
            return
        _told_temporary = True
    warnings.warn(f"fastewc: cannot use the kernel cache folder {folder} ({error}); the CPU kernels are built "
                  "in a temporary folder for this process instead. Set FASTEWC_CACHE_DIR to a writable "
                  "folder to build it once.", RuntimeWarning, stacklevel=4)


def build_library(stem: str, cmd: list[str], *, folder: Path | None = None, force: bool = False,
                  timeout: float = COMPILE_TIMEOUT) -> Built:
    """The shared library ``<stem>.so`` built by ``cmd`` (a compiler command, to which
    ``-o <file>`` is appended), from the cache in ``folder`` (default ``cache_dir()``) or built
    into it; on any ``OSError`` of that folder, built in a temporary folder instead (one warning).
    ``force``: retry a build that failed before. Never raises for a build problem: ``Built.why``
    says what went wrong."""
    folder = cache_dir() if folder is None else folder
    try:
        return _build_in(folder, stem, cmd, force, timeout)
    except TimeoutError as e:
        return Built(None, str(e))
    except OSError as e:  # read-only, full, not ours, no file locks: build privately
        _warn_temporary(folder, e)
    try:
        private = Path(tempfile.mkdtemp(prefix="fastewc-build-"))
    except OSError as e:
        return Built(None, f"cannot create a temporary build folder ({e})")
    try:
        built = _build_in(private, stem, cmd, True, timeout)
    except (OSError, TimeoutError) as e:
        built = Built(None, f"building in {private} failed: {e}")
    if built.path is None:
        shutil.rmtree(private, ignore_errors=True)
        return built
    built.temporary = private
    return built


def key_of(*parts: bytes) -> str:
    """A short hash of everything a library depends on (its cache name)."""
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
