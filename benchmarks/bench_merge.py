"""Fisher-weighted merging of checkpoints on disk: peak resident memory and speed against the disk.

Writes K synthetic checkpoints of P parameters (a transformer-shaped set of tensors, bfloat16,
Hugging Face's sharded safetensors layout) and their Fisher files (bfloat16), then runs
``fastewc.fisher_merge_files`` in a fresh process that reports its peak resident memory
(``VmHWM``). The disk floor is the same process reading every input once and writing an output
of the merged size (``cat``-like streaming through 64 MB buffers); the page cache is dropped
before each when the machine allows it (root), else both read from whatever is cached.

    python benchmarks/bench_merge.py [--params 1e9] [--models 3] [--folder /tmp/fastewc-merge] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fastewc import save_fisher
from fastewc.bench import timing
from results_path import results_path

SHARD_BYTES = 1 << 30

_MERGE = """
import json, sys, time
from fastewc import fisher_merge_files
t = time.perf_counter()
r = fisher_merge_files(json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])
dt = time.perf_counter() - t
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({"seconds": dt, "peak_kb": int(hwm), "files": r.files, "merged": len(r.fisher_merged)}))
"""

_COPY = """
import json, sys, time, os
t = time.perf_counter()
total = 0
for f in json.loads(sys.argv[1]):
    with open(f, 'rb') as h:
        while True:
            b = h.read(1 << 26)
            if not b:
                break
            total += len(b)
out = sys.argv[2]
with open(out, 'wb') as h:
    left = int(sys.argv[3])
    buf = bytes(1 << 26)
    while left > 0:
        h.write(buf[:min(left, len(buf))])
        left -= len(buf)
    h.flush()
    os.fsync(h.fileno())
dt = time.perf_counter() - t
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(json.dumps({"seconds": dt, "peak_kb": int(hwm), "read_bytes": total}))
"""


def shapes_for(params: float, d: int = 2048, vocab: int = 32000) -> list[tuple[str, tuple[int, ...]]]:
    """Transformer-shaped tensors adding up to about ``params``: an embedding, then blocks of
    attention and MLP weights and norms."""
    out = [("embed.weight", (vocab, d))]
    per_block = 4 * d * d + 2 * d * 4 * d + 2 * d
    blocks = max(1, round((params - vocab * d) / per_block))
    for b in range(blocks):
        for name, shape in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)), ("up", (4 * d, d)),
                            ("down", (d, 4 * d)), ("norm1", (d,)), ("norm2", (d,))):
            out.append((f"blocks.{b}.{name}.weight", shape))
    return out


def write_checkpoint(folder: Path, shapes, seed: int, dtype=torch.bfloat16) -> Path:
    """A sharded safetensors checkpoint in Hugging Face's layout, written a shard at a time."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards, shard, size = [], {}, 0
    for name, shape in shapes:
        shard[name] = torch.randn(shape, generator=g).to(dtype)
        size += math.prod(shape) * 2
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    weight_map = {}
    for k, part in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_fisher(folder: Path, shapes, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    fisher = {}
    written_bytes = 0
    for name, shape in shapes:
        fisher[name] = torch.rand(shape, generator=g).to(torch.bfloat16)
        written_bytes += math.prod(shape) * 2
    save_fisher(fisher, folder, kind="synthetic", max_shard_bytes=SHARD_BYTES)
    return folder


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--folder", default="/tmp/fastewc-merge")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: removed at the end)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/merge_cpu.json")
    args = ap.parse_args(argv)
    root = Path(args.folder)
    shapes = shapes_for(args.params)
    P = sum(math.prod(s) for _, s in shapes)
    print(f"{args.models} checkpoints of {P / 1e9:.2f}B bfloat16 parameters in {len(shapes)} tensors, under {root}")
    try:
        models, fishers = [], []
        for i in range(args.models):
            models.append(str(write_checkpoint(root / f"model{i}", shapes, seed=i)))
            fishers.append(str(write_fisher(root / f"fisher{i}", shapes, seed=100 + i)))
        inputs = [str(f) for d in models + fishers for f in sorted(Path(d).glob("*.safetensors"))]
        in_bytes = sum(Path(f).stat().st_size for f in inputs)
        out_bytes = P * 2
        dropped = drop_caches()
        merge = json.loads(subprocess.run([sys.executable, "-c", _MERGE, json.dumps(models), json.dumps(fishers),
                                           str(root / "merged")], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1])
        drop_caches()
        copy = json.loads(subprocess.run([sys.executable, "-c", _COPY, json.dumps(inputs), str(root / "copy.bin"),
                                          str(out_bytes)], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    row = {"params": P, "models": args.models, "input_gb": in_bytes / 1e9, "output_gb": out_bytes / 1e9,
           "merge_s": merge["seconds"], "merge_peak_gb": merge["peak_kb"] / 2**20, "disk_floor_s": copy["seconds"],
           "disk_floor_peak_gb": copy["peak_kb"] / 2**20, "vs_disk_floor": merge["seconds"] / copy["seconds"],
           "page_cache_dropped": dropped}
    machine = timing.machine_info("cpu")
    print(f"\n{machine['cpu']}, torch {machine['torch']}; page cache dropped before each run: {dropped}\n")
    print("| models x params | read GB | written GB | merge s | peak resident GB | disk floor s | x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.models} x {P / 1e9:.2f}B bf16 | {row['input_gb']:.1f} | {row['output_gb']:.1f} | {row['merge_s']:.1f} | "
          f"{row['merge_peak_gb']:.2f} | {row['disk_floor_s']:.1f} | {row['vs_disk_floor']:.2f}x |")
    payload = {"benchmark": "merge_cpu", "machine": machine, "rows": [row]}
    path = args.json or results_path("merge_cpu.json")
    print(f"\nwrote {timing.write_json(path, payload)}")
    return payload


if __name__ == "__main__":
    main()
