"""The wheel is complete: build it from this source tree, install it (no ``-e``) into a fresh
virtual environment, and import every public module from there.

An editable install and the test suite both import from the source tree, so they cannot show a
package missing from the wheel. This test builds the wheel the way ``pip install .`` does
(``pip wheel --no-deps --no-build-isolation``), installs it with ``--no-deps``, and imports the
public modules in a subprocess whose working directory is outside the repository, then checks
that every module was loaded from the virtual environment.

Isolation. The environment running the tests usually has fastewc installed in editable mode, and
setuptools' editable finder (installed by a ``.pth`` file in site-packages) serves any
``fastewc.*`` module that the normal path search does not find, from the source tree. A venv made
with ``--system-site-packages`` would therefore hide a subpackage missing from the wheel. So the
venv is made without system site packages, and one ``.pth`` file adds the folder that holds torch
(and the other installed libraries) to ``sys.path``: a folder added that way is searched, but its
own ``.pth`` files are not run, so the editable finder never loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

PUBLIC = [
    "fastewc", "fastewc.fisher", "fastewc.penalty", "fastewc.penalty.backends", "fastewc.kernels",
    "fastewc.bench", "fastewc.demo", "fastewc.cli",
    "fastewc.integrations.transformers", "fastewc.integrations.lightning",
]
# Module -> (the package its extra installs, the extra). Without that package the module cannot
# be imported by design; its test skips and says which extra brings it.
EXTRAS = {
    "fastewc.integrations.transformers": ("transformers", "hf"),
    "fastewc.integrations.lightning": ("lightning", "lightning"),
}

# Run inside the venv: import each module, or say why an integration is left out.
_PROBE = textwrap.dedent("""
    import importlib, importlib.util, json, sys
    mods, extras = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}
    for m in mods:
        if m in extras and importlib.util.find_spec(extras[m][0]) is None:
            out[m] = {"skip": f"{extras[m][0]} is not installed (pip install 'fastewc[{extras[m][1]}]')"}
            continue
        try:
            out[m] = {"file": importlib.import_module(m).__file__}
        except Exception as e:
            out[m] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
""")

# Build outputs and caches that must not travel into the build copy.
_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 ".benchmarks", ".whl", ".venv", "venv", "*.pyc")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, venv python, {module: result of importing it inside the venv})."""
    for need in ("pip", "setuptools"):
        if importlib.util.find_spec(need) is None:
            pytest.skip(f"{need} is not installed: the wheel cannot be built without build isolation")
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build writes build/ and *.egg-info/ into the repository, and
    # setuptools reuses a stale build/lib, which can put files in the wheel that the tree lacks.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
          "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("fastewc-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_outside.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    # pip comes from that folder too; --ignore-installed: the editable install's metadata is
    # visible there and must not count as "already installed".
    _run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-cache-dir", "-q",
          str(wheel)])
    outside = tmp / "elsewhere"  # a working directory from which the source tree is not importable
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    r = _run([str(py), "-c", _PROBE, json.dumps(PUBLIC), json.dumps(EXTRAS)], cwd=outside, env=env)
    return wheel, venv, site, json.loads(r.stdout.strip().splitlines()[-1])


def test_wheel_holds_every_source_file(installed):
    wheel = installed[0]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    want = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastewc").rglob("*.py") if "__pycache__" not in p.parts}
    want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastewc" / "kernels").glob("*.c")}
    assert {"fastewc/kernels/__init__.py", "fastewc/kernels/quadratic_cpu.c", "fastewc/integrations/__init__.py"} <= want
    missing = sorted(want - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names), sorted(names)


@pytest.mark.parametrize("module", PUBLIC)
def test_public_module_imports_from_the_wheel(installed, module):
    _, venv, site, results = installed
    got = results[module]
    if "skip" in got:
        pytest.skip(got["skip"])
    assert "error" not in got, f"import {module} from the installed wheel: {got['error']}"
    where = Path(got["file"]).resolve()
    assert where.is_relative_to(site.resolve()), f"{module} was imported from {where}, not from the venv {venv}"


_CPU_PROBE = textwrap.dedent("""
    import torch
    from fastewc import EWCRegularizer
    from fastewc.penalty.backends.cpu_backend import source_path
    model = torch.nn.Linear(5, 3)
    ewc = EWCRegularizer(2.0, backend="cpu")
    ewc.register_task({n: torch.ones_like(p) for n, p in model.named_parameters()},
                      {n: p.detach() - 1 for n, p in model.named_parameters()})
    print(source_path(), float(ewc(model)), ewc.active_backends)
""")


def test_cpu_kernel_builds_from_the_wheel(installed, tmp_path):
    # The C source must ship in the wheel and build from there (into an empty cache folder),
    # wherever it builds from the source tree.
    import fastewc.penalty.backends as backends

    why = backends.cpu_backend_status(torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    _, venv, site, _ = installed
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "FASTEWC_BACKEND")}
    env["FASTEWC_CACHE_DIR"] = str(tmp_path / "cache")
    out = _run([str(py), "-c", _CPU_PROBE], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1].split()
    assert Path(out[0]).resolve().is_relative_to(site.resolve()), out
    assert float(out[1]) == pytest.approx(18.0)  # (2 / 2) * 18 parameters * 1 * 1^2
    assert "cpu" in out[2]
    assert list((tmp_path / "cache").glob("quadratic_cpu-*.so"))
