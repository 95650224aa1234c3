"""The penalty half of ``fastewc bench``: the EWC penalty step of :class:`fastewc.EWCRegularizer`
timed against the reference per-parameter loop and the per-task ``torch._foreach`` baseline, on
the public API only.

Cases are timed round-robin in one process (:func:`fastewc.bench.timing.time_side_by_side`), so
ratios are measured side by side. The step's memory-traffic floor is 20 bytes per parameter
(read theta, F, anchor and grad, write grad) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import EWCInputError, EWCRegularizer, reference
from . import timing
from .baselines import ForeachEWC, compiled_reference
from .device import check_fits, resolve_device
from .models import transformer_like

FLOOR_BYTES_PER_PARAM = 20


def penalty_benchmark(*, device: str | torch.device = "cpu", params: float = 25e6, tasks: int = 3,
                      repeats: int = 15, storage_dtype: torch.dtype = torch.float32,
                      compile_reference: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Time the EWC penalty step on a transformer-shaped parameter set (float32 parameters).

    Cases (each adds the penalty's gradient into an existing ``.grad``, as in a training step):
    the reference loop (``ewc(model).backward()``), the per-task ``torch._foreach`` baseline,
    optionally ``torch.compile`` of the reference loop, ``EWCRegularizer`` forward+backward and
    ``accumulate_grad_`` (backend ``"auto"``), and the same state on ``backend="torch"`` where
    ``"auto"`` chose another backend (Triton on CUDA, the fused C kernel on CPU).

    Returns a JSON-ready dict: machine, sizes, copy bandwidth (GB/s), floor (ms) and one row per
    case with ``median_ms``, ``speedup_vs_reference``, ``GBps`` (20 B/param over the time) and
    ``ratio_to_floor``.
    """
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if params < 1 or tasks < 1 or repeats < 1:
        raise EWCInputError(f"params, tasks and repeats must be >= 1; got {params}, {tasks}, {repeats}")
    # Parameters + grads, the reference's per-task F and anchor (shared with the foreach
    # baseline), two buffers for each of fastewc's two regularizers (backend "auto" and the
    # PyTorch backend), the bandwidth probe's two arrays, one gradient temporary.
    store = torch.finfo(storage_dtype).bits // 8
    check_fits(params * (4 + 4 + 8 * tasks + 4 * store + 8 + 4), dev, f"a {params / 1e6:.0f}M-parameter penalty benchmark")
    say = progress or (lambda msg: None)

    torch.manual_seed(0)
    model = transformer_like(params).to(dev)
    P = sum(p.numel() for p in model.parameters())
    say(f"penalty: {P / 1e6:.1f}M parameters, {tasks} tasks on {dev}; registering")
    ref, fe = reference.ReferenceEWC(1000.0), ForeachEWC(1000.0)
    ewc = EWCRegularizer(1000.0, storage_dtype=storage_dtype)
    for _ in range(tasks):
        fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
        ref.task_fishers.append(fisher)  # not register_task: its clone would double memory
        ref.task_params.append(anchor)
        fe.tasks.append((fisher, anchor))  # the same tensors
        ewc.register_task(fisher, anchor)
    del fisher, anchor
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    copy, copy_bytes = timing.copy_case(P, dev)
    cases = {
        "copy (bandwidth probe)": copy,
        "reference loop fwd+bwd": lambda: ref(model).backward(),
        "torch._foreach per task fwd+bwd": lambda: fe(model).backward(),
    }
    if compile_reference:
        say("penalty: compiling the reference loop (torch.compile; this takes a while)")
        compiled = compiled_reference(ref)
        cases["torch.compile(loop) fwd+bwd"] = lambda: compiled(model).backward()
    with torch.no_grad():
        ewc(model)  # bind once, to name the backend "auto" chose
    backend = "+".join(ewc.active_backends)
    cases[f"fastewc fwd+bwd [{backend}]"] = lambda: ewc(model).backward()
    cases[f"fastewc accumulate_grad_ [{backend}]"] = lambda: ewc.accumulate_grad_(model)
    if ewc.active_backends != ("torch",):
        # The same state on the PyTorch backend (the backend is the instance's own setting, kept
        # through load_state_dict): what "auto" gains over stock ops.
        ewc_torch = EWCRegularizer(1000.0, backend="torch")
        ewc_torch.load_state_dict(ewc.state_dict())
        cases["fastewc fwd+bwd [torch]"] = lambda: ewc_torch(model).backward()
        cases["fastewc accumulate_grad_ [torch]"] = lambda: ewc_torch.accumulate_grad_(model)

    say(f"penalty: timing {len(cases) - 1} methods, {repeats} rounds")
    times = timing.time_side_by_side(cases, repeats=repeats, device=dev,
                                     on_round=lambda r: say(f"penalty: round {r + 1}/{repeats}"))
    med = {k: timing.median(v) for k, v in times.items()}
    bandwidth = copy_bytes / med.pop("copy (bandwidth probe)")
    floor = FLOOR_BYTES_PER_PARAM * P / bandwidth
    ref_t = med["reference loop fwd+bwd"]
    rows = [{"method": k, "median_ms": 1e3 * t, "speedup_vs_reference": ref_t / t,
             "GBps": FLOOR_BYTES_PER_PARAM * P / t / 1e9, "ratio_to_floor": t / floor} for k, t in med.items()]
    return {"benchmark": "penalty", "device": str(dev), "machine": timing.machine_info(dev), "params": P,
            "tensors": len(list(model.parameters())), "tasks": tasks, "storage_dtype": str(storage_dtype),
            "repeats": repeats, "copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": 1e3 * floor,
            "rows": rows, "raw_seconds": times}


def format_penalty(result: dict) -> str:
    """The penalty result as a markdown table with a header saying what and where."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"
    lines = [f"EWC penalty: {result['params'] / 1e6:.1f}M parameters in {result['tensors']} tensors, "
             f"{result['tasks']} tasks, storage {result['storage_dtype'].replace('torch.', '')}, on {where}",
             f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s -> floor {result['floor_ms']:.2f} ms "
             f"(20 B/param); {result['repeats']} round-robin repeats, medians", "",
             f"| {'method':<36} | {'median ms':>9} | {'speed-up':>8} | {'GB/s':>6} | {'x floor':>7} |",
             f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 9}|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']:<36} | {r['median_ms']:>9.2f} | {r['speedup_vs_reference']:>7.1f}x | "
                     f"{r['GBps']:>6.1f} | {r['ratio_to_floor']:>6.2f}x |")
    return "\n".join(lines)
