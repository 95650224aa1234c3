"""pytest-benchmark suites: ``python -m pytest benchmarks --benchmark-enable``.

The default test run collects these with ``--benchmark-disable`` (pyproject addopts): every case
runs once, untimed, as a smoke test. Options:

* ``--bench-device cpu|cuda`` (default: cuda when available);
* ``--bench-compile``: also time ``torch.compile`` of the reference loop (long compiles);
* ``--bench-sizes 1e6,25e6``: penalty sizes in parameters;
* ``--bench-fisher-samples 512``: samples per Fisher estimate (12 when untimed, to keep the smoke
  run short).

With timing enabled and no ``--benchmark-json``, the report goes to
``benchmarks/results/<machine>/pytest-benchmark.json``; the machine description there gains the
torch / triton versions and the GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastewc.bench import timing
from results_path import results_path

# the test suite's helpers (tests/models.py: assert_fisher_close) serve the benchmark checks too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def pytest_addoption(parser):
    g = parser.getgroup("fastewc benchmarks")
    g.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.addoption("--bench-compile", action="store_true", default=False)
    g.addoption("--bench-sizes", default="1e6,25e6")
    g.addoption("--bench-fisher-samples", type=int, default=512)


def pytest_configure(config):
    if not _timing(config) or getattr(config.option, "benchmark_json", None):
        return
    if not any("benchmarks" in str(a) for a in config.args):
        return
    dev = config.getoption("--bench-device")
    path = results_path("pytest-benchmark.json", dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    config.option.benchmark_json = open(path, "wb")  # pytest-benchmark expects a binary file object


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastewc"] = timing.machine_info(config.getoption("--bench-device"))


def pytest_generate_tests(metafunc):
    if "penalty_size" in metafunc.fixturenames:
        sizes = [float(s) for s in metafunc.config.getoption("--bench-sizes").split(",")]
        metafunc.parametrize("penalty_size", sizes, ids=[f"{s / 1e6:g}M" for s in sizes], scope="module")


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    from fastewc.bench import resolve_device

    return resolve_device(pytestconfig.getoption("--bench-device"))


@pytest.fixture(scope="session")
def bench_compile(pytestconfig) -> bool:
    return pytestconfig.getoption("--bench-compile")


def _timing(config) -> bool:
    opt = config.option
    return bool(getattr(opt, "benchmark_enable", False) or not getattr(opt, "benchmark_disable", True))


@pytest.fixture(scope="session")
def fisher_samples(pytestconfig) -> int:
    return pytestconfig.getoption("--bench-fisher-samples") if _timing(pytestconfig) else 12
