"""Timing helpers shared by ``fastewc bench`` and the benchmark scripts: machine description,
side-by-side medians, copy bandwidth (the memory-traffic floor's denominator), extra peak memory
and the process's resident-memory figures it is read from."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on: CPU model, cores, threads, GPU, library versions."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(cases: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                      device: torch.device | str = "cpu",
                      on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each case, measured round-robin (one call of every case per round) so
    that machine noise hits all cases alike; ratios of medians are what to report.
    ``on_round(k)`` is called after round k (progress display).

    Each round runs the cases in a new order (shuffled with a fixed seed, so a run is
    reproducible): a case that always ran right after the same other one would always find the
    caches and the allocator as that one left them (cold after a slow reference loop), and the
    ratio would carry that bias. ``times[name]`` keeps the rounds' order."""
    device = torch.device(device)
    order, shuffle = list(cases), random.Random(0).shuffle
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        shuffle(order)
        for name in order:
            fn = cases[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if on_round is not None:
            on_round(r)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def copy_case(numel: int, device: torch.device | str = "cpu") -> tuple[Callable[[], object], int]:
    """A large fp32 copy and the bytes it moves (read + write): bytes / time = copy bandwidth."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 8 * numel


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def proc_status_kb(field: str) -> int | None:
    """A field of ``/proc/self/status`` in kB (``"VmRSS"``, ``"VmHWM"``), None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int | None]:
    """Run ``fn`` once; return ``(result, extra peak bytes)`` over the memory in use before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux): the process's resident
    high-water mark (``VmHWM``), reset first through ``/proc/self/clear_refs``; None where the
    reset is not possible (the figure would include earlier peaks).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    libc = glibc()
    if libc is not None:
        # glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold resident and
        # reuses them, so a probe after earlier work would see no growth. For the probe, serve
        # every block over 64 KB by mmap (returned to the OS on free) and trim the heap first.
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    try:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            return fn(), None
        base = proc_status_kb("VmRSS")
        out = fn()
        peak = proc_status_kb("VmHWM")
        return out, None if base is None or peak is None else max(0, peak - base) * 1024
    finally:
        if libc is not None:
            # glibc's dynamic threshold tops out at 32 MB in a warmed-up process; setting it pins it
            # there (mallopt turns the dynamic adjustment off), which later timings then run under.
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)


_M_MMAP_THRESHOLD = -3


def glibc():
    """glibc through ctypes (``malloc_trim``, ``mallopt``), None on other C libraries."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
