"""Where the benchmark scripts write their JSON by default: ``benchmarks/results/<machine>/``,
found from this file, so that a script run from any folder writes where ``update_readme.py``
reads."""

from __future__ import annotations

from pathlib import Path

from fastewc.bench import timing

RESULTS = Path(__file__).resolve().parent / "results"


def results_path(name: str, device="cpu") -> Path:
    """``benchmarks/results/<slug of this machine's device>/<name>``."""
    return RESULTS / timing.machine_slug(device) / name
