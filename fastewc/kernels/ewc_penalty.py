"""Triton kernels for the EWC quadratic ``sum_i A_i (theta_i - m_i)^2`` and its gradient.

Everything here works on one (device, parameter dtype) group: the live parameters (and, for the
fused update, their ``.grad`` tensors) are reached through an int64 pointer table, while the
importance ``A`` and anchor ``m`` are two flat buffers in the storage dtype. The regularizer has
already folded lambdas, per-layer scales and tasks into ``A`` and ``m``, so the kernels compute
only the quadratic.

Tables (built and cached by ``fastewc.penalty.backends.triton_backend``):

* tile table, int64 ``[n_tiles, 4]``, one row per tile of at most ``BLOCK`` elements of one
  parameter: ``(tensor index, start // BLOCK, flat offset // FLAT_ALIGN, element count)``. It
  depends only on the shapes and the flat layout, so it is built once per plan.
* pointer table, int64 ``[n_tensors, 3]``: ``(param address // PTR_ALIGN, grad address //
  PTR_ALIGN, flags)``; flags bit 0 = skip (the tensor is handled by torch ops, e.g. it is not
  contiguous), bit 1 = the grad was just allocated (write it, do not read it). Rebuilt whenever a
  data pointer changes.

Offsets are stored divided by their alignment and multiplied back by a constexpr in the kernel:
that way Triton's axis analysis knows the addresses are multiples of 16 bytes and can emit
16-byte vector loads; a value loaded from memory carries no such knowledge otherwise.

Kernels:

* ``ewc_tiles_kernel``: one program per tile. Loads theta, A, m (each cast to the accumulation
  type at once), ``u = A * (theta - m)``; optionally writes the tile's partial sum ``sum u * d``,
  and/or ``scale * u`` into a flat gradient buffer (``GRAD_MODE=1``), or ``grad + scale * u``
  into the live grads (``GRAD_MODE=2``). One compiled variant per constexpr combination.
* ``sum_partials_kernel``: one program that adds the partials in a fixed order: a deterministic
  result without float atomics.

Launch heuristics (``tile_config``, ``REDUCE_*``) are here too; multi-config autotuning is not
used because it does not run under ``TRITON_INTERPRET=1`` and the kernels are memory-bound, where
a fixed, well-reasoned configuration is within noise of a tuned one.
"""

from __future__ import annotations

import triton
import triton.language as tl

SKIP = 1   # pointer-table flag: tensor handled outside the kernel
FRESH = 2  # pointer-table flag: grad just allocated (GRAD_MODE=2 writes without reading it)

# Tiles at or under this group size use SMALL_BLOCK elements, larger groups LARGE_BLOCK.
# 1024 elements x 4 warps = 8 elements (two 16-byte fp32 vectors) per thread and array: enough
# bytes in flight per SM, and a 16M-element group still yields 16K tiles (over 100 waves of
# 132 SMs), so the tail wave costs < 1%. Above that, 4096-element tiles (8 warps, 16 elements per
# thread) quarter the per-tile overhead (4 table loads, one partial, one program) and the size
# of the partials buffer; a 1B-element group then has 256K tiles, still plenty of parallelism.
# Small tensors (biases, norms) waste masked lanes, not memory traffic.
SMALL_BLOCK, SMALL_WARPS = 1024, 4
LARGE_BLOCK, LARGE_WARPS = 4096, 8
LARGE_FROM = 1 << 24
# The second stage reads n_tiles partials with one program; 1024 lanes keep it a few microseconds
# even at 256K partials, which is noise next to the main pass over >= 1 GB.
REDUCE_BLOCK, REDUCE_WARPS = 1024, 4
# CUDA limits grid dimension x to 2**31 - 1 programs; launches are split at this many tiles.
MAX_TILES_PER_LAUNCH = 1 << 30


