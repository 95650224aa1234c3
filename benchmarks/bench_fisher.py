"""CPU/GPU benchmark of the Fisher diagonal: fastewc.estimate_fisher against the per-sample
reference loop, a plain training pass (the floor) and the anchors (BackPACK, ASDL, nngeometry) where
they run.

Models (``fastewc.bench.models``): MLP 784-1000-1000-10, a small CNN with BatchNorm on 3x32x32 and
a 2-layer Transformer encoder (d=128, 32 tokens), N = 512 samples in batches of 64; and Hugging
Face models built from config with the default attention and right-padded batches of 64 tokens,
N = 128 sequences in batches of 32: a 6-layer BERT classifier (hidden 384, 12 heads: the MiniLM
shape), GPT-2 (4 layers, 256 wide) and Llama (4 layers, 256 wide, grouped key/value heads).
Kinds: empirical everywhere, sampled everywhere, exact on the MLP and the CNN. Methods: ``auto``
(what users get), ``rules``, ``vmap``, ``loop`` (vmap and loop only on the small models), the
floor row (one batched forward + backward over the same batches) and, on the small models, the
anchors' diagonal Fisher over the same samples (divided by N): BackPACK's SumGradSquared /
DiagGGNMC / DiagGGNExact (install with ``pip install --no-deps backpack-for-pytorch einops
unfoldNd``), ASDL's fisher_emp / fisher_mc / fisher_exact and nngeometry's PMatDiag from its
Jacobian backend at the labels / FIM_MonteCarlo / FIM (both with ``pip install --no-deps
asdfghjkl nngeometry``), from ``fisher_anchors.py``; an anchor's rows are skipped, with the
reason, where it is missing or does not support the model. Cases run round-robin; medians; extra peak memory from one separate
run per case; the first call's probe cost and what auto covered are in the JSON.

    python benchmarks/bench_fisher.py [--samples 512] [--hf-samples 128] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import warnings

from fastewc import bench
from fastewc.bench import timing
from results_path import results_path

import fisher_anchors


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,cnn,transformer,bert,gpt2,llama")
    ap.add_argument("--hf-samples", type=int, default=128, help="padded sequences for bert, gpt2, llama")
    ap.add_argument("--no-anchors", action="store_true", help="skip the BackPACK, ASDL and nngeometry rows")
    ap.add_argument("--methods", default="auto,rules,vmap,loop", help="estimate_fisher methods to time")
    ap.add_argument("--kinds", default="empirical,sampled,exact", help="Fisher kinds (exact only on --exact-models)")
    ap.add_argument("--exact-models", default="mlp,cnn")
    # vmap's exact Fisher takes one per-sample-gradient pass per class, slower than the reference
    # loop on a CPU, and fastewc's loop takes as long as the reference loop: both are left out of
    # the default exact-kind run (the rules form all classes in one backward pass).
    ap.add_argument("--exact-methods", default="auto,rules", help="methods timed for the exact kind")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/fisher_<device>.json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    result = bench.fisher_benchmark(device=args.device, samples=args.samples, repeats=args.repeats,
                                    models=tuple(args.models.split(",")), methods=tuple(args.methods.split(",")),
                                    kinds=tuple(args.kinds.split(",")), exact_models=tuple(args.exact_models.split(",")),
                                    exact_methods=tuple(args.exact_methods.split(",")),
                                    extra_cases=None if args.no_anchors else fisher_anchors.cases,
                                    hf_samples=args.hf_samples,
                                    progress=lambda m: print(m, file=sys.stderr))
    m = result["machine"]
    print(f"\n{m.get('gpu') or m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}\n")
    print(bench.format_fisher(result))
    dev = bench.resolve_device(args.device)
    path = args.json or results_path(f"fisher_{dev.type}.json", dev)
    print(f"\nwrote {timing.write_json(path, result)}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
