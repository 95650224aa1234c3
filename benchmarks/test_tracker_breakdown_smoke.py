"""Smoke run of ``bench_tracker_breakdown.py`` on a small Transformer: every row is filled, the
kernel's time is part of the tracker's, and the timing wrappers are gone afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tracker_breakdown as bench  # noqa: E402

from fastewc import FisherTracker  # noqa: E402
from fastewc.fisher.rules import outer_cpu  # noqa: E402


def test_tracker_breakdown_smoke(tmp_path):
    before = (outer_cpu.OuterKernel.__call__, FisherTracker._on_grad, FisherTracker._rule_hook)
    out = tmp_path / "breakdown.json"
    payload = bench.main(["--models", "transformer", "--samples", "64", "--epochs", "1", "--json", str(out)])
    assert [(r["model"], r["fraction"]) for r in payload["rows"]] == [("transformer", 1.0), ("transformer", 0.25)]
    for r in payload["rows"]:
        assert r["plain_s"] > 0 and r["tracked_s"] > 0 and r["tracker_other_s"] > 0
        assert r["kernel_s"] >= 0 and (r["kernel_s"] == 0 or r["kernel_gflops"] > 0)
    assert json.loads(out.read_text())["rows"][0]["model"] == "transformer"
    assert (outer_cpu.OuterKernel.__call__, FisherTracker._on_grad, FisherTracker._rule_hook) == before
