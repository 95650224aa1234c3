"""Speed of the Fisher on the zoo's transformers: every transformer of ``tests/zoo.py``, float32,
N = 128 samples in batches of 32. ``--size small`` (the default): 128 wide, 2 layers (1 per
stack for the encoder-decoders and ViT / DeiT), 4 heads, feed-forward 512, vocabulary 2000,
right-padded text of 64 tokens, 32x32 images; ``--size tiny``: the tests' configs (16 wide),
text of 16 tokens, 16x16 images, where the fixed cost of each call rather than the work per
sample decides the time. Encoder-decoders: a source as long as the text (64 / 16 tokens) and
targets half as long (32 / 8). Per model, round-robin (``fastewc.bench.timing.time_side_by_side``),
medians of ``--repeats`` rounds after one warm-up (the warm-up proves the plan; the timed calls
reuse it, as a user's second call does):

* ``fastewc.estimate_fisher`` (method auto, kind empirical),
* one plain training pass: a batched forward + backward of the model's own loss over the same
  batches (the floor of ``bench_fisher.py``),
* the per-sample reference loop (``fastewc.reference.estimate_fisher``).

``x floor`` = estimate time / training-pass time (target: <= 1.6); ``vs loop`` = loop time /
estimate time (target: >= 1.5). The probe's cost on a first call and what auto covered are in
the JSON.

    python benchmarks/fisher_zoo_speed.py [--size small|tiny] [--models bert,llama] [--samples 128] [--repeats 3]
                                          [--device cpu|cuda]

Default JSON: ``benchmarks/results/<machine>/fisher_zoo_speed.json`` (``fisher_zoo_speed_tiny.json``
for the tiny size; ``_cuda`` before ``.json`` on a GPU, in the GPU's folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

import fastewc
from fastewc import EWCInputError, reference
from fastewc.bench import timing
from fastewc.bench.device import resolve_device
from fastewc.bench.fisher import _train_pass
from fastewc.fisher import clear_plan_cache
from results_path import results_path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import zoo  # noqa: E402

SIZES = {"small": (zoo.SMALL, 64), "tiny": (zoo.Size(), 16)}   # name -> (model shape, text tokens)
TEXT = {"bert": "cls", "roberta": "tok", "distilbert": "cls", "albert": "cls", "electra": "lm", "deberta": "cls",
        "deberta_v3": "tok", "gpt2": "lm", "gpt_neox": "lm", "llama": "lm", "mistral": "lm", "qwen2": "lm", "phi": "lm",
        "opt": "lm"}
SEQ2SEQ = ("t5", "bart")
VISION = ("vit", "deit", "swin")
TRANSFORMERS = tuple(TEXT) + SEQ2SEQ + VISION
TARGET_FLOOR, TARGET_LOOP = 1.6, 1.5


def problem(name: str, n: int, batch_size: int, size: str = "small"):
    """The zoo's model at ``size`` in float32 and N samples of its data."""
    torch.manual_seed(0)
    zoo.SIZE, seq = SIZES[size]
    model, _ = zoo.BY_NAME[name].build(True)
    model = model.float().eval()
    if name in TEXT:
        data = zoo.text(TEXT[name], True, n=n, seq=seq, batch_size=batch_size)
    elif name in SEQ2SEQ:
        data = zoo.seq2seq(True, n=n, batch_size=batch_size, seq=seq, tgt=seq // 2)
    else:
        data = [{k: v.float() if v.is_floating_point() else v for k, v in b.items()}
                for b in zoo.images(n=n, batch_size=batch_size)]
    return model, data


def measure(name: str, n: int, batch_size: int, repeats: int, size: str = "small",
            device: torch.device = torch.device("cpu")) -> dict:
    model, data = problem(name, n, batch_size, size)
    model = model.to(device)
    data = [{k: v.to(device) for k, v in b.items()} for b in data]
    cases = {"fastewc auto": lambda: fastewc.estimate_fisher(model, data, kind="empirical"),
             "training pass": lambda: _train_pass(model, data),
             "reference loop": lambda: reference.estimate_fisher(model, data, kind="empirical")}
    times = timing.time_side_by_side(cases, repeats=repeats, warmup=1, device=device)
    med = {k: timing.median(v) for k, v in times.items()}
    clear_plan_cache()
    _, info = fastewc.estimate_fisher(model, data, kind="empirical", return_info=True)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "samples": n,
            "seconds": med, "times": times, "x_floor": med["fastewc auto"] / med["training pass"],
            "vs_loop": med["reference loop"] / med["fastewc auto"], "probe_seconds": info.probe_seconds,
            "rule_params": len(info.rule_params), "vmap_params": len(info.vmap_params),
            "loop_params": len(info.loop_params), "reasons": sorted(set(info.reasons.values()))}


def format_table(rows: list[dict], samples: int, repeats: int, size: str = "small") -> str:
    lines = [f"Fisher (empirical, method auto), {size} configs, float32, N = {samples}, batches of 32, {repeats} "
             f"round-robin repeats, "
             f"medians; x floor = time / one training pass (target <= {TARGET_FLOOR}); vs loop = per-sample "
             f"loop time / time (target >= {TARGET_LOOP})", "",
             f"| {'model':<10} | {'params':>6} | {'fisher s':>8} | {'train s':>7} | {'loop s':>7} | {'x floor':>7} "
             f"| {'vs loop':>7} | {'probe s':>7} | rules / vmap / loop |",
             f"|{'-' * 12}|{'-' * 8}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 21}|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']:<10} | ERROR {r['error']} |")
            continue
        s = r["seconds"]
        lines.append(f"| {r['model']:<10} | {r['params'] / 1e3:>5.1f}k | {s['fastewc auto']:>8.3f} | "
                     f"{s['training pass']:>7.3f} | {s['reference loop']:>7.3f} | {r['x_floor']:>7.2f} | "
                     f"{r['vs_loop']:>6.1f}x | {r['probe_seconds']:>7.2f} | "
                     f"{r['rule_params']} / {r['vmap_params']} / {r['loop_params']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--models", default=",".join(TRANSFORMERS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/fisher_zoo_speed.json "
                                                 "(fisher_zoo_speed_cuda.json on a GPU)")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except EWCInputError as e:
        ap.error(str(e))
    warnings.filterwarnings("ignore")  # fallback warnings are in the report's counts
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        try:
            row = measure(name, args.samples, args.batch_size, args.repeats, args.size, device)
        except Exception as e:  # noqa: BLE001 - a crash is a row of the table, not the end of it
            row = {"model": name, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(f"{name}: {row.get('x_floor', row.get('error'))} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ok = [r for r in rows if "error" not in r]
    result = {"machine": timing.machine_info(device), "device": str(device), "size": args.size, "samples": args.samples,
              "batch_size": args.batch_size,
              "dtype": "float32", "kind": "empirical", "method": "auto", "repeats": args.repeats,
              "targets": {"x_floor_max": TARGET_FLOOR, "vs_loop_min": TARGET_LOOP}, "rows": rows,
              "missed": [r["model"] for r in ok if r["x_floor"] > TARGET_FLOOR or r["vs_loop"] < TARGET_LOOP]}
    print()
    print(format_table(rows, args.samples, args.repeats, args.size))
    print(f"\nmissing a target: {', '.join(result['missed']) or 'none'}")
    suffix = ("" if args.size == "small" else f"_{args.size}") + ("" if device.type == "cpu" else f"_{device.type}")
    path = args.json or results_path(f"fisher_zoo_speed{suffix}.json", device)
    print(f"\nwrote {timing.write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
