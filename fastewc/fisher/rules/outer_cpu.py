"""The launcher of the fused CPU kernel for squared per-sample gradients of a linear map over a
short sequence (``fastewc/kernels/outer_sq_cpu.c``): built, loaded, its threads decided, called.

The kernel computes ``total[o, i] += alpha sum_n (sum_t G[n, t, o] A[n, t, i])^2`` without forming
any sample's ``[O, I]`` gradient in memory, and a bias's ``alpha sum_n (sum_t G[n, t, o])^2`` with
it. Its plain twin is the batched product of ``linear.sq_sum_linear``; which one serves is chosen
there, from the tensors' device, dtype and sequence length, never by catching an error.

The first time a process asks for it, the source is compiled with the system C compiler (through
``fastewc.native``, cached and verified), preferably with ``-fopenmp -march=native``. Threads:
PyTorch's own OpenMP threads keep spinning for a while after each of its parallel operations, so
threads of a second pool would compete with them for the cores (and run slower than one thread).
The kernel therefore runs its parallel region on the process's OpenMP runtime, and does so only
when that runtime is the one PyTorch uses (one OpenMP library mapped into the process, and
PyTorch's parallel backend is OpenMP); otherwise it runs on the calling thread. That is decided
once, when the library is loaded.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...native.library import BASE_FLAGS, NATIVE, OPENMP, Library, ProcessCopy, load_library

__all__ = ["FUNCTIONS", "OuterKernel", "SOURCE_NAME", "kernel", "load"]

SOURCE_NAME = "outer_sq_cpu.c"
FUNCTIONS = {torch.float32: "outer_sq_f32", torch.float64: "outer_sq_f64"}
FLAG_SETS = [(*BASE_FLAGS, OPENMP, NATIVE), (*BASE_FLAGS, OPENMP), (*BASE_FLAGS, NATIVE), BASE_FLAGS]
_OPENMP_LIBRARY = re.compile(r"^lib(g|i|)omp[^/]*\.(so|dylib)")


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [i64, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, ctypes.c_double, ptr, ptr,
                       i64]
        fn.restype = None


def openmp_libraries(maps: str | None = None) -> set[str] | None:
    """The OpenMP runtime files mapped into this process (from ``/proc/self/maps``, or the text
    ``maps``); None where that cannot be read."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode, file
        if len(fields) == 6 and _OPENMP_LIBRARY.match(Path(fields[5].strip()).name):
            found.add(fields[5].strip())
    return found


def shares_torch_openmp(flags: tuple[str, ...], libraries: set[str] | None, parallel_info: str) -> bool:
    """Whether a library built with ``flags`` runs its threads on PyTorch's own OpenMP runtime:
    built with OpenMP, exactly one OpenMP library mapped (``libraries``, after loading it), and
    PyTorch's parallel backend (``torch.__config__.parallel_info()``) is OpenMP."""
    return (OPENMP in flags and libraries is not None and len(libraries) == 1
            and "parallel backend: OpenMP" in parallel_info)


@dataclass
class OuterKernel:
    """A loaded kernel and whether it may use more than the calling thread."""

    library: Library
    threaded: bool

    @property
    def why(self) -> str | None:
        return self.library.why

    def supports(self, t: torch.Tensor) -> bool:
        """Whether tensors like ``t`` can go to the kernel (CPU, float32 or float64)."""
        return self.library.lib is not None and t.device.type == "cpu" and t.dtype in FUNCTIONS

    def __call__(self, G: torch.Tensor, A: torch.Tensor, total: torch.Tensor | None, threads: int | None = None,
                 bias: torch.Tensor | None = None, alpha: float = 1.0, picks: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> None:
        """``total += alpha * sum_n (G[n]^T A[n])^2``: ``G`` ``[n, T, O]``, ``A`` ``[n, T, I]``,
        ``total`` ``[O, I]`` contiguous, all of one supported dtype; and, given ``bias`` ``[O]``
        (contiguous, of that dtype), ``bias += alpha * sum_n (sum_t G[n, t])^2``; ``total``
        None: the bias alone (``A`` is not read). ``picks``: the samples to sum (int64 indices
        into G and A; default all), read where they are with no copy; ``weights``: one per
        summed sample, scaling its gradient (a loss's share). ``threads``: at most this many
        (default PyTorch's thread count where the kernel shares PyTorch's threads, else 1)."""
        n, T, O = G.shape
        I = A.shape[2]
        if total is not None and A.stride(2) != 1:
            A = A.contiguous()
        if total is None and bias is None:
            raise ValueError("outer_sq: nothing to sum into (total and bias are both None)")
        if total is not None and not (total.is_contiguous() and total.shape == (O, I) and A.shape[:2] == (n, T)
                                      and G.dtype == A.dtype == total.dtype):
            raise ValueError(f"outer_sq: G {tuple(G.shape)}, A {tuple(A.shape)} and total {tuple(total.shape)} "
                             "(contiguous) do not fit together")
        if bias is not None and not (bias.is_contiguous() and bias.shape == (O,) and bias.dtype == G.dtype):
            raise ValueError(f"outer_sq: bias {tuple(bias.shape)} {bias.dtype} does not fit G {tuple(G.shape)} "
                             f"{G.dtype} (contiguous, one entry per output)")
        if picks is not None:
            if not (picks.dtype == torch.int64 and picks.dim() == 1 and picks.device.type == "cpu"):
                raise ValueError(f"outer_sq: picks must be a 1-D int64 CPU tensor, got {tuple(picks.shape)} {picks.dtype}")
            if picks.numel() and not (0 <= int(picks.min()) and int(picks.max()) < n):
                raise ValueError(f"outer_sq: picks must index the {n} samples of G, got {picks.tolist()[:8]}")
            picks, n = picks.contiguous(), picks.numel()
        if weights is not None and not (weights.is_contiguous() and weights.shape == (n,) and weights.dtype == G.dtype):
            raise ValueError(f"outer_sq: weights {tuple(weights.shape)} {weights.dtype} do not fit the {n} samples "
                             f"summed ({G.dtype}, contiguous)")
        if n == 0 or T == 0 or O == 0:
            return
        if threads is None:
            threads = torch.get_num_threads() if self.threaded else 1
        fn = getattr(self.library.lib, FUNCTIONS[G.dtype])
        fn(n, T, O, I, G.data_ptr(), G.stride(0), G.stride(1), G.stride(2), A.data_ptr(), A.stride(0), A.stride(1),
           None if total is None else total.data_ptr(), None if bias is None else bias.data_ptr(), float(alpha),
           None if picks is None else picks.data_ptr(), None if weights is None else weights.data_ptr(), threads)


def load(*, cc: list[str] | None = None, folder: Path | None = None, features: str | None = None,
         force: bool = False) -> OuterKernel:
    """Build (or find in the cache) and load the kernel (arguments as in
    ``fastewc.native.library.load_library``)."""
    lib = load_library(SOURCE_NAME, _declare, FLAG_SETS, cc=cc, folder=folder, features=features, force=force)
    threaded = lib.lib is not None and shares_torch_openmp(lib.flags, openmp_libraries(),
                                                            torch.__config__.parallel_info())
    return OuterKernel(lib, threaded)


# This process's kernel, loaded at the first call of kernel().
_process = ProcessCopy(lambda force: load(force=force), lambda k: k.library.lib is not None)


def kernel(*, force: bool = False) -> OuterKernel:
    """This process's kernel (built or loaded on the first call; ``why`` says why not).
    ``force``: build again now, retrying a build that failed (``fastewc info``)."""
    return _process.get(force)
