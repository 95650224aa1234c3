"""The fused CPU kernel for squared per-sample gradients of a linear map over a sequence
(``fastewc/kernels/outer_sq_cpu.c``) against its plain twin, the batched products of
``fastewc.fisher.rules.linear.sq_sum_linear``, side by side: where the kernel should serve.

For each (positions T, inputs, outputs) of transformer-sized layers, N = 32 samples, float32:
``sq_sum_linear(A, [G], bias=False)`` with ``kernel=None`` (batched products) and with this
process's kernel, forced on whatever T; and, for scale, ``mm``: one plain matrix product of the same
FLOPs (the batch's weight gradient, ``G^T A`` over all ``N T`` rows, which the BLAS runs at its best
speed and which squares nothing). Each timed call follows one small PyTorch matrix product,
as a rule's call follows the backward pass's operations in ``estimate_fisher`` (PyTorch's OpenMP
threads are then still spinning); that product's own median time is subtracted from both.
Cases run round-robin; medians are reported; GFLOP/s counts the
per-sample products' ``2 N T in out``. ``kernel_max_t`` in the JSON is the library's
``KERNEL_MAX_T``, the longest sequence that goes to the kernel by default.

    python benchmarks/bench_outer_sq.py [--repeats 15] [--json PATH]
"""

from __future__ import annotations

import argparse

import torch

from fastewc.bench import timing
from fastewc.fisher.rules import linear, outer_cpu
from results_path import results_path

SHAPES = [(t, i, o) for t in (2, 5, 8, 17, 32, 64, 128, 256) for i, o in ((128, 128), (128, 512), (512, 128))]
SHAPES += [(5, 128, 2000), (64, 128, 2000)]  # a tied language-model head


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None, help="default: benchmarks/results/<machine>/outer_sq_cpu.json")
    args = ap.parse_args(argv)
    kernel = outer_cpu.kernel()
    if kernel.why is not None:
        raise SystemExit(f"the kernel is not available here: {kernel.why}")
    warm = torch.randn(256, 256)
    rows = []
    print(f"N = {args.samples}, float32, kernel threaded: {kernel.threaded}; medians of {args.repeats} rounds\n")
    print(f"| {'T':>4} | {'in':>4} | {'out':>5} | {'products ms':>11} | {'kernel ms':>9} | {'GFLOP/s':>13} | "
          f"{'mm GF/s':>7} | {'speed-up':>8} |")
    print(f"|{'-' * 6}|{'-' * 6}|{'-' * 7}|{'-' * 13}|{'-' * 11}|{'-' * 15}|{'-' * 9}|{'-' * 10}|")
    torch.manual_seed(0)
    for t, i, o in SHAPES:
        A, G = torch.randn(args.samples, t, i), torch.randn(args.samples, t, o)

        def case(k):
            def run():
                torch.mm(warm, warm)
                return linear.sq_sum_linear(A, [G], False, kernel=k)
            return run

        def kernel_run():  # the kernel on any T (sq_sum_linear sends it only up to KERNEL_MAX_T)
            torch.mm(warm, warm)
            kernel(G, A, torch.zeros(o, i))

        Gf, Af = G.reshape(-1, o), A.reshape(-1, i)

        def mm_run():  # the same FLOPs as one plain product: the batch's weight gradient
            torch.mm(warm, warm)
            torch.mm(Gf.t(), Af)

        times = timing.time_side_by_side({"products": case(None), "kernel": kernel_run, "mm": mm_run,
                                          "warm": lambda: torch.mm(warm, warm)}, repeats=args.repeats)
        base = timing.median(times["warm"])
        p, k, m = (timing.median(times[c]) - base for c in ("products", "kernel", "mm"))
        flop = 2 * args.samples * t * i * o
        rows.append({"T": t, "in": i, "out": o, "products_s": p, "kernel_s": k, "mm_s": m, "speedup": p / k})
        print(f"| {t:>4} | {i:>4} | {o:>5} | {p * 1e3:>11.3f} | {k * 1e3:>9.3f} | {flop / p / 1e9:>5.0f} / {flop / k / 1e9:>5.0f} "
              f"| {flop / m / 1e9:>7.0f} | {p / k:>7.2f}x |")
    result = {"machine": timing.machine_info("cpu"), "samples": args.samples, "dtype": "float32",
              "threaded": kernel.threaded, "kernel_max_t": linear.KERNEL_MAX_T, "repeats": args.repeats, "rows": rows}
    path = args.json or results_path("outer_sq_cpu.json")
    print(f"\nwrote {timing.write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
