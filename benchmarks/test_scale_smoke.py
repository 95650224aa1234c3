"""``benchmarks/bench_scale.py --quick``: the cost-curve benchmark runs in seconds and writes JSON
with every field the README table and the figure are made from, and the figure is drawn from
that JSON. Structure only: the figures themselves are the benchmark's business, not a test's."""

import contextlib
import io
import json
import math

import pytest
import torch

import bench_scale
import plot_results
import scale_curves
import scale_report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``bench_scale.py --quick --json PATH`` run once, on one torch thread (on a shared machine,
    two make the many small parallel regions wait for a descheduled thread; the tests check
    structure, which the thread count does not change): ``(JSON path, what it printed)``."""
    path = tmp_path_factory.mktemp("scale") / "scale.json"
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            bench_scale.main(["--quick", "--json", str(path)])
    finally:
        torch.set_num_threads(was)
    return path, out.getvalue()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_scale_writes_json_with_every_field(quick_run):
    path, out = quick_run
    assert "Penalty step against P" in out and "registered tasks T" in out and "Fisher diagonal" in out
    d = json.loads(path.read_text())
    assert d["benchmark"] == "scale" and d["quick"] is True
    assert {"cpu", "cores", "torch"} <= set(d["machine"])

    series = {p["series"] for p in d["penalty"]}
    assert series == {"fp32", "bf16"}
    for p in d["penalty"]:
        assert "skipped" not in p
        assert p["floor_bytes_per_param"] == (20 if p["series"] == "fp32" else 10)
        for k in ("params", "copy_bandwidth_GBps", "floor_ms", "floor_ns_per_param", "probe_bytes"):
            assert _finite(p[k]) and p[k] > 0, k
        extra = set() if p["backend"] == "torch" else {"accumulate_grad_ [torch]", "fwd+bwd [torch]"}
        assert {r["method"] for r in p["rows"]} == {"accumulate_grad_", "fwd+bwd"} | extra
        for r in p["rows"]:
            assert all(_finite(r[k]) and r[k] > 0 for k in ("median_ms", "ns_per_param", "ratio_to_floor"))
        reg = p["register"]
        assert _finite(reg["first_s"]) and _finite(reg["merge_s"])
        assert reg["buffers_GB"] == pytest.approx(2 * p["params"] * (4 if p["series"] == "fp32" else 2) / 1e9)
        for k in ("first_peak_extra_GB", "merge_peak_extra_GB", "held_GB", "bind_peak_extra_GB",
                  "fwd_bwd_peak_extra_GB", "regularizer_peak_GB"):
            assert k in reg and (reg[k] is None or _finite(reg[k]))

    t = d["tasks"]
    assert [r["tasks"] for r in t["rows"]] == [1, 4]
    assert t["rows"][0]["accumulate_vs_T1"] == 1.0 and t["rows"][0]["fwd_bwd_vs_T1"] == 1.0
    for r in t["rows"]:
        assert all(_finite(r[k]) and r[k] > 0 for k in ("accumulate_ms", "fwd_bwd_ms", "register_s_per_task"))

    f = d["fisher"]
    assert {(r["samples"], r["method"]) for r in f["by_samples"]} == {(n, m) for n in (64, 128) for m in ("rules", "vmap")}
    assert {r["width"] for r in f["by_width"]} == {32, 64}
    for r in f["by_samples"] + f["by_width"]:
        assert _finite(r["seconds"]) and _finite(r["us_per_sample"]) and r["max_memory_MB"] == 64
        assert r["peak_extra_MB"] is None or _finite(r["peak_extra_MB"])

    s = d["summary"]
    assert set(s["series"]) == {"fp32", "bf16"}
    assert all(_finite(v) for v in s["series"]["fp32"].values() if not isinstance(v, list))
    assert _finite(s["tasks accumulate largest/smallest"])
    assert _finite(s["fisher rules us_per_sample largest/smallest N"])


def test_the_figure_is_drawn_from_the_saved_json(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "scale.png"
    assert plot_results.main(["scale", str(quick_run[0]), str(png)]) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_points_over_the_memory_budget_are_recorded_as_skipped():
    rows = scale_curves.penalty_curve((1e9,), memory_budget=1e9)
    assert [r["series"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert "rows" not in r and "GB budget" in r["skipped"] and r["params_requested"] == 10**9
    fake = {"machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "t"}, "penalty": rows,
            "tasks": {"params": 1, "floor_ms": 1.0, "rows": [{"tasks": 1, "accumulate_ms": 1.0, "accumulate_vs_T1": 1.0,
                                                              "fwd_bwd_ms": 1.0, "fwd_bwd_vs_T1": 1.0,
                                                              "register_s_per_task": 0.1}]},
            "fisher": {"model": "m", "max_memory_MB": 64, "by_samples": [], "by_width": []}}
    assert "not run: needs about" in scale_report.format_scale(fake)
    assert scale_report.summarize(fake)["series"]["bf16"] == {"skipped": [10**9]}


def test_floor_bytes():
    assert scale_curves.floor_bytes_per_param(torch.float32, torch.float32) == 20
    assert scale_curves.floor_bytes_per_param(torch.float32, torch.bfloat16) == 16
    assert scale_curves.floor_bytes_per_param(torch.bfloat16, torch.bfloat16) == 10


def test_scale_model_has_the_size_and_dtype_asked_for():
    for n in (1e5, 1e6):
        m = scale_curves.scale_model(n, torch.bfloat16)
        P = sum(p.numel() for p in m.parameters())
        assert 0.75 * n < P < 1.25 * n
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        assert all(bool(p.abs().max() <= 0.05) for p in m.parameters())


def test_spread_repeats_points_and_summarises_their_ratios():
    result = scale_curves.penalty_spread((2e4,), runs=3)
    assert [p["series"] for p in result["points"]] == ["fp32", "bf16"]
    for p in result["points"]:
        r = p["accumulate_ratio_to_floor"]
        assert len(r) == len(p["floor_ms"]) == p["runs"] == 3 and all(_finite(x) and x > 0 for x in r)
        assert p["min"] == min(r) <= p["median"] <= p["max"] == max(r)
        assert p["under_2x"] == sum(x <= 2.0 for x in r)
    assert "runs under 2x" in scale_report.format_spread(result)
