"""Figures of the benchmark results, drawn from their JSON (needs matplotlib):

    python benchmarks/plot_results.py bench RESULT.json FIGURE.png    # `fastewc bench --json RESULT.json`
    python benchmarks/plot_results.py scale RESULT.json FIGURE.png    # benchmarks/bench_scale.py's JSON

``bench``: the penalty's time per method against the memory floor, and the Fisher's time per
model and method. ``scale``: the penalty step, the regularizer's peak memory and the step
against tasks against their sizes, and the Fisher against N. The label under the title names the
machine, torch and the date the result records (``--label`` replaces it).
"""

from __future__ import annotations

import argparse
import json
import sys

from scale_report import row


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(result: dict, path: str, label: str = "") -> str:
    """Save a figure of a ``fastewc bench`` result: penalty time per method (and Fisher time per
    model and method when present), log scale. Returns ``path``."""
    plt = _pyplot()
    panels = [k for k in ("penalty", "fisher") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    pen = result["penalty"]
    ax = axes[0][0]
    names = [r["method"] for r in pen["rows"]]
    ax.barh(names, [r["median_ms"] for r in pen["rows"]])
    ax.axvline(pen["floor_ms"], color="k", ls="--", lw=1, label=f"memory floor {pen['floor_ms']:.1f} ms")
    ax.set_xscale("log")
    # Within one or two decades matplotlib labels the minor ticks too, and they overlap.
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("median ms per step (log)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title(f"penalty, {pen['params'] / 1e6:.0f}M params, {pen['tasks']} tasks", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    if "fisher" in result:
        ax = axes[0][1]
        rows = result["fisher"]["rows"]
        labels = [f"{r['model']}: {r['method']}" for r in rows]
        ax.barh(labels, [r["seconds"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("seconds per estimate (log)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"Fisher diagonal, N = {result['fisher']['samples']}", fontsize=9)
    fig.suptitle("fastewc bench" + (f": {label}" if label else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(result: dict, path: str, label: str = "") -> str:
    """Save a figure of a :func:`scale_curves.scale_benchmark` result (needs matplotlib). Returns ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    for name in dict.fromkeys(p["series"] for p in result["penalty"]):
        pts = [p for p in result["penalty"] if p["series"] == name and "rows" in p]
        if not pts:
            continue
        xs = [p["params"] for p in pts]
        for method, ls in (("accumulate_grad_", "-o"), ("fwd+bwd", "-s")):
            ax.plot(xs, [row(p, method)["ns_per_param"] for p in pts], ls, label=f"{name} {method}")
        ax.plot(xs, [p["floor_ns_per_param"] for p in pts], "--", color="k" if name == "fp32" else "grey",
                lw=1, label=f"{name} memory floor")
    ax.set_xscale("log")
    ax.set_xlabel("parameters P")
    ax.set_ylabel("ns per parameter")
    ax.set_ylim(bottom=0)
    ax.set_title("penalty step against P", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]
    for name in dict.fromkeys(p["series"] for p in result["penalty"]):
        pts = [p for p in result["penalty"] if p["series"] == name and "rows" in p
               and p["register"]["regularizer_peak_GB"] is not None]
        if pts:
            ax.plot([p["params"] for p in pts], [p["register"]["regularizer_peak_GB"] for p in pts], "-o",
                    label=f"{name}: regularizer peak")
            ax.plot([p["params"] for p in pts], [p["register"]["buffers_GB"] for p in pts], ":", label=f"{name}: 2 buffers")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters P")
    ax.set_ylabel("GB beyond model + grads")
    ax.set_title("regularizer peak resident memory", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[2]
    t = result["tasks"]
    Ts = [r["tasks"] for r in t["rows"]]
    ax.plot(Ts, [r["accumulate_ms"] for r in t["rows"]], "-o", label="accumulate_grad_")
    ax.plot(Ts, [r["fwd_bwd_ms"] for r in t["rows"]], "-s", label="fwd+bwd")
    ax.axhline(t["floor_ms"], color="k", ls="--", lw=1, label="memory floor")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("registered tasks T")
    ax.set_ylabel("ms per step")
    ax.set_title(f"penalty step against T ({t['params'] / 1e6:.0f}M fp32)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[3]
    fz = result["fisher"]
    for m in dict.fromkeys(r["method"] for r in fz["by_samples"]):
        rs = [r for r in fz["by_samples"] if r["method"] == m]
        ax.plot([r["samples"] for r in rs], [r["seconds"] for r in rs], "-o", label=f"{m}: seconds")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples N")
    ax.set_ylabel("seconds per estimate")
    ax2 = ax.twinx()
    for m in dict.fromkeys(r["method"] for r in fz["by_samples"]):
        rs = [r for r in fz["by_samples"] if r["method"] == m and r["peak_extra_MB"] is not None]
        ax2.plot([r["samples"] for r in rs], [r["peak_extra_MB"] for r in rs], ":x", label=f"{m}: peak MB")
    ax2.set_ylabel("extra peak MB")
    ax2.set_ylim(bottom=0)
    w = fz["by_samples"][0]["width"] if fz["by_samples"] else "?"
    ax.set_title(f"Fisher against N (MLP width {w})", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.suptitle("scale curves" + (f": {label}" if label else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def label_of(result: dict) -> str:
    """Where and when a result was measured, from what it records."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    return f"{where}, torch {m['torch']}, {result.get('date') or m.get('date', '')}"


PLOTS = {"bench": plot_bench, "scale": plot_scale}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(PLOTS), help="which benchmark's result the JSON holds")
    ap.add_argument("result", help="the JSON the benchmark wrote")
    ap.add_argument("figure", help="where to save the figure (PNG)")
    ap.add_argument("--label", default=None, help="text under the title (default: machine, torch, date)")
    args = ap.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    path = PLOTS[args.kind](result, args.figure, label=label_of(result) if args.label is None else args.label)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main() and 0)
