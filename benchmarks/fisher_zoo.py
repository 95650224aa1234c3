"""The differential harness as a table: every model of the zoo (``tests/zoo.py``), float64, every
kind, padded and unpadded batches: ``fastewc.estimate_fisher`` (method auto) against the
reference per-sample loop. Per row: the largest per-tensor error (relative to the tensor's
largest entry, floored at 1e-9 of the model's largest), the tolerance and why, pass / fail, and
the coverage (parameters by rules / vmap / loop and the reasons). ``tests/fisher/test_zoo.py``
fails on the same mismatches.

    python benchmarks/fisher_zoo.py [--models bert,t5] [--kinds exact] [--json PATH]

Default JSON: ``benchmarks/results/<machine>/fisher_zoo.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fastewc.bench import timing
from results_path import results_path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import zoo  # noqa: E402


def _methods(cov: dict) -> str:
    parts = [f"rules {cov['rule_params']}"]
    for what in ("vmap", "loop"):
        if cov[f"{what}_params"]:
            parts.append(f"{what} {len(cov[f'{what}_params'])}")
    return ", ".join(parts)


def format_table(rows: list[dict]) -> str:
    head = f"{'model':30s} {'kind':9s} {'batches':8s} {'max rel err':>11s} {'tol':>6s}  {'result':6s} coverage"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:30s} {r['kind']:9s} {r['batches']:8s} {'-':>11s} {'-':>6s}  ERROR  {r['error']}")
            continue
        result = "pass" if r["passed"] else "FAIL"
        lines.append(f"{r['model']:30s} {r['kind']:9s} {r['batches']:8s} {r['max_rel_error']:11.1e} {r['tol']:6.0e}  "
                     f"{result:6s} {_methods(r['coverage'])}")
    notes = {}
    for r in rows:
        if r.get("tol_why"):
            notes.setdefault(f"tolerance 1e-6: {r['tol_why']}", set()).add(r["model"])
        for why in r.get("coverage", {}).get("reasons", []):
            notes.setdefault(f"per sample: {why}", set()).add(r["model"])
    lines.append("")
    lines += [f"{', '.join(sorted(models))}: {note}" for note, models in notes.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(c.name for c in zoo.CASES))
    ap.add_argument("--kinds", default="empirical,sampled,exact")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/fisher_zoo.json")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    rows = []
    for name in args.models.split(","):
        case = zoo.BY_NAME[name]
        for kind in (k for k in case.kinds if k in kinds):
            for padded in case.paddings:
                t0 = time.perf_counter()
                batches = "padded" if padded else "unpadded"
                try:
                    row = zoo.run(case, kind, padded)
                except Exception as e:  # noqa: BLE001 - a crash is a row of the table, not the end of it
                    row = {"model": name, "kind": kind, "padded": padded, "error": f"{type(e).__name__}: {e}"[:300]}
                row["batches"] = batches
                row["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                print(f"{name} {kind} {batches}: {row.get('max_rel_error', row.get('error'))}", file=sys.stderr)
    result = {"machine": timing.machine_info("cpu"), "samples": zoo.N, "dtype": "float64", "method": "auto",
              "tolerance": zoo.TOL, "tolerance_fp32_parts": zoo.TOL_FP32, "rows": rows,
              "failed": [f"{r['model']} {r['kind']} {r['batches']}" for r in rows
                         if "error" in r or not r["passed"]]}
    print()
    print(format_table(rows))
    path = args.json or results_path("fisher_zoo.json")
    print(f"\nwrote {timing.write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
