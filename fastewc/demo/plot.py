"""The demo's figure: accuracy on task 1 as tasks arrive, and the final summaries per method."""

from __future__ import annotations

from .._utils import require


def plot_demo(result: dict, path: str, label: str = "") -> str:
    """Save a two-panel PNG/PDF/SVG (by ``path``'s suffix) of a :func:`run_demo` result; returns ``path``.

    Left: accuracy on the first task after each task, per method. Right: average final accuracy
    and average forgetting per method. ``label`` (machine, date) goes under the title.
    """
    matplotlib = require("matplotlib", extra="demo")
    matplotlib.use("Agg")  # files only; never needs a display
    plt = require("matplotlib.pyplot", extra="demo")

    methods = result["methods"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in methods.items():
        first = [row[0] for row in r["matrix"]]
        left.plot(range(1, len(first) + 1), first, marker="o", label=name)
    left.set_xlabel("tasks trained")
    left.set_ylabel("accuracy on task 1")
    left.set_ylim(0, 1.02)
    left.set_xticks(range(1, len(result["tasks"]) + 1))
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    names = list(methods)
    xs = range(len(names))
    w = 0.38
    right.bar([x - w / 2 for x in xs], [methods[n]["avg_accuracy"] for n in names], w, label="avg accuracy")
    right.bar([x + w / 2 for x in xs], [methods[n]["avg_forgetting"] for n in names], w, label="avg forgetting")
    right.set_xticks(list(xs))
    right.set_xticklabels(names, rotation=20, fontsize=8)
    right.set_ylim(0, 1.02)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)

    fig.suptitle(f"fastewc demo: {result['benchmark']}" + (f"\n{label}" if label else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
