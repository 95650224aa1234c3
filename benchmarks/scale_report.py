"""Text of the scale benchmark (``benchmarks/scale_curves.py``): the summary ratios the targets are
stated in, and the markdown tables ``bench_scale.py`` prints and ``update_readme.py`` writes into
the README's "Scale" section. Reads only the result dict, so a committed JSON can be rendered
again without measuring."""

from __future__ import annotations


def row(point: dict, method: str) -> dict | None:
    """The row of ``method`` in a penalty point, None where the point has none."""
    return next((r for r in point.get("rows", []) if r["method"] == method), None)


def summarize(result: dict) -> dict:
    """The figures the targets are stated in: per series, time per parameter at the largest P
    measured over that at 10M (or the smallest size), the worst ``accumulate_grad_`` ratio to the
    floor, the T curve's largest over smallest, the regularizer's peak at the largest bf16 point,
    and Fisher seconds per sample at the largest N over the smallest."""
    s: dict = {"series": {}}
    for name in dict.fromkeys(p["series"] for p in result["penalty"]):
        pts = [p for p in result["penalty"] if p["series"] == name and "rows" in p]
        skipped = [p["params_requested"] for p in result["penalty"] if p["series"] == name and "skipped" in p]
        if not pts:
            s["series"][name] = {"skipped": skipped}
            continue
        ref = next((p for p in pts if p["params_requested"] == int(1e7)), pts[0])
        big = pts[-1]
        entry = {"largest_params": big["params"], "reference_params": ref["params"], "skipped": skipped}
        for m in ("accumulate_grad_", "fwd+bwd"):
            entry[f"{m} ns_per_param largest/reference"] = (row(big, m)["ns_per_param"] / row(ref, m)["ns_per_param"])
            # the same ratio with each point's time over its own floor: a machine-wide slowdown
            # (other processes on a shared machine) between the two points cancels out
            entry[f"{m} x_floor largest/reference"] = (row(big, m)["ratio_to_floor"] / row(ref, m)["ratio_to_floor"])
        entry["accumulate_grad_ worst ratio_to_floor"] = max(row(p, "accumulate_grad_")["ratio_to_floor"] for p in pts)
        entry["largest regularizer_peak_GB"] = big["register"]["regularizer_peak_GB"]
        s["series"][name] = entry
    rows = result["tasks"]["rows"]
    s["tasks accumulate largest/smallest"] = rows[-1]["accumulate_vs_T1"]
    s["tasks fwd+bwd largest/smallest"] = rows[-1]["fwd_bwd_vs_T1"]
    by_n = result["fisher"]["by_samples"]
    for m in dict.fromkeys(r["method"] for r in by_n):
        rs = [r for r in by_n if r["method"] == m]
        s[f"fisher {m} us_per_sample largest/smallest N"] = rs[-1]["us_per_sample"] / rs[0]["us_per_sample"]
        peaks = [r["peak_extra_MB"] for r in rs if r["peak_extra_MB"] is not None]
        s[f"fisher {m} peak_extra_MB max over N"] = max(peaks) if peaks else None
    return s


def format_spread(result: dict) -> str:
    """Markdown table of a :func:`scale_curves.penalty_spread` result."""
    lines = ["| series | params | tensors | runs | accumulate_grad_ x floor: min / median / max | runs under 2x "
             "| floor ms: min / max |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        lines.append(f"| {p['series']} | {_millions(p['params'])} | {p['tensors']} | {p['runs']} | "
                     f"{p['min']:.2f}x / {p['median']:.2f}x / {p['max']:.2f}x | {p['under_2x']} | "
                     f"{min(p['floor_ms']):.3f} / {max(p['floor_ms']):.3f} |")
    return "\n".join(lines)


