"""Building the fused CPU kernel never surprises: what a damaged cache, a failing compiler, a
killed or concurrent build and an unwritable folder lead to (``fastewc.native``, through the penalty kernel).

Every case that could crash the interpreter (loading a damaged library) runs in a child process.
Compilers are injected as small shell scripts that log each compile and then run the real one,
so a test can count builds.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastewc.native import build as B
from fastewc.penalty.native import quadratic as Q

REAL_CC = B.c_compiler()
pytestmark = pytest.mark.skipif(REAL_CC is None or sys.platform == "win32", reason="needs a C compiler (Unix)")
FEATURES = "flags: test"  # a fixed CPU key, so every test builds into its own folder only


def _compiler(tmp_path: Path, *, fail: bool = False, sleep: float = 0.0, version: str = "") -> tuple[list[str], Path]:
    """A compiler script that appends a line to its log per compile (not per ``--version``)."""
    log = tmp_path / "compiles.log"
    script = tmp_path / f"cc-{len(list(tmp_path.glob('cc-*')))}"
    body = f'''#!/bin/sh
if [ "$1" = "--version" ]; then {shutil.which(REAL_CC[0])} --version; echo "{version}"; exit 0; fi
echo "$$" >> "{log}"
'''
    if fail:
        body += 'echo "error: this compiler always fails" >&2; exit 1\n'
    elif sleep:
        # Writes part of the output, then waits: a build killed here leaves a temporary file.
        body += f'for a in "$@"; do last="$a"; done; head -c 1000 /dev/zero > "$last"; sleep {sleep}\n'
    else:
        body += f'exec {" ".join(REAL_CC)} "$@"\n'
    script.write_text(body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)], log


def _compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


_CHILD = textwrap.dedent("""
    import json, sys, warnings
    from pathlib import Path
    from fastewc.penalty.native import quadratic as Q
    cc, folder, force = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = Q.load(cc=cc, folder=folder, features="flags: test", force=force)
    ok = k.lib is not None and k.lib.ewc_quadratic_f32_f32 is not None
    print(json.dumps({"ok": ok, "why": k.why, "path": str(k.path), "warnings": [str(w.message) for w in caught]}))
