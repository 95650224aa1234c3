"""CPU backend: the launcher of the fused C kernel (``fastewc/kernels/quadratic_cpu.c``), run by threads.

Host side of the C twin of the Triton kernels. The library is built and loaded by
``fastewc.penalty.native.quadratic`` (compiled on first use, cached, verified before loading);
without it the backend reports why (``cpu_kernel_status``) and ``backend="auto"`` takes the
PyTorch backend instead.

Per step, per (device, dtype) group: one table of segments (each protected parameter's
address, its gradient's address, its place in the flat buffers, and whether its gradient is
read, written or not touched). While the binding vouches for the parameters (the plan's
``params_token``) the table's parameter columns stand and only its gradient columns are
rewritten, in place; otherwise every address is read and the
table rebuilt when one changed. Then the flat range of the group is split among
``torch.get_num_threads()`` threads, each calling the kernel on its share (ctypes releases the
GIL during the call) and returning its partial sum; the partials are added in a fixed order, so
the value is the same from run to run on the same thread count.

Dtypes: parameters and storage float32 or bfloat16. Any other pair sends the whole group to the
PyTorch backend; a parameter that is not contiguous, or whose existing ``.grad`` is not (or has
another dtype), is computed with torch ops (``TorchBackend.whole_tensor``) and added after the
kernel's sum. Fresh gradients (the forward's eager gradient, ``penalty_grads``) are views of one
flat buffer per group, as on the Triton backend; when that buffer spans 32 MB or more, its pages
are advised to be transparent huge pages before the kernel writes it
(``fastewc._utils.advise_huge_pages``), which saves the page faults of a fresh allocation (one
per 4 KB otherwise) on large models.
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
from ..native.build import cache_dir
from .base import GroupPlan
from .torch_backend import TorchBackend

__all__ = ["CpuBackend", "cache_dir", "cpu_kernel_status", "library", "library_path", "source_path"]

_SUFFIX = {torch.float32: quadratic.SUFFIX["float32"], torch.bfloat16: quadratic.SUFFIX["bfloat16"]}
_TORCH = TorchBackend()  # the whole-group fallback for dtypes the kernel does not take
# Groups under this many flat elements run on the calling thread: handing work to a pool costs
# tens of microseconds, more than the kernel spends on a group this small.
PARALLEL_FROM = 1 << 18
# Threads' shares of the flat range start at multiples of this many elements (whole cache lines
# of every dtype, so no two threads write the same line of a gradient).
SHARE_ALIGN = 1024
library = quadratic.library
source_path = quadratic.source_path
library_path = quadratic.library_path
cpu_kernel_status = quadratic.status


_UNKNOWN = object()  # a column's content that no list of addresses equals


@dataclass
class _Segments:
    """The kernel's segment table for one set of addresses (see the module docstring)."""

    key: tuple
    arrays: tuple[np.ndarray, ...]  # theta addresses, grad addresses, offsets, numels, modes
    skipped: tuple[int, ...]        # parameter indices computed with torch ops
    end: int                        # flat element just past the last segment
    kernel: object = None            # the kernel function for the plan's dtypes
    keep: list[int] | None = None    # parameter index of each row (None: every parameter, in order)
    token: object = None             # the plan's params_token when built (see GroupPlan)
    buffers: tuple[int, int] = (0, 0)  # addresses of the plan's importance and anchor buffers
    grad_column: list | None = None  # what the grad and mode columns hold now (accumulate tables),
    mode_column: list | None = None  # as lists: comparing them costs less than reading the arrays
    # Derived: the arrays' own addresses (reading them costs microseconds), and where a
    # single-threaded call writes its sum.
    addresses: tuple[int, ...] = field(init=False)
    out: ctypes.c_double = field(init=False)
    out_address: int = field(init=False)

    def __post_init__(self):
        self.addresses = tuple(a.ctypes.data for a in self.arrays)
        self.out = ctypes.c_double()
        self.out_address = ctypes.addressof(self.out)

    def set_grads(self, grads: list[torch.Tensor], modes: list[int] | None, dtype: torch.dtype) -> bool:
        """Point an accumulate table at this step's gradients, in place (the parameters' columns
        are known to hold): False, changing nothing, if a gradient needs the torch-op fallback
        (not contiguous, or of another dtype) or the table has fallbacks of its own."""
        if self.skipped:
            return False
        ptrs = [g.data_ptr() if g.dtype is dtype and g.is_contiguous() else -1 for g in grads]
        if -1 in ptrs:
            return False
        if self.keep is not None:
            ptrs = [ptrs[i] for i in self.keep]
            modes = [modes[i] for i in self.keep] if modes is not None else None
        if ptrs != self.grad_column or modes != self.mode_column:
            self.arrays[1][:] = ptrs
            self.arrays[4][:] = 2 if modes is None else modes
            self.columns_rewritten()
            self.grad_column, self.mode_column = ptrs, modes
        return True

    def columns_rewritten(self) -> None:
        """The gradient and mode columns were written: the lists no longer say what they hold,
        and the rows are no longer what ``key`` was built from (a full check rebuilds)."""
        self.grad_column = self.mode_column = _UNKNOWN
        self.key = None


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
            ``PARALLEL_FROM`` elements always run on the calling thread).
        poison: fill every buffer this backend allocates (new gradients) with NaN first, so that
            an element the kernel fails to write shows up. For tests.
    """

    name = "cpu"
    eager_grads = True  # forward computes the gradient in its pass over memory (see base.py)
    host_sums = True  # sums come back as floats (see base.py)

    def __init__(self, threads: int | None = None, poison: bool = False):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        lib = quadratic.library()
        if lib is None:
            raise RuntimeError(f"the fused CPU kernel is not available: {quadratic.status()}")
        self._lib = lib
        self.threads = threads
        self.poison = poison
        self.table_builds = 0  # segment tables built (tests check that caching works)

    @staticmethod
    def takes(plan: GroupPlan) -> bool:
        """Whether the kernel runs this group (else the PyTorch backend does, whole)."""
        return (plan.device.type == "cpu" and plan.param_dtype in _SUFFIX and plan.importance.dtype in _SUFFIX
                and plan.anchor.dtype == plan.importance.dtype)

    # -- tables --------------------------------------------------------------------------------
    def _segments(self, plan: GroupPlan, kind: str, grads: list | None = None, modes: list[int] | None = None
                  ) -> _Segments:
        """The segment table for the live parameters, cached per ``kind`` while no address it
        holds changes. ``kind``: "sum" (value only), "fresh" (write each gradient at its byte
        offset into a fresh flat buffer, given to the kernel as ``grad_base``: the table does
        not depend on the buffer), "accumulate" (``grads``: one tensor per parameter; ``modes``:
        1 where it was just allocated and is written, 2 where it is added to; None: all 2).

        While the plan's ``params_token`` is the one the table was built with, the parameters'
        columns are reused without looking at the parameters; an accumulate table then only
        has its gradient columns rewritten."""
        seg = plan.cache.get(("cpu-segments", kind))
        token = plan.params_token
        if seg is not None and token is not None and seg.token is token:
            if kind != "accumulate" or seg.set_grads(grads, modes, plan.param_dtype):
                return seg
        rows, skipped = [], []
        if kind == "accumulate":
            dtype = plan.param_dtype
            for i, (p, g) in enumerate(zip(plan.params, grads)):
                if p.is_contiguous() and g.is_contiguous() and g.dtype == dtype:
                    rows.append((p.data_ptr(), g.data_ptr(), 2 if modes is None else modes[i]))
                else:
                    skipped.append(i)
                    rows.append(None)
        else:
            item = torch.finfo(plan.param_dtype).bits // 8  # bytes per gradient element
            for i, (p, offset) in enumerate(zip(plan.params, plan.offsets)):
                if p.is_contiguous():
                    rows.append((p.data_ptr(), offset * item, 1) if kind == "fresh" else (p.data_ptr(), 0, 0))
                else:
                    skipped.append(i)
                    rows.append(None)
        key = tuple(rows)
        if seg is not None and seg.key == key:
            seg.token = token
            return seg
        numels = plan.numels  # a property that walks every view: read once
        keep = [i for i, r in enumerate(rows) if r is not None and numels[i] > 0]
        theta = np.array([rows[i][0] for i in keep], dtype=np.int64)
        grad = np.array([rows[i][1] for i in keep], dtype=np.int64)
        offset = np.array([plan.offsets[i] for i in keep], dtype=np.int64)
        numel = np.array([numels[i] for i in keep], dtype=np.int64)
        mode = np.array([rows[i][2] for i in keep], dtype=np.int8)
        end = int(offset[-1] + numel[-1]) if keep else 0
        kernel = getattr(self._lib, f"ewc_quadratic_{_SUFFIX[plan.param_dtype]}_{_SUFFIX[plan.importance.dtype]}")
        seg = plan.cache[("cpu-segments", kind)] = _Segments(
            key, (theta, grad, offset, numel, mode), tuple(skipped), end, kernel=kernel,
            keep=None if len(keep) == len(rows) else keep, token=token,
            buffers=(plan.importance.data_ptr(), plan.anchor.data_ptr()))
        if kind == "accumulate":
            seg.grad_column, seg.mode_column = grad.tolist(), mode.tolist() if modes is not None else None
        self.table_builds += 1
        return seg

    # -- one pass ------------------------------------------------------------------------------
    def _pass(self, plan: GroupPlan, kind: str, lam: float, *, grads: list | None = None,
              modes: list[int] | None = None, flat: torch.Tensor | None = None) -> tuple[float, _Segments]:
        """Run the kernel over the group (``kind`` and the rest as in ``_segments``; ``flat``:
        the fresh gradient buffer of kind "fresh"); (sum over the kernel's segments, the table)."""
        seg = self._segments(plan, kind, grads, modes)
        return self._run(seg, lam, flat.data_ptr() if kind == "fresh" else 0), seg

    def _run(self, seg: _Segments, lam: float, grad_base: int = 0) -> float:
        """Call the kernel on the table's segments, split among threads; their sum."""
        n = len(seg.arrays[0])
        if n == 0:
            return 0.0
        fn = seg.kernel
        theta, grad, offset, numel, mode = seg.addresses
        a_ptr, m_ptr = seg.buffers
        threads = self.threads or max(1, torch.get_num_threads())
        share = -(-seg.end // threads)
        share = -(-share // SHARE_ALIGN) * SHARE_ALIGN
        if threads == 1 or seg.end < PARALLEL_FROM or share >= seg.end:
            fn(n, theta, grad, offset, numel, mode, grad_base, a_ptr, m_ptr, 0, seg.end, lam, seg.out_address)
            return seg.out.value
        bounds = [(lo, min(lo + share, seg.end)) for lo in range(0, seg.end, share)]
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

    def _fallbacks(self, seg: _Segments, run) -> list:
        """``run(i)`` for each parameter the table skipped, under ``torch.no_grad`` (the kernel's
        own path needs no autograd mode: it makes no tensors from parameters)."""
        if not seg.skipped:
            return []
        with torch.no_grad():
            return [run(i) for i in seg.skipped]

    def _takes(self, plan: GroupPlan) -> bool:
        takes = plan.cache.get("cpu-takes")
        if takes is None:
            takes = plan.cache["cpu-takes"] = self.takes(plan)
        return takes

    # -- the backend interface (base.py) -------------------------------------------------------
    def penalty_sum(self, plan: GroupPlan) -> float | torch.Tensor:
        if not self._takes(plan):
            return _TORCH.penalty_sum(plan)
        s, seg = self._pass(plan, "sum", 0.0)
        return self._total(s, self._fallbacks(seg, lambda i: TorchBackend.whole_tensor(plan, i, None, False, "sum")))

    def penalty_sum_and_grads(self, plan: GroupPlan, lam: float) -> tuple[float | torch.Tensor, list[torch.Tensor]]:
        """``penalty_sum`` and ``[lam * A * (theta - m)]`` in one pass: reads theta, A, m once."""
        if not self._takes(plan):
            return _TORCH.penalty_sum_and_grads(plan, lam)
        flat, views = self._fresh_flat(plan)
        s, seg = self._pass(plan, "fresh", lam, flat=flat)
        extra = self._fallbacks(seg, lambda i: TorchBackend.whole_tensor(plan, i, views[i], True, "sum_grads", lam=lam))
        return self._total(s, extra), views

    def penalty_grads(self, plan: GroupPlan, scale: torch.Tensor) -> list[torch.Tensor]:
        if not self._takes(plan):
            return _TORCH.penalty_grads(plan, scale)
        flat, views = self._fresh_flat(plan)
        factor = scale.detach().to(dtype=plan.compute_dtype)
        _, seg = self._pass(plan, "fresh", float(factor), flat=flat)
        self._fallbacks(seg, lambda i: TorchBackend.whole_tensor(plan, i, views[i], True, "grads", scale=factor))
        return views

    def accumulate_grad_(self, plan: GroupPlan, lam: float) -> float | torch.Tensor:
        if not self._takes(plan):
            return _TORCH.accumulate_grad_(plan, lam)
        grads = [p.grad for p in plan.params]
        missing = [i for i, g in enumerate(grads) if g is None]
        modes = None  # every gradient added to
        if missing:
            modes = [2] * len(grads)
            for i in missing:  # allocated here, written (not read) by the kernel
                p = plan.params[i]
                g = torch.empty_like(p, memory_format=torch.contiguous_format)
                p.grad = grads[i] = g.fill_(float("nan")) if self.poison else g
                modes[i] = 1
        s, seg = self._pass(plan, "accumulate", lam, grads=grads, modes=modes)
        extra = self._fallbacks(seg, lambda i: TorchBackend.whole_tensor(
            plan, i, grads[i], modes is not None and modes[i] == 1, "accumulate", lam=lam))
        return self._total(s, extra)
