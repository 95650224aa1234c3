"""CPU backend: the launcher of the fused C kernel (``fastewc/kernels/quadratic_cpu.c``), run by threads.

Host side of the C twin of the Triton kernels. The library is built and loaded by
``fastewc.penalty.native.quadratic`` (compiled on first use, cached, verified before loading);
without it the backend reports why (``cpu_kernel_status``) and ``backend="auto"`` takes the
PyTorch backend instead.

Per (device, dtype) group, one table of segments, built once per plan from the parameters
(their addresses and places in the flat buffers; the plan lives only as long as those hold, see
``GroupPlan``): the rows of the contiguous, non-empty parameters, with one gradient-address and
mode column per use. The value alone reads no gradient (mode 0); the gradients handed to autograd
are written into a fresh flat buffer (byte offsets from its address, ``grad_base``, so the columns
do not depend on the buffer; mode 1); the fused update has its columns written at every call
from the gradients the parameters hold then (1 where the gradient was just allocated and is
written, 2 where it is added to, 0 where the kernel leaves it to torch ops: not contiguous, or of
another dtype). Then the flat range of the group is split among ``torch.get_num_threads()``
threads, each calling the kernel on its share (ctypes releases the GIL during the call) and
returning its partial sum; the partials are added in a fixed order, so the value is the same from
run to run on the same thread count.

Dtypes: parameters and storage float32 or bfloat16 (``takes``); ``select_backend`` gives other
groups to the PyTorch backend. A parameter that is not contiguous is computed with torch ops
(``TorchBackend.whole_tensor``) and its sum added after the kernel's; so is the update of a
gradient the kernel leaves (its sum is the kernel's). Fresh gradients (the forward's eager
gradient, ``penalty_grads``) are views of one flat buffer per group, as on the Triton backend;
when that buffer spans 32 MB or more, its pages are advised to be transparent huge pages before
the kernel writes it (``fastewc._utils.advise_huge_pages``), which saves the page faults of a
fresh allocation (one per 4 KB otherwise) on large models.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..._utils import advise_huge_pages
from ..native import quadratic
from ...native.build import cache_dir
from .base import GroupPlan
from .torch_backend import TorchBackend

__all__ = ["CpuBackend", "cache_dir", "cpu_kernel_status", "library", "library_path", "source_path"]

_SUFFIX = {torch.float32: quadratic.SUFFIX["float32"], torch.bfloat16: quadratic.SUFFIX["bfloat16"]}
# Groups under this many flat elements run on the calling thread: handing work to a pool has a
# fixed cost (waking threads, joining them) that outweighs the kernel's work on a group this small.
PARALLEL_FROM = 1 << 18
# Threads' shares of the flat range start at multiples of this many elements (whole cache lines
# of every dtype, so no two threads write the same line of a gradient).
SHARE_ALIGN = 1024
library = quadratic.library
source_path = quadratic.source_path
library_path = quadratic.library_path
cpu_kernel_status = quadratic.status


@dataclass
class _Table:
    """The kernel's segment table for one plan (see the module docstring)."""

    kernel: object                # the kernel function for the plan's dtypes
    rows: list[int]               # parameter index of each row
    skipped: tuple[int, ...]      # parameters computed with torch ops (not contiguous)
    theta: np.ndarray             # per row: the parameter's address,
    offset: np.ndarray            # its first element in the flat buffers,
    numel: np.ndarray             # its element count
    grad: dict[str, np.ndarray]   # per use ("sum", "fresh", "accumulate"): the gradient column,
    mode: dict[str, np.ndarray]   # and the mode column
    end: int                      # flat element just past the last row
    buffers: tuple[int, int]      # addresses of the plan's importance and anchor buffers
    # Derived: the columns' own addresses per use (read once here, not through numpy every
    # call), and where a single-threaded call writes its sum.
    addresses: dict[str, tuple[int, ...]] = field(init=False)
    out: ctypes.c_double = field(init=False)
    out_address: int = field(init=False)

    def __post_init__(self):
        self.addresses = {use: (self.theta.ctypes.data, self.grad[use].ctypes.data, self.offset.ctypes.data,
                                self.numel.ctypes.data, self.mode[use].ctypes.data) for use in self.grad}
        self.out = ctypes.c_double()
        self.out_address = ctypes.addressof(self.out)


class _Pool:
    """Worker threads for the kernel calls, as many as torch's intra-op threads (less one: the
    calling thread takes a share too); rebuilt when that number changes."""

    def __init__(self):
        self.key = None  # (process id, workers) the executor was made for
        self.executor: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def get(self, workers: int) -> ThreadPoolExecutor:
        # A forked child (DataLoader workers, multiprocessing) inherits the executor without its
        # threads, which would never run a task: it gets a fresh one.
        key = (os.getpid(), workers)
        with self.lock:
            if self.key != key:
                if self.executor is not None and self.key[0] == key[0]:
                    self.executor.shutdown(wait=False)
                self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastewc-cpu")
                self.key = key
            return self.executor