""")


def _child(cc, folder: Path, force: bool = False, timeout: float = 120) -> dict:
    import json

    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cc), str(folder), "1" if force else "0"],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"the child died ({r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _libraries(folder: Path) -> list[Path]:
    return sorted(folder.glob("quadratic_cpu-*.so"))


def test_a_fresh_build_is_cached_with_its_checksum_and_loaded_without_rebuilding(tmp_path):
    cc, log = _compiler(tmp_path)
    k = Q.load(cc=cc, folder=tmp_path / "cache", features=FEATURES)
    assert k.why is None and k.path.is_file() and k.path.with_suffix(".json").is_file()
    assert _compiles(log) == 1
    again = Q.load(cc=cc, folder=tmp_path / "cache", features=FEATURES)
    assert again.path == k.path and _compiles(log) == 1


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "another library"])
def test_a_damaged_cached_library_is_rebuilt_in_place_not_loaded(tmp_path, damage):
    cc, log = _compiler(tmp_path)
    folder = tmp_path / "cache"
    first = _child(cc, folder)
    lib = Path(first["path"])
    good = lib.read_bytes()
    if damage == "truncated":
        os.truncate(lib, min(17000, len(good) // 2))
    elif damage == "empty":
        lib.write_bytes(b"")
    elif damage == "random bytes":
        lib.write_bytes(os.urandom(len(good)))
    else:  # a valid shared library without the kernel's functions
        src = tmp_path / "other.c"
        src.write_text("int other(void) { return 1; }\n")
        subprocess.run([*REAL_CC, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, timeout=120)
    got = _child(cc, folder)
    assert got["ok"] and got["path"] == str(lib), got
    assert lib.read_bytes() == good or lib.stat().st_size == len(good)  # rebuilt, same place
    assert _libraries(folder) == [lib] and not list(folder.glob("*.tmp"))
    assert _compiles(log) == 2


def test_a_failed_build_is_remembered_until_forced_or_the_compiler_changes(tmp_path):
    folder = tmp_path / "cache"
    bad, log = _compiler(tmp_path, fail=True)
    k = Q.load(cc=bad, folder=folder, features=FEATURES)
    assert k.lib is None and "this compiler always fails" in k.why
    tried = _compiles(log)  # with and without -march=native
    assert tried == 2 and len(list(folder.glob("*.failed"))) == 2
    k = Q.load(cc=bad, folder=folder, features=FEATURES)
    assert _compiles(log) == tried and "an earlier build failed" in k.why and "always fails" in k.why
    Q.load(cc=bad, folder=folder, features=FEATURES, force=True)  # `fastewc info` retries
    assert _compiles(log) == 2 * tried
    fixed, _ = _compiler(tmp_path, version="another version")  # a new compiler: a new key
    k = Q.load(cc=fixed, folder=folder, features=FEATURES)
    assert k.why is None and k.lib is not None


def test_a_build_killed_midway_leaves_nothing_that_the_next_build_keeps(tmp_path):
    folder = tmp_path / "cache"
    slow, _ = _compiler(tmp_path, sleep=60)
    import json

    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(slow), str(folder), "0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(folder.glob("*.tmp")), "the build never started"
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its compiler, as kill -9 of a job would
        child.wait()
    assert list(folder.glob("*.tmp"))
    cc, _ = _compiler(tmp_path)
    start = time.monotonic()
    got = _child(cc, folder)  # the dead holder's lock is gone with it: no wait
    assert got["ok"] and time.monotonic() - start < 60
    assert not list(folder.glob("*.tmp"))


def test_a_lock_file_left_behind_does_not_make_a_build_wait(tmp_path):
    # The old lock files named a PID, which in another PID namespace may exist on this host; an
    # OS file lock is held by an open file, not by a name in it.
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / ".lock").write_text(f"otherhost {os.getpid()}\n")
    cc, _ = _compiler(tmp_path)
    start = time.monotonic()
    k = Q.load(cc=cc, folder=folder, features=FEATURES)
    assert k.why is None and time.monotonic() - start < 30


def test_a_live_holder_makes_the_build_wait_then_load_its_result(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(1.5)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cc, log = _compiler(tmp_path)
        start = time.monotonic()
        k = Q.load(cc=cc, folder=folder, features=FEATURES)
        waited = time.monotonic() - start
    finally:
        holder.wait(30)
    assert k.why is None and waited >= 0.5 and _compiles(log) == 1


def test_four_processes_at_once_build_once(tmp_path):
    import json

    folder = tmp_path / "cache"
    cc, log = _compiler(tmp_path)
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cc), str(folder), "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [c.communicate(timeout=300) for c in children]
    assert all(c.returncode == 0 for c in children), [o[1][-500:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert all(r["ok"] for r in results) and len({r["path"] for r in results}) == 1
    assert _compiles(log) == 1 and len(_libraries(folder)) == 1


def test_an_unwritable_cache_folder_builds_in_a_temporary_folder_with_one_warning(tmp_path):
    # A plain file where the folder should be: every write under it fails with an OSError, as on
    # a read-only mount (as root, permission bits would not stop the writes).
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    cc, _ = _compiler(tmp_path)
    got = _child(cc, blocked / "cache")
    assert got["ok"] and got["path"] == "None", got  # no cached file: it lived in a temporary folder
    assert len(got["warnings"]) == 1 and "cannot use the kernel cache folder" in got["warnings"][0]
    assert "FASTEWC_CACHE_DIR" in got["warnings"][0]


def test_a_prebuilt_cache_is_used_without_writing_to_it(tmp_path):
    folder = tmp_path / "cache"
    cc, log = _compiler(tmp_path)
    first = _child(cc, folder)
    # The lock cannot even be opened now (a folder in its place), as in a read-only cache: a
    # verified library is loaded without taking it.
    (folder / ".lock").unlink()
    (folder / ".lock").mkdir()
    got = _child(cc, folder)
    assert got["ok"] and got["path"] == first["path"] and got["warnings"] == [] and _compiles(log) == 1
    # A damaged library there cannot be rebuilt in place: built in a temporary folder instead.
    Path(first["path"]).write_bytes(b"\0" * 100)
    got = _child(cc, folder)
    assert got["ok"] and got["path"] == "None" and len(got["warnings"]) == 1, got


def test_quick_start_leaves_no_process_and_no_resource_warning(tmp_path):
    # The README's quick start, under Python's development mode with ResourceWarning as an
    # error (a subprocess still running at exit is one), with an empty kernel cache.
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    code = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "quick.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTEWC_BACKEND")}
    env["FASTEWC_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", str(script)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ResourceWarning" not in r.stderr
    assert _libraries(tmp_path / "cache") and not list((tmp_path / "cache").glob("*.tmp"))


def test_the_process_copy_loads_once_and_again_only_when_forced_after_a_failure():
    from fastewc.native.library import ProcessCopy

    loads = []
    outcomes = iter(["failed", "built", "rebuilt"])
    copy = ProcessCopy(lambda force: loads.append(force) or next(outcomes), lambda v: v != "failed")
    assert copy.value is None
    assert copy.get() == "failed" and copy.get() == "failed" and loads == [False]   # kept, not retried
    assert copy.get(force=True) == "built" and loads == [False, True]              # `fastewc info` retries
    assert copy.get(force=True) == "built" and loads == [False, True]              # a usable copy stays
