"""Smoke run of ``bench_step_overhead.py`` on tiny configs: every case runs, and the two ways of
adding the penalty give the same gradients on every backend."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step_overhead as bench  # noqa: E402


def test_step_overhead_smoke(tmp_path):
    out = tmp_path / "step.json"
    payload = bench.main(["--small", "--models", "mlp,gpt2", "--repeats", "1", "--json", str(out)])
    rows = payload["rows"]
    assert {r["backend"] for r in rows} == set(bench.backends_here())
    assert {r["model"] for r in rows} >= {"mlp"}
    assert all(r["grads_match"] for r in rows), [(r["model"], r["backend"]) for r in rows if not r["grads_match"]]
    assert all(r["plain_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"][0]["model"] == rows[0]["model"]