def tile_config(numel: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a group of ``numel`` elements (see the constants above)."""
    if numel > LARGE_FROM:
        return LARGE_BLOCK, LARGE_WARPS
    return SMALL_BLOCK, SMALL_WARPS


@triton.jit
def _round_to(x, DST: tl.constexpr):
    """``x`` (float32 or float64) in ``DST``, rounded to nearest, ties to even, as torch's ``.to``.

    bfloat16 is rounded with integer ops on the float32 bits instead of a cast: the interpreter
    truncates fp32 -> bf16 casts (and mangles fp64 -> bf16), so a cast would round differently
    under test than on the GPU; the bit trick is exact on both and costs nothing in a
    memory-bound kernel. Half-precision results go through float32 first, as torch does.
    """
    if DST == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        top = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # carries into the exponent as it should
        top = tl.where(x != x, 0x7FC0, top)  # NaN stays a (quiet) NaN
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DST == tl.float16:
        return x.to(tl.float32).to(tl.float16)
    else:
        return x.to(DST)


@triton.jit
def _tile(theta_p, grad_p, a_p, m_p, out_p, offs, n, scale,
          ACC: tl.constexpr, MASKED: tl.constexpr, READ_GRAD: tl.constexpr,
          GRAD_MODE: tl.constexpr):
    """One tile: ``u = A (theta - m)``; grads written per GRAD_MODE; returns ``sum u (theta - m)``.

    ``theta_p``, ``grad_p``, ``a_p``, ``m_p``, ``out_p``: pointers to the tile's first element.
    ``MASKED``: the tile may be partial (``n < BLOCK``) or skipped; full tiles run unmasked so
    the loads can be vectorised. ``READ_GRAD``: the existing grad is valid (not just allocated).
    """
    if MASKED:
        mask = offs < n
        theta = tl.load(theta_p + offs, mask=mask, other=0.0).to(ACC)
        a = tl.load(a_p + offs, mask=mask, other=0.0).to(ACC)
        m = tl.load(m_p + offs, mask=mask, other=0.0).to(ACC)
    else:
        theta = tl.load(theta_p + offs).to(ACC)
        a = tl.load(a_p + offs).to(ACC)
        m = tl.load(m_p + offs).to(ACC)
    d = theta - m
    u = a * d
    if GRAD_MODE == 1:  # fresh flat output in the parameter dtype
        g = _round_to(u * scale, out_p.dtype.element_ty)
        if MASKED:
            tl.store(out_p + offs, g, mask=mask)
        else:
            tl.store(out_p + offs, g)
    elif GRAD_MODE == 2:  # the live grad, updated in place
        if READ_GRAD:
            if MASKED:
                old = tl.load(grad_p + offs, mask=mask, other=0.0).to(ACC)
            else:
                old = tl.load(grad_p + offs).to(ACC)
            g = _round_to(old + u * scale, grad_p.dtype.element_ty)
        else:
            g = _round_to(u * scale, grad_p.dtype.element_ty)
        if MASKED:
            tl.store(grad_p + offs, g, mask=mask)
        else:
            tl.store(grad_p + offs, g)
    # Computed always (the compiler drops it when the caller does not store it).
    return tl.sum(u * d, axis=0)


@triton.jit
def ewc_tiles_kernel(
    tiles_ptr,     # int64 [n_tiles, 4], see the module docstring
    ptrs_ptr,      # int64 [n_tensors, 3]
    a_ptr,         # flat importance A, storage dtype
    m_ptr,         # flat anchor m, storage dtype
    out_ptr,       # GRAD_MODE=1: flat gradient buffer (parameter dtype, A's layout); else unused
    partials_ptr,  # WRITE_SUM: [n_tiles] accumulation dtype, one partial per tile; else unused
    scale_ptr,     # 0-dim accumulation-dtype tensor: the factor on the gradient (lam, grad_out*lam)
    tile_base,     # first tile of this launch (launches are split at MAX_TILES_PER_LAUNCH)
    P_TY: tl.constexpr,        # parameter (and grad) element type
    ACC: tl.constexpr,         # accumulation type: fp32, or fp64 for float64 groups
    BLOCK: tl.constexpr,       # elements per tile (tile_config)
    FLAT_ALIGN: tl.constexpr,  # flat offsets are stored divided by this (16 when all are multiples)
    PTR_ALIGN: tl.constexpr,   # addresses are stored divided by this (16 when all are 16-byte aligned)
    WRITE_SUM: tl.constexpr,   # write the tile's partial sum
    GRAD_MODE: tl.constexpr,   # 0: no gradient, 1: into out_ptr, 2: into the live grads
):
    t = tile_base + tl.program_id(0).to(tl.int64)
    row = tiles_ptr + 4 * t
    idx = tl.load(row)
    start = tl.load(row + 1) * BLOCK
    flat = tl.load(row + 2) * FLAT_ALIGN
    n = tl.load(row + 3)
    entry = ptrs_ptr + 3 * idx
    flags = tl.load(entry + 2)
    n = tl.where((flags & 1) == 0, n, 0)  # skipped tensor: every lane masked off, partial 0
    fresh = flags & 2
    theta_p = (tl.load(entry) * PTR_ALIGN).to(tl.pointer_type(P_TY)) + start
    grad_p = theta_p  # only dereferenced with GRAD_MODE=2
    if GRAD_MODE == 2:
        grad_p = (tl.load(entry + 1) * PTR_ALIGN).to(tl.pointer_type(P_TY)) + start
    scale = tl.load(scale_ptr).to(ACC)
    offs = tl.arange(0, BLOCK)
    a_p = a_ptr + flat
    m_p = m_ptr + flat
    out_p = out_ptr + flat
    if (n == BLOCK) & (fresh == 0):
        part = _tile(theta_p, grad_p, a_p, m_p, out_p, offs, n, scale,
                     ACC, False, True, GRAD_MODE)
    elif fresh == 0:
        part = _tile(theta_p, grad_p, a_p, m_p, out_p, offs, n, scale,
                     ACC, True, True, GRAD_MODE)
    else:
        part = _tile(theta_p, grad_p, a_p, m_p, out_p, offs, n, scale,
                     ACC, True, False, GRAD_MODE)
    if WRITE_SUM:
        tl.store(partials_ptr + t, part)


@triton.jit
def sum_partials_kernel(partials_ptr, out_ptr, n, RBLOCK: tl.constexpr):
    """``out[0] = sum(partials[:n])`` by one program, always in the same order (deterministic).

    Lane ``j`` adds elements ``j, j + RBLOCK, ...`` in sequence, then a fixed tree adds the lanes.
    """
    offs = tl.arange(0, RBLOCK)
    acc = tl.zeros((RBLOCK,), partials_ptr.dtype.element_ty)
    for i in range(0, n, RBLOCK):
        acc += tl.load(partials_ptr + i + offs, mask=i + offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))
