"""Small helpers both halves of the library share: unwrapping wrapped models (and their parameter
names), eval mode, free memory, huge pages for fresh buffers, and lazy imports of optional
dependencies. Imports nothing from the rest of fastewc."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import sys

import torch
import torch.nn as nn

try:  # DTensor is in every torch this package supports, but keep import errors readable
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment]


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def require(module: str, *, extra: str, package: str | None = None):
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install 'fastewc[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{pkg} is needed for this feature but is not installed: pip install 'fastewc[{extra}]' "
            f"(or pip install {pkg})"
        ) from e


# What wrappers put before the names of the module they wrap: DistributedDataParallel and
# DataParallel ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module inside ``torch.compile(module)`` (an ``OptimizedModule``), else None. Checked
    by name so that torch._dynamo (slow to import) is not imported for it."""
    if type(model).__name__ == "OptimizedModule" and type(model).__module__.startswith("torch._dynamo"):
        inner = model.__dict__.get("_orig_mod", model._modules.get("_orig_mod"))
        return inner if isinstance(inner, nn.Module) else None
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
    wrappers (any nesting).

    The wrappers hold the very same parameter tensors under a prefix (``WRAPPER_PREFIXES``); the
    penalty binds to the unwrapped module, and gradients reach the wrapper's reducer hooks either
    way. A compiled model's Fisher is estimated on its original module too (``consolidate``).
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        inner = _compiled_inner(model)
        if inner is None:
            return model
        model = inner


def unwrapped_name(name: str, names) -> str:
    """``name`` as the unwrapped model calls it: wrapper prefixes (``WRAPPER_PREFIXES``) taken
    off the front while ``name`` is not in ``names`` (a dict or set of the unwrapped model's
    parameter names) and a shorter name is; ``name`` itself when none is found."""
    n = name
    while n not in names:
        for prefix in WRAPPER_PREFIXES:
            if n.startswith(prefix):
                n = n[len(prefix):]
                break
        else:
            return name
    return n


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode; restore each module's own flag on exit (also on error)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> dict:
    """``{device: dtype}`` of the autocast regions in force (none: ``{}``)."""
    return {d: torch.get_autocast_dtype(d) for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d)}


def precision(state: dict):
    """Autocast exactly as ``state`` says (:func:`autocast_state`), whatever is in force around;
    ``{}``: none. Nothing is entered where that is already the state."""
    if autocast_state() == state:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device in AUTOCAST_DEVICES:
        on = device in state
        stack.enter_context(torch.autocast(device, dtype=state[device] if on else None, enabled=on))
    return stack


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (host: MemAvailable; CUDA: free memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def is_sharded(t) -> bool:
    """True for a ``DTensor`` (an FSDP2 / tensor-parallel parameter, gradient or state tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


# Linux's MADV_HUGEPAGE (asm-generic/mman-common.h); the same value on every Linux architecture.
_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
HUGE_PAGES_FROM = 32 << 20  # bytes: smaller buffers fault in quickly enough with 4 KB pages
_libc = None


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a fresh CPU buffer that is about to be written whole with transparent
    huge pages: one page fault per 2 MB instead of one per 4 KB, which on a large buffer (GBs at
    1B parameters) costs more than writing it. Only the whole 2 MB pages inside ``t`` are
    advised, and only for contiguous CPU tensors of ``HUGE_PAGES_FROM`` bytes or more; a hint
    that changes no value. Returns whether the advice was given (False elsewhere, or where the
    kernel refuses it: transparent huge pages off).

    Meant for buffers allocated again at every training step (the penalty's fresh gradient),
    where it was measured to pay off. For a one-off buffer (registration) it was measured to
    cost more than it saved on a virtual machine, where a huge page touched for the first time
    is slow to back, so registration does not use it."""
    global _libc
    nbytes = t.numel() * t.element_size()
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or nbytes < HUGE_PAGES_FROM or not t.is_contiguous():
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > start and _libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0


def shard_names(sizes, max_bytes: int) -> list[list[str]]:
    """The names of ``sizes`` (``{name: bytes}``), in order, cut into shards of at most
    ``max_bytes`` each (a larger entry alone in its shard)."""
    shards, size = [[]], 0
    for n, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    return shards


def write_atomically(path, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path`` (whose folder must exist),
    flush it to disk and rename it over ``path`` in one step: a crash or a kill mid-write leaves
    the previous file as it was, and at worst one stray ``.<name>.*.tmp`` folder that nothing
    loads. The temporary file lives in that private folder, so a writer's own temporary files
    (safetensors writes one and renames it) stay inside it too. The new file gets the permissions
    the old one had (else those of a new file under the umask)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = folder / path.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # the file's own mode: the private folder does not travel
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    try:  # make the rename itself durable (not possible on every platform / file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _file_mode(path) -> int:
    """The permission bits of the existing ``path``, else those of a new file under the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