_POOL = _Pool()


class CpuBackend:
    """The fused C kernel over a group's flat buffers, on CPU tensors.

    Args:
        threads: threads per group; None uses ``torch.get_num_threads()`` (groups under
            ``parallel_from`` elements always run on the calling thread).
        poison: fill every buffer this backend allocates (new gradients) with NaN first, so that
            an element the kernel fails to write shows up. For tests.
        parallel_from, share_align: groups under ``parallel_from`` elements run on the calling
            thread; threads' shares start at multiples of ``share_align`` elements (defaults
            ``PARALLEL_FROM`` and ``SHARE_ALIGN``; tests pass 0 and 16 so that even tiny groups
            are split, at shares that cut through parameters).
    """

    name = "cpu"
    eager_grads = True  # forward computes the gradient in its pass over memory (see base.py)
    host_sums = True  # sums come back as floats (see base.py)

    def __init__(self, threads: int | None = None, poison: bool = False, *,
                 parallel_from: int = PARALLEL_FROM, share_align: int = SHARE_ALIGN):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if parallel_from < 0 or share_align < 1:
            raise ValueError(f"parallel_from ({parallel_from}) must not be negative and share_align ({share_align}) positive")
        lib = quadratic.library()
        if lib is None:
            raise RuntimeError(f"the fused CPU kernel is not available: {quadratic.status()}")
        self._lib = lib
        self.threads = threads
        self.poison = poison
        self.parallel_from, self.share_align = parallel_from, share_align
        self.table_builds = 0  # segment tables built: one per plan (tests check it)

    @staticmethod
    def takes(param_dtype: torch.dtype, storage_dtype: torch.dtype) -> bool:
        """Whether the kernel is written for groups of these dtypes (see ``select_backend``)."""
        return param_dtype in _SUFFIX and storage_dtype in _SUFFIX

    # -- the table -----------------------------------------------------------------------------
    def _table(self, plan: GroupPlan) -> _Table:
        """The plan's segment table, built at its first call (see the module docstring)."""
        tab = plan.cache.get("cpu-table")
        if tab is not None:
            return tab
        numels = plan.numels  # a property that walks every view: read once
        contiguous = [p.is_contiguous() for p in plan.params]
        rows = [i for i, ok in enumerate(contiguous) if ok and numels[i] > 0]
        item = torch.finfo(plan.param_dtype).bits // 8  # bytes per gradient element
        offset = np.array([plan.offsets[i] for i in rows], dtype=np.int64)
        numel = np.array([numels[i] for i in rows], dtype=np.int64)
        n = len(rows)
        tab = plan.cache["cpu-table"] = _Table(
            kernel=getattr(self._lib, f"ewc_quadratic_{_SUFFIX[plan.param_dtype]}_{_SUFFIX[plan.importance.dtype]}"),
            rows=rows, skipped=tuple(i for i, ok in enumerate(contiguous) if not ok),
            theta=np.array([plan.params[i].data_ptr() for i in rows], dtype=np.int64), offset=offset, numel=numel,
            grad={"sum": np.zeros(n, dtype=np.int64), "fresh": offset * item,
                  "accumulate": np.zeros(n, dtype=np.int64)},
            mode={"sum": np.zeros(n, dtype=np.int8), "fresh": np.ones(n, dtype=np.int8),
                  "accumulate": np.zeros(n, dtype=np.int8)},
            end=int(offset[-1] + numel[-1]) if n else 0, buffers=(plan.importance.data_ptr(), plan.anchor.data_ptr()))
        self.table_builds += 1
        return tab

    @staticmethod
    def _point_at(tab: _Table, grads: list[torch.Tensor], fresh: list[int], dtype: torch.dtype) -> list[int]:
        """Write the fused update's columns for this call's gradients (``fresh``: the indices of
        those just allocated); the indices of the gradients the kernel leaves to torch ops."""
        rows = tab.rows
        # 0 marks a gradient the kernel cannot take: a contiguous non-empty tensor is never at 0.
        ptrs = [g.data_ptr() if g.dtype is dtype and g.is_contiguous() else 0
                for g in (grads if len(rows) == len(grads) else [grads[i] for i in rows])]
        tab.grad["accumulate"][:] = ptrs
        mode = tab.mode["accumulate"]
        if 0 in ptrs or 0 < len(fresh) < len(grads):
            new = set(fresh)
            mode[:] = [0 if a == 0 else 1 if i in new else 2 for i, a in zip(rows, ptrs)]
            return [i for i, a in zip(rows, ptrs) if a == 0]
        mode.fill(1 if fresh else 2)  # every gradient just allocated, or none
        return []

    # -- one pass ------------------------------------------------------------------------------
    def _run(self, tab: _Table, use: str, lam: float, grad_base: int = 0) -> float:
        """Call the kernel on the table's rows with the columns of ``use``, split among threads;
        their sum."""
        n = len(tab.rows)
        if n == 0:
            return 0.0
        fn = tab.kernel
        theta, grad, offset, numel, mode = tab.addresses[use]
        a_ptr, m_ptr = tab.buffers
        threads = self.threads or max(1, torch.get_num_threads())
        share = -(-tab.end // threads)
        share = -(-share // self.share_align) * self.share_align
        if threads == 1 or tab.end < self.parallel_from or share >= tab.end:
            fn(n, theta, grad, offset, numel, mode, grad_base, a_ptr, m_ptr, 0, tab.end, lam, tab.out_address)
            return tab.out.value
        bounds = [(lo, min(lo + share, tab.end)) for lo in range(0, tab.end, share)]
        outs = (ctypes.c_double * len(bounds))()
        base = ctypes.addressof(outs)

        def call(k: int) -> None:
            lo, hi = bounds[k]
            fn(n, theta, grad, offset, numel, mode, grad_base, a_ptr, m_ptr, lo, hi, lam, base + 8 * k)

        pending = [_POOL.get(threads - 1).submit(call, k) for k in range(1, len(bounds))]
        call(0)
        for f in pending:
            f.result()
        total = 0.0
        for v in outs:  # fixed order: the same value from run to run
            total += v
        return total

    def _fresh_flat(self, plan: GroupPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A fresh gradient buffer with A's layout and its per-parameter views (handed to
        autograd, which adopts them as ``.grad``: one allocation per group and step)."""
        flat = torch.empty(plan.importance.numel(), dtype=plan.param_dtype)
        advise_huge_pages(flat)  # before the first write: see the module docstring
        if self.poison:
            flat.fill_(float("nan"))
        return flat, plan.views_of(flat)

    @staticmethod
    def _total(kernel_sum: float, extra: list[torch.Tensor]) -> float:
        """The group's sum as a float (``host_sums``): the kernel's, plus the fallbacks' in a
        fixed order (deterministic)."""
        for s in extra:
            kernel_sum += s.item()  # a host tensor: no sync
        return kernel_sum

    @staticmethod
    def _fallbacks(indices, run) -> list:
        """``run(i)`` for each of ``indices`` under ``torch.no_grad`` (the kernel's own path
        needs no autograd mode: it makes no tensors from parameters)."""
        if not indices:
            return []
        with torch.no_grad():
            return [run(i) for i in indices]

    # -- the backend interface (base.py) -------------------------------------------------------
    def penalty_sum(self, plan: GroupPlan) -> float:
        tab = self._table(plan)
        s = self._run(tab, "sum", 0.0)
        return self._total(s, self._fallbacks(tab.skipped, lambda i: TorchBackend.whole_tensor(
            plan, i, None, False, "sum")))

    def penalty_sum_and_grads(self, plan: GroupPlan, lam: float) -> tuple[float, list[torch.Tensor]]:
        """``penalty_sum`` and ``[lam * A * (theta - m)]`` in one pass: reads theta, A, m once."""
        tab = self._table(plan)
        flat, views = self._fresh_flat(plan)
        s = self._run(tab, "fresh", lam, flat.data_ptr())
        extra = self._fallbacks(tab.skipped, lambda i: TorchBackend.whole_tensor(
            plan, i, views[i], True, "sum_grads", lam=lam))
        return self._total(s, extra), views

    def penalty_grads(self, plan: GroupPlan, scale: torch.Tensor) -> list[torch.Tensor]:
        tab = self._table(plan)
        flat, views = self._fresh_flat(plan)
        factor = scale.detach().to(dtype=plan.compute_dtype)
        self._run(tab, "fresh", float(factor), flat.data_ptr())
        self._fallbacks(tab.skipped, lambda i: TorchBackend.whole_tensor(
            plan, i, views[i], True, "grads", scale=factor))
        return views

    def accumulate_grad_(self, plan: GroupPlan, lam: float) -> float:
        tab = self._table(plan)
        grads = [p.grad for p in plan.params]
        fresh = [i for i, g in enumerate(grads) if g is None]
        for i in fresh:  # allocated here, written (not read) by the kernel
            p = plan.params[i]
            g = torch.empty_like(p, memory_format=torch.contiguous_format)
            p.grad = grads[i] = g.fill_(float("nan")) if self.poison else g
        left = self._point_at(tab, grads, fresh, plan.param_dtype)
        s = self._run(tab, "accumulate", lam)
        extra = self._fallbacks(tab.skipped, lambda i: TorchBackend.whole_tensor(
            plan, i, grads[i], i in fresh, "accumulate", lam=lam))
        # The kernel summed these rows; torch ops only update their gradients.
        self._fallbacks(left, lambda i: TorchBackend.whole_tensor(plan, i, grads[i], False, "accumulate", lam=lam))
        return self._total(s, extra)
