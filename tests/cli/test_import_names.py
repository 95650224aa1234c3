"""Nothing of this repository shadows an installed package when its root is on ``sys.path``.

``python -m pytest``, ``python script.py`` and ``python -c`` from the repository root put the root
first on ``sys.path``. A top-level folder with an ``__init__.py`` is then imported instead of an
installed distribution of the same name: Hugging Face's ``kernels`` package (required by
transformers 5) was hidden that way by a top-level ``kernels/`` folder. The source tree keeps
every importable package under ``fastewc/``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Top-level folders that may hold Python files without being packages of ours.
NOT_PACKAGES = {"tests", "benchmarks", "examples", "docs", "build", "dist"}


def test_only_fastewc_is_importable_from_the_root():
    importable = sorted(p.name for p in ROOT.iterdir()
                        if p.is_dir() and (p / "__init__.py").exists() and p.name not in NOT_PACKAGES)
    assert importable == ["fastewc"], importable
    modules = sorted(p.name for p in ROOT.glob("*.py") if p.name != "setup.py")
    assert modules == [], f"top-level modules would shadow installed ones: {modules}"


def test_transformers_and_fastewc_kernels_import_from_the_root():
    # As a user runs a script from a clone: the root first on sys.path, with the newest
    # transformers (which imports Hugging Face's `kernels` distribution when it is installed).
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install 'fastewc[hf]')")
    probe = textwrap.dedent("""
        import importlib.util, sys
        from transformers import Trainer
        import fastewc.kernels
        spec = importlib.util.find_spec("kernels")
        print(fastewc.kernels.__file__)
        print(spec.origin if spec is not None else "none")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, theirs = r.stdout.strip().splitlines()[-2:]
    assert Path(ours).resolve() == ROOT / "fastewc" / "kernels" / "__init__.py"
    # Hugging Face's package, where installed, is the one `import kernels` finds; never a folder here.
    assert theirs == "none" or not Path(theirs).resolve().is_relative_to(ROOT), theirs