def _gb_text(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"


def penalty_table(result: dict) -> list[str]:
    """The step-against-P table (markdown lines) of a result's ``"penalty"`` part."""
    lines = ["| series | params | backend | accumulate_grad_ ns/param | x floor | fwd+bwd ns/param | x floor "
             "| PyTorch backend x floor, accumulate / fwd+bwd | floor ns/param "
             "(copy GB/s) | register s, 1st / merge | regularizer peak GB (2 buffers) | fwd+bwd extra GB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["penalty"]:
        if "skipped" in p:
            lines.append(f"| {p['series']} | {p['params_requested'] / 1e6:,.0f}M | not run: {p['skipped']} "
                         "| | | | | | | | | |")
            continue
        a, f, g = row(p, "accumulate_grad_"), row(p, "fwd+bwd"), p["register"]
        ta, tf = row(p, "accumulate_grad_ [torch]"), row(p, "fwd+bwd [torch]")
        on_torch = f"{ta['ratio_to_floor']:.2f}x / {tf['ratio_to_floor']:.2f}x" if ta and tf else "(the backend)"
        peak = "n/a" if g["regularizer_peak_GB"] is None else _gb_text(g["regularizer_peak_GB"])
        fb = "n/a" if g["fwd_bwd_peak_extra_GB"] is None else _gb_text(g["fwd_bwd_peak_extra_GB"])
        lines.append(f"| {p['series']} | {p['params'] / 1e6:,.1f}M | {p.get('backend', 'torch')} | "
                     f"{a['ns_per_param']:.2f} | {a['ratio_to_floor']:.2f}x | {f['ns_per_param']:.2f} | "
                     f"{f['ratio_to_floor']:.2f}x | {on_torch} | {p['floor_ns_per_param']:.2f} "
                     f"({p['copy_bandwidth_GBps']:.1f}) | {g['first_s']:.2f} / {g['merge_s']:.2f} | {peak} "
                     f"({_gb_text(g['buffers_GB'])}) | {fb} |")
    return lines


def target_lines(result: dict) -> list[str]:
    """The ratios the scale targets are stated in (markdown bullets), from the result's summary
    (computed by :func:`summarize` when the result has none)."""
    s, out = result.get("summary") or summarize(result), []
    for name, e in s["series"].items():
        if "largest_params" not in e:
            out.append(f"* {name}: no point fitted")
            continue
        big, ref = _millions(e["largest_params"]), _millions(e["reference_params"])
        out.append(f"* {name}, time per parameter at {big} over {ref}: accumulate_grad_ "
                   f"{e['accumulate_grad_ ns_per_param largest/reference']:.2f}x, fwd+bwd "
                   f"{e['fwd+bwd ns_per_param largest/reference']:.2f}x (target <= 1.2x); accumulate_grad_ worst "
                   f"ratio to the floor {e['accumulate_grad_ worst ratio_to_floor']:.2f}x (target <= 2x); regularizer "
                   f"peak at {big} {_gb_text(e['largest regularizer_peak_GB'])} GB")
    rows = result["tasks"]["rows"]
    out.append(f"* T = {rows[-1]['tasks']} over T = {rows[0]['tasks']}: accumulate_grad_ "
               f"{s['tasks accumulate largest/smallest']:.2f}x, fwd+bwd {s['tasks fwd+bwd largest/smallest']:.2f}x "
               f"(target <= 1.15x)")
    for m in ("rules", "vmap"):
        k = f"fisher {m} us_per_sample largest/smallest N"
        if k in s:
            peak = s[f"fisher {m} peak_extra_MB max over N"]
            out.append(f"* Fisher {m}, time per sample at the largest N over the smallest: {s[k]:.2f}x; largest "
                       f"extra peak over N {'n/a' if peak is None else f'{peak:.0f} MB'}")
    return out


def format_scale(result: dict) -> str:
    """Markdown of a :func:`scale_curves.scale_benchmark` result: the three tables and the target ratios (what
    the README shows, without its first line)."""
    t, fz = result["tasks"], result["fisher"]
    repeats = f", {t['repeats']} round-robin repeats" if "repeats" in t else ""
    lines = ["Penalty step against P (2 tasks registered, `.grad` already holding a gradient; medians of "
             "round-robin repeats; floor = bytes the step must move (fp32: 20 B/param, bf16: 10 B/param) over "
             "the bandwidth of a copy measured in the same run):", ""]
    lines += penalty_table(result)
    lines += [""] + target_lines(result)
    lines += ["", f"Penalty step against registered tasks T (`mode=\"separate\"`, {t['params'] / 1e6:.1f}M fp32 "
              f"parameters{repeats}, floor {t['floor_ms']:.1f} ms):", ""]
    lines += task_table(t)
    fz_repeats = f"; {fz['repeats']} round-robin repeats" if "repeats" in fz else ""
    lines += ["", f"Fisher diagonal ({fz['model']}; `max_memory` {fz['max_memory_MB']:.0f} MB{fz_repeats}; peak = "
              f"extra resident memory over the start of the call):", ""]
    lines += fisher_table(fz)
    return "\n".join(lines)


def task_table(t: dict) -> list[str]:
    """The step-against-tasks table (markdown lines) of a result's ``"tasks"`` part."""
    lines = ["| T | accumulate_grad_ ms | vs T=1 | fwd+bwd ms | vs T=1 | register_task s/task |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in t["rows"]:
        lines.append(f"| {r['tasks']} | {r['accumulate_ms']:.1f} | {r['accumulate_vs_T1']:.2f}x | "
                     f"{r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_vs_T1']:.2f}x | {r['register_s_per_task']:.3f} |")
    return lines


def fisher_table(fz: dict) -> list[str]:
    """The Fisher-against-N-and-width table (markdown lines) of a result's ``"fisher"`` part."""
    lines = ["| width | params | N | method | seconds | us/sample | peak MB |", "|---:|---:|---:|---|---:|---:|---:|"]
    for r in fz["by_samples"] + fz["by_width"]:
        peak = "n/a" if r["peak_extra_MB"] is None else f"{r['peak_extra_MB']:.0f}"
        lines.append(f"| {r['width']} | {r['params'] / 1e6:.2f}M | {r['samples']} | {r['method']} | "
                     f"{r['seconds']:.3f} | {r['us_per_sample']:.0f} | {peak} |")
    return lines
