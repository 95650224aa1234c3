"""Rewrite the README's result tables from the JSON files under benchmarks/results/.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers; this
script regenerates what is between them, so the README shows what the commands measured, never
figures typed by hand.

    python benchmarks/update_readme.py [--machine FOLDER]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

from scale_report import format_scale

ROOT = Path(__file__).resolve().parents[1]


def _latest(name: str, machine: str | None) -> str | None:
    """The machine folder holding the newest ``name`` (by the date it records, then by file time),
    or ``machine`` when given."""
    if machine is not None:
        return machine
    found = []
    for path in (ROOT / "benchmarks" / "results").glob(f"*/{name}"):
        d = json.loads(path.read_text())
        date = d.get("date") or d.get("machine", {}).get("date") or ""
        found.append((date, path.stat().st_mtime, path.parent.name))
    return max(found)[2] if found else None


def _load(machine: str, name: str) -> dict | None:
    path = ROOT / "benchmarks" / "results" / machine / name
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    # Older files carry no date: the day the file was written is the day it was measured.
    d.setdefault("date", d.get("machine", {}).get("date") or
                 datetime.date.fromtimestamp(path.stat().st_mtime).isoformat())
    return d


def _where(m: dict) -> str:
    return m.get("gpu") or f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads)"


def penalty_table(d: dict, source: str) -> str:
    m = d["machine"]
    lines = [f"{d['params'] / 1e6:.1f}M float32 parameters in {d['tensors']} tensors, {d['tasks']} tasks; "
             f"{_where(m)}, torch {m['torch']}; copy bandwidth {d['copy_bandwidth_GBps']:.1f} GB/s, floor "
             f"{d['floor_ms']:.1f} ms; {d['repeats']} round-robin repeats, medians; {d['date']}. Source: `{source}`.", "",
             "| method | median ms | speed-up vs loop | x floor |", "|---|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['method']} | {r['median_ms']:.1f} | {r['speedup_vs_reference']:.1f}x | "
                     f"{r['ratio_to_floor']:.2f}x |")
    return "\n".join(lines)


def fisher_table(d: dict, source: str) -> str:
    m = d["machine"]
    hf = f" (Hugging Face models: {d['hf_samples']} padded sequences in batches of 32)" if "hf_samples" in d else ""
    lines = [f"N = {d['samples']} samples in batches of 64{hf}; {_where(m)}, torch {m['torch']}; "
             f"{d['repeats']} round-robin repeats, medians; x floor = time / one plain training pass over the same "
             f"samples; peak = extra resident memory over the start; {d['date']}. Source: `{source}`.", "",
             "| model | params | kind | method | seconds | speed-up vs loop | x floor | peak MB |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        peak = "n/a" if r["peak_extra_MB"] is None else f"{r['peak_extra_MB']:.0f}"
        floor = "" if r.get("vs_floor") is None else f"{r['vs_floor']:.2f}"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r.get('kind', 'empirical')} | {r['method']} | "
                     f"{r['seconds']:.3f} | {r['speedup_vs_reference']:.2f}x | {floor} | {peak} |")
    for r in d.get("skipped", []):
        lines.append(f"\n{r['method']} on {r['model']} ({r['kind']}): not timed, {r['reason']}.")
    probes = [f"{r['model']} {r['probe_seconds'] * 1e3:.0f} ms" for r in d["rows"]
              if r.get("probe_seconds") and r.get("kind") == "empirical"]
    if probes:
        lines.append(f"\nFirst-call probe (proving the plan; later calls reuse it): {', '.join(probes)}.")
    return "\n".join(lines)


def demo_table(d: dict, source: str) -> str:
    m = d["machine"]
    c = d["config"]
    lines = [f"{d['benchmark']}, {len(d['tasks'])} tasks, MLP 64-{c['hidden']}-{c['hidden']}-10, {c['epochs']} epochs "
             f"per task, lambda {c['lambda_ewc']:g}, {c['fisher_samples']} Fisher samples, seed {c['seed']}; "
             f"{_where(m)}, {d['date']}. Source: `{source}`.", "",
             "| method | avg accuracy | avg forgetting | seconds |", "|---|---:|---:|---:|"]
    for name, r in d["methods"].items():
        lines.append(f"| {name} | {r['avg_accuracy']:.3f} | {r['avg_forgetting']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def scale_table(d: dict, source: str) -> str:
    m = d["machine"]
    helpers = f"; C++ host helpers {m['host_helpers']}" if "host_helpers" in m else ""
    return f"{_where(m)}, torch {m['torch']}{helpers}; {d['date']}. Source: `{source}`.\n\n" + format_scale(d)


def step_overhead_table(d: dict, source: str) -> str:
    from bench_step_overhead import format_rows

    m = d["machine"]
    return (f"Float32, 2 tasks registered, a step = zero_grad, forward, backward, SGD; {_where(m)}, torch "
            f"{m['torch']}; {d['repeats']} round-robin repeats, medians; {d['machine']['date']}. Source: `{source}`.\n\n"
            + "\n".join(format_rows(d["rows"])))


def merge_table(d: dict, source: str) -> str:
    m = d["machine"]
    lines = [f"{_where(m)}, torch {m['torch']}; page cache dropped before each run: "
             f"{d['rows'][0]['page_cache_dropped']}; {m['date']}. Source: `{source}`.", "",
             "| models x params | read GB | written GB | merge s | peak resident GB | disk floor s | x floor |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        lines.append(f"| {r['models']} x {r['params'] / 1e9:.2f}B bf16 | {r['input_gb']:.1f} | {r['output_gb']:.1f} | "
                     f"{r['merge_s']:.1f} | {r['merge_peak_gb']:.2f} | {r['disk_floor_s']:.1f} | {r['vs_disk_floor']:.2f}x |")
    return "\n".join(lines)


def demo_merge_table(d: dict, source: str) -> str:
    import sys

    sys.path.insert(0, str(ROOT))
    from fastewc.demo.merge import format_merge_report

    c = d["config"]
    return (f"Split-Digits task-incremental, 5 models fine-tuned from one initialisation (MLP 64-{c['hidden']}-"
            f"{c['hidden']}-10, {c['pretrain_epochs']} pretraining epochs, {c['epochs']} epochs per task), "
            f"{c['fisher_samples']} Fisher samples per model, floor {c['floor']:g}; test accuracy per task, the mean of "
            f"seeds {', '.join(map(str, c['seeds']))}; {_where(d['machine'])}, {d['date']}. Source: `{source}`.\n\n"
            + format_merge_report(d))


def zoo_table(d: dict, source: str) -> str:
    models: dict = {}
    for r in d["rows"]:
        e = models.setdefault(r["model"], {"kinds": {}, "coverage": None, "tol_why": ""})
        k = e["kinds"].setdefault(r["kind"], 0.0)
        e["kinds"][r["kind"]] = max(k, r["max_rel_error"])
        e["tol_why"] = e["tol_why"] or r.get("tol_why", "")
        if r["kind"] == "empirical" and e["coverage"] is None:
            e["coverage"] = r["coverage"]
    failed = sum(1 for r in d["rows"] if not r["passed"])
    lines = [f"{len(d['rows'])} model/kind/padding cases, N = {d['samples']}, {d['dtype']}, method "
             f"{d['method']!r}; error = max over tensors of |fastewc - reference loop| / the tensor's largest entry "
             f"(floored at 1e-9 of the model's largest); tolerance {d['tolerance']:g} ({d['tolerance_fp32_parts']:g} "
             f"where marked); {failed} failures; {_where(d['machine'])}. Source: `{source}`.", "",
             "| model | empirical | sampled | exact | parameters by rules / vmap / loop (auto) |",
             "|---|---:|---:|---:|---|"]
    for name, e in models.items():
        cov = e["coverage"] or {"rule_params": 0, "vmap_params": [], "loop_params": []}
        mark = " (1e-6)" if e["tol_why"] else ""
        errs = " | ".join(f"{e['kinds'][k]:.1e}" if k in e["kinds"] else "n/a" for k in ("empirical", "sampled", "exact"))
        lines.append(f"| {name}{mark} | {errs} | {cov['rule_params']} / {len(cov['vmap_params'])} / "
                     f"{len(cov['loop_params'])} |")
    return "\n".join(lines)


def tracker_table(d: dict, source: str) -> str:
    m = d["machine"]
    lines = [f"One epoch per case, round-robin, {d['repeats']} repeats, medians; {_where(m)}, torch {m['torch']}, "
             f"{m['date']}. x plain: the tracked epoch's time over the plain one's with the same optimizer. "
             f"Source: `{source}`.", "",
             "| model | samples | plain epoch s (SGD) | tracked | fraction 0.25 | one step in 4 | floor | floor 0.25 "
             "| plain epoch s (AdamW) | tracked | fraction 0.25 | estimate_fisher s | x plain (SGD) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        s = r["seconds"]
        floor = (f"{r['floor_over_plain']:.2f}x | {r['floor_0.25_over_plain']:.2f}x" if "floor_over_plain" in r
                 else "- | -")
        lines.append(f"| {r['model']} | {r['samples']} | {s['plain']:.3f} | {r['tracked_over_plain']:.2f}x | "
                     f"{r['tracked_0.25_over_plain']:.2f}x | {r['tracked_1in4_over_plain']:.2f}x | {floor} | "
                     f"{s['plain_adamw']:.3f} | {r['adamw_tracked_over_plain']:.2f}x | "
                     f"{r['adamw_tracked_0.25_over_plain']:.2f}x | {s['estimate_fisher']:.3f} | "
                     f"{r['estimate_fisher_over_plain']:.2f}x |")
    return "\n".join(lines)


def zoo_speed_table(d: dict, source: str) -> str:
    from fisher_zoo_speed import format_table

    m = d["machine"]
    return (f"{_where(m)}, torch {m['torch']}, {m['date']}; missing a target: {', '.join(d['missed']) or 'none'}. "
            f"Source: `{source}`.\n\n" + format_table(d["rows"], d["samples"], d["repeats"], d.get("size", "tiny")))


def penalty_gpu_table(d: dict, source: str) -> str:
    from bench_penalty_gpu import table

    m = d["machine"]
    return (f"{_where(m)}, torch {m['torch']}, triton {m.get('triton')}, {m['date']}; {d['timing']}, "
            f"{d['repeats']} repeats; {d['tasks']} tasks; copy bandwidth {d['copy_GBps']:.0f} GB/s; floor: "
            f"{d['floor']}. Source: `{source}`.\n\n" + table(d["rows"], d["copy_GBps"] * 1e9))


def outer_sq_table(d: dict, source: str) -> str:
    m = d["machine"]
    lines = [f"N = {d['samples']} samples, float32, kernel on PyTorch's OpenMP threads: {d['threaded']}; "
             f"{d['repeats']} round-robin repeats, medians; {_where(m)}, torch {m['torch']}, {m['date']}. "
             f"Sequences up to {d['kernel_max_t']} positions go to the kernel by default. Source: `{source}`.", "",
             "| positions | in | out | batched products ms | kernel ms | GFLOP/s products / kernel | GFLOP/s one mm "
             "| kernel speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        flop = 2 * d["samples"] * r["T"] * r["in"] * r["out"]
        mm = f"{flop / r['mm_s'] / 1e9:.0f}" if "mm_s" in r else "-"
        lines.append(f"| {r['T']} | {r['in']} | {r['out']} | {r['products_s'] * 1e3:.3f} | {r['kernel_s'] * 1e3:.3f} | "
                     f"{flop / r['products_s'] / 1e9:.0f} / {flop / r['kernel_s'] / 1e9:.0f} | {mm} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machine", default=None,
                    help="results folder to read (default: for each table, the folder with its newest file)")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    makers = {"penalty_cpu": ("penalty_cpu.json", penalty_table), "fisher_cpu": ("fisher_cpu.json", fisher_table),
              "demo": ("demo_permuted.json", demo_table), "scale": ("scale_cpu.json", scale_table),
              "step_overhead": ("step_overhead_cpu.json", step_overhead_table), "merge": ("merge_cpu.json", merge_table),
              "demo_merge": ("demo_merge.json", demo_merge_table), "fisher_zoo": ("fisher_zoo.json", zoo_table),
              "tracker": ("tracker_cpu.json", tracker_table), "outer_sq": ("outer_sq_cpu.json", outer_sq_table),
              "fisher_zoo_speed": ("fisher_zoo_speed.json", zoo_speed_table),
              "fisher_zoo_speed_tiny": ("fisher_zoo_speed_tiny.json", zoo_speed_table),
              # a lent GPU's (benchmarks/gpu_suite.sh)
              "penalty_gpu": ("penalty_gpu.json", penalty_gpu_table), "fisher_cuda": ("fisher_cuda.json", fisher_table),
              "fisher_zoo_speed_cuda": ("fisher_zoo_speed_cuda.json", zoo_speed_table),
              "tracker_cuda": ("tracker_cuda.json", tracker_table)}
    for block, (fname, make) in makers.items():
        machine = _latest(fname, args.machine)
        d = _load(machine, fname) if machine is not None else None
        if d is None:
            continue
        table = make(d, f"benchmarks/results/{machine}/{fname}")
        pattern = re.compile(rf"(<!-- results:{block} -->\n)(?:.*?\n)?(<!-- /results:{block} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README has no <!-- results:{block} --> block")
        text = pattern.sub(lambda mt: mt.group(1) + table + "\n" + mt.group(2), text)
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
