"""Triton backend: the penalty, its gradient and the fused grad update in one pass over memory.

Host side of ``fastewc.kernels.ewc_penalty``: per ``GroupPlan`` it builds and caches

* the **tile table** (which parameter, where in it, where in the flat buffers, how many
  elements, for each tile of ``BLOCK`` elements). It depends only on the shapes and the flat
  layout, so it is built once per plan and block size;
* the **pointer tables** (each parameter's and grad's address, plus flags). The one without
  gradients (the value, and gradients written into a fresh buffer) is built once per plan: the
  parameters' addresses hold for the plan's life (see ``GroupPlan``). The one for the fused
  update is rebuilt when this call's gradients differ from the last call's in address or flags
  (autograd allocated new grads: ``zero_grad(set_to_none=True)`` then ``backward()``; one small
  table of 24 bytes per tensor per step, copied asynchronously).

One launch covers every tensor of the group (split only past ``max_tiles`` tiles, 2**30 by
default), plus one launch that adds the per-tile partial sums in a fixed order; so a step costs
two launches per group however many tensors the model has, and the value is bitwise repeatable.

Dtypes: parameters float32 / bfloat16 / float16 / float64, storage float32 / bfloat16 / float16
/ float64. Every load is cast to the accumulation type at once: float32, or float64 when the plan's
compute dtype is float64 (float64 parameters or storage), so float64 groups keep the PyTorch
backend's float64 exactness on the same kernels. Gradients are written in the parameter's dtype,
rounded to nearest even (``takes``); ``select_backend`` gives groups of other dtypes to the
PyTorch backend.

Fallback per tensor: a parameter that is not contiguous (e.g. ``channels_last`` convolution
weights), or whose existing ``.grad`` is not contiguous, is flagged "skip" in the pointer table
and computed with torch ops (``TorchBackend.whole_tensor``); the value still comes out of the same
fixed-order sum plus those tensors' sums, in a fixed order.

No host-device synchronisation: tables are copied with ``non_blocking=True`` from pinned memory,
lambda reaches the kernel as a device scalar, and nothing reads a device value on the host. Once
the tables exist (after one warm-up step), a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from fastewc.kernels import ewc_penalty as K

from .base import GroupPlan
from .torch_backend import TorchBackend

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
       torch.float64: tl.float64}
_ALIGN = 16  # bytes for addresses, elements for flat offsets: enough for 16-byte vector loads


@dataclass
class _Layout:
    """The static part of a plan on the Triton backend (see the module docstring)."""

    tiles: torch.Tensor  # int64 [n_tiles, 4] on the device
    n_tiles: int
    block: int
    warps: int
    flat_align: int
    p_ty: object         # tl dtype of the parameters
    acc: torch.dtype     # accumulation dtype (the plan's compute dtype)


@dataclass
class _Pointers:
    table: torch.Tensor  # int64 [n_tensors, 3] on the device
    ptr_align: int
    skipped: tuple[int, ...]  # indices handled by torch ops
    rows: list[tuple[int, int, int]]  # (parameter address, gradient address, flags) per tensor


class TritonBackend:
    """Fused Triton kernels over a group's flat buffers.

    Args:
        block: elements per tile; None picks ``fastewc.kernels.ewc_penalty.tile_config`` by group
            size. A power of two >= 16 (tests pass small ones to get many tiles from small models).
        max_tiles: most tiles per launch (tests pass small ones to exercise split launches).
        poison: fill every buffer this backend allocates (outputs, partials, new grads) with NaN
            first, so that an element the kernels fail to write shows up. For tests.
    """

    name = "triton"
    eager_grads = True  # forward computes the gradient in its pass over memory (see base.py)

    def __init__(self, block: int | None = None, max_tiles: int = K.MAX_TILES_PER_LAUNCH, poison: bool = False):
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        if not 1 <= max_tiles <= K.MAX_TILES_PER_LAUNCH:
            raise ValueError(f"max_tiles must be in [1, {K.MAX_TILES_PER_LAUNCH}], got {max_tiles}")
        self.block = block
        self.max_tiles = max_tiles
        self.poison = poison
        self.table_builds = 0  # parameter pointer tables built: one per plan (tests check it)
        self.grad_table_builds = 0  # fused-update tables built: when the gradients move

    @staticmethod
    def takes(param_dtype: torch.dtype, storage_dtype: torch.dtype) -> bool:
        """Whether the kernels are written for groups of these dtypes (see ``select_backend``)."""
        return param_dtype in _TL and storage_dtype in _TL

    # -- tables --------------------------------------------------------------------------------
    def _layout(self, plan: GroupPlan) -> _Layout:
        key = ("triton-layout", self.block)
        lay = plan.cache.get(key)
        if lay is not None:
            return lay
        total = sum(plan.numels)
        block, warps = (self.block, K.SMALL_WARPS) if self.block is not None else K.tile_config(total)
        numel = torch.tensor(plan.numels, dtype=torch.int64)
        offset = torch.tensor(plan.offsets, dtype=torch.int64)
        per = (numel + block - 1) // block  # tiles per tensor (0 for empty tensors)
        idx = torch.repeat_interleave(torch.arange(len(numel)), per)
        k = torch.arange(len(idx)) - (torch.cumsum(per, 0) - per)[idx]  # tile number in its tensor
        start = k * block
        flat = offset[idx] + start
        count = torch.minimum(numel[idx] - start, torch.tensor(block))
        flat_align = _ALIGN if bool((flat % _ALIGN == 0).all()) else 1  # host tensors: no sync
        tiles = torch.stack([idx, k, flat // flat_align, count], dim=1).contiguous()
        lay = plan.cache[key] = _Layout(_to_device(tiles, plan.device), len(idx), block, warps, flat_align,
                                        _TL[plan.param_dtype], plan.compute_dtype)
        return lay

    @staticmethod
    def _table(rows: list[tuple[int, int, int]], device: torch.device) -> _Pointers:
        """A pointer table of ``(parameter address, gradient address, flags)`` rows."""
        skipped = tuple(i for i, r in enumerate(rows) if r[2] & K.SKIP)
        live = [a for r in rows if not r[2] & K.SKIP for a in r[:2] if a]
        align = _ALIGN if all(a % _ALIGN == 0 for a in live) else 1
        table = torch.tensor([(0, 0, f) if f & K.SKIP else (p // align, g // align, f) for p, g, f in rows],
                             dtype=torch.int64).reshape(len(rows), 3)
        return _Pointers(_to_device(table, device), align, skipped, rows)

    def _pointers(self, plan: GroupPlan, grads: list[torch.Tensor] | None = None,
                  fresh: set[int] = frozenset()) -> _Pointers:
        """Without ``grads``, the parameters' pointer table, built at the plan's first call (their
        addresses hold for the plan's life, see ``GroupPlan``); with them, the fused update's for
        this call's gradients (``fresh``: indices of those just allocated), rebuilt when they
        differ from the last call's in address or flags."""
        ptrs = plan.cache.get("triton-ptrs")
        if ptrs is None:
            rows = [(p.data_ptr(), 0, 0 if p.is_contiguous() else K.SKIP) for p in plan.params]
            ptrs = plan.cache["triton-ptrs"] = self._table(rows, plan.device)
            self.table_builds += 1
        if grads is None:
            return ptrs
        dtype = plan.param_dtype
        rows = [(t, g.data_ptr(), flags | (K.SKIP if not g.is_contiguous() or g.dtype != dtype else 0)
                 | (K.FRESH if i in fresh else 0)) for i, ((t, _, flags), g) in enumerate(zip(ptrs.rows, grads))]
        last = plan.cache.get("triton-ptrs-grad")
        if last is None or last.rows != rows:
            last = plan.cache["triton-ptrs-grad"] = self._table(rows, plan.device)
            self.grad_table_builds += 1
        return last

    def _scale(self, plan: GroupPlan, lam: float) -> torch.Tensor:
        """``lam`` as a cached device scalar in the accumulation dtype (a float kernel argument
        would be float32 even for float64 groups). Creating it is a fill kernel: no sync."""
        cached = plan.cache.get("triton-lam")
        if cached is None or cached[0] != lam:
            cached = plan.cache["triton-lam"] = (lam, torch.full((), lam, dtype=plan.compute_dtype, device=plan.device))
        return cached[1]

    def _empty(self, *shape, dtype, device) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if self.poison else t

    # -- one pass ------------------------------------------------------------------------------
    def _run(self, plan: GroupPlan, *, write_sum: bool, grad_mode: int, scale: torch.Tensor,
             out: torch.Tensor | None = None, grads=None, fresh=frozenset()) -> torch.Tensor | None:
        """Launch the tile kernel (and the fixed-order sum); the sum over kernel-handled tensors
        (a 0-dim tensor, or None when ``write_sum`` is false) and the pointer table used."""
        lay = self._layout(plan)
        ptrs = self._pointers(plan, grads, fresh)
        if lay.n_tiles == 0:
            return (torch.zeros((), dtype=lay.acc, device=plan.device) if write_sum else None), ptrs
        partials = self._empty(lay.n_tiles, dtype=lay.acc, device=plan.device) if write_sum else plan.importance
        out = out if out is not None else plan.importance
        for base in range(0, lay.n_tiles, self.max_tiles):
            K.ewc_tiles_kernel[(min(self.max_tiles, lay.n_tiles - base),)](
                lay.tiles, ptrs.table, plan.importance, plan.anchor, out, partials, scale, base,
                P_TY=lay.p_ty, ACC=_TL[lay.acc], BLOCK=lay.block, FLAT_ALIGN=lay.flat_align,
                PTR_ALIGN=ptrs.ptr_align, WRITE_SUM=write_sum, GRAD_MODE=grad_mode, num_warps=lay.warps)
        if not write_sum:
            return None, ptrs
        total = self._empty(dtype=lay.acc, device=plan.device)
        K.sum_partials_kernel[(1,)](partials, total, lay.n_tiles, RBLOCK=K.REDUCE_BLOCK, num_warps=K.REDUCE_WARPS)
        return total, ptrs

    def _flat_grads(self, plan: GroupPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A fresh gradient buffer in the parameter dtype with A's layout, and per-parameter views.

        The views go to autograd, which adopts them as ``p.grad`` when it can (one allocation per
        group and step instead of one per tensor; the layout keeps them 16-byte aligned).
        """
        flat = self._empty(plan.importance.numel(), dtype=plan.param_dtype, device=plan.device)
        return flat, plan.views_of(flat)

    @staticmethod
    def _plus(total: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        for s in extra:  # fixed order: deterministic
            total = total + s
        return total

    # -- the backend interface (base.py) -------------------------------------------------------
    def penalty_sum(self, plan: GroupPlan) -> torch.Tensor:
        with torch.no_grad():
            total, ptrs = self._run(plan, write_sum=True, grad_mode=0, scale=plan.importance)
            return self._plus(total, [TorchBackend.whole_tensor(plan, i, None, False, "sum") for i in ptrs.skipped])

    def penalty_sum_and_grads(self, plan: GroupPlan, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``penalty_sum`` and ``[lam * A * (theta - m)]`` in one pass: reads theta, A, m once."""
        with torch.no_grad():
            flat, views = self._flat_grads(plan)
            total, ptrs = self._run(plan, write_sum=True, grad_mode=1, scale=self._scale(plan, lam), out=flat)
            extra = [TorchBackend.whole_tensor(plan, i, views[i], True, "sum_grads", lam=lam) for i in ptrs.skipped]
            return self._plus(total, extra), views

    def penalty_grads(self, plan: GroupPlan, scale: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            flat, views = self._flat_grads(plan)
            scale = scale.to(device=plan.device, dtype=plan.compute_dtype)
            _, ptrs = self._run(plan, write_sum=False, grad_mode=1, scale=scale, out=flat)
            for i in ptrs.skipped:
                TorchBackend.whole_tensor(plan, i, views[i], True, "grads", scale=scale)
            return views

    def accumulate_grad_(self, plan: GroupPlan, lam: float) -> torch.Tensor:
        with torch.no_grad():
            grads, fresh = [], set()
            for i, p in enumerate(plan.params):
                if p.grad is None:  # allocated here, written (not read) by the kernel
                    p.grad = self._empty(*p.shape, dtype=p.dtype, device=p.device)
                    fresh.add(i)
                grads.append(p.grad)
            total, ptrs = self._run(plan, write_sum=True, grad_mode=2, scale=self._scale(plan, lam),
                                    grads=grads, fresh=fresh)
            extra = [TorchBackend.whole_tensor(plan, i, grads[i], i in fresh, "accumulate", lam=lam) for i in ptrs.skipped]
            return self._plus(total, extra)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host table to ``device`` without a host-device sync (pinned memory, async copy)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
