"""Benchmarks behind ``fastewc bench``: the penalty against its baselines, and Fisher estimation
against the per-sample loop, on the user's own hardware.

Every table comes from cases timed round-robin in one process
(:func:`fastewc.bench.timing.time_side_by_side`), so ratios are measured side by side. The
penalty's memory-traffic floor is 20 bytes per parameter (read theta, F, anchor and grad, write
grad) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing as bu
from .. import reference
from .baselines import ForeachEWC, compiled_reference
from .models import FISHER_MODELS, HF_MODELS, HF_SAMPLES, fisher_problem, hf_problem, transformer_like
from .._utils import available_memory
from ..errors import EWCInputError
from ..fisher import clear_plan_cache, estimate_fisher
from ..reference import ReferenceEWC
from ..penalty import EWCRegularizer
from ..penalty.backends import select_backend

FLOOR_BYTES_PER_PARAM = 20


class BenchSizeError(EWCInputError):
    """The requested benchmark would not fit in the device's memory."""


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` -> device, with a clear error when unusable."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EWCInputError(f"unknown device {device!r}; expected 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type not in ("cpu", "cuda"):
        raise EWCInputError(f"device {device!r} is not supported by the benchmark; expected 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EWCInputError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                                f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EWCInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_fits(need_bytes: float, device: torch.device, what: str) -> None:
    """Raise :class:`BenchSizeError` before allocating when ``need_bytes`` exceeds 90% of what is free."""
    free = available_memory(device)
    if need_bytes > 0.9 * free:
        raise BenchSizeError(f"{what} needs about {need_bytes / 2**30:.1f} GiB on {device}, but only "
                             f"{free / 2**30:.1f} GiB is free; choose a smaller size")


def penalty_benchmark(*, device: str | torch.device = "cpu", params: float = 25e6, tasks: int = 3,
                      repeats: int = 15, storage_dtype: torch.dtype = torch.float32,
                      compile_reference: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Time the EWC penalty step on a transformer-shaped parameter set (float32 parameters).

    Cases (each adds the penalty's gradient into an existing ``.grad``, as in a training step):
    the reference loop (``ewc(model).backward()``), the per-task ``torch._foreach`` baseline,
    optionally ``torch.compile`` of the reference loop, ``EWCRegularizer`` forward+backward and
    ``accumulate_grad_`` (backend ``"auto"``), and the PyTorch backend forced where ``"auto"``
    chose another (Triton on CUDA, the fused C kernel on CPU).

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
    ref, fe = ReferenceEWC(1000.0), ForeachEWC(1000.0)
    ewc = EWCRegularizer(1000.0, storage_dtype=storage_dtype)
    # the PyTorch backend beside the one "auto" picks, where that is another one
    ewc_torch = (EWCRegularizer(1000.0, storage_dtype=storage_dtype, backend="torch")
                 if select_backend("auto", dev).name != "torch" else None)
    for _ in range(tasks):
        fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        anchor = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
        ref.task_fishers.append(fisher)  # not register_task: its clone would double memory
        ref.task_params.append(anchor)
        fe.tasks.append((fisher, anchor))  # the same tensors
        for reg in (ewc, ewc_torch):
            if reg is not None:
                reg.register_task(fisher, anchor)
    del fisher, anchor
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    copy, copy_bytes = bu.copy_case(P, dev)
    cases = {
        "copy (bandwidth probe)": copy,
        "reference loop fwd+bwd": lambda: ref(model).backward(),
        "torch._foreach per task fwd+bwd": lambda: fe(model).backward(),
    }
    if compile_reference:
        say("penalty: compiling the reference loop (torch.compile; this takes a while)")
        compiled = compiled_reference(ref)
        cases["torch.compile(loop) fwd+bwd"] = lambda: compiled(model).backward()
    ewc(model)  # bind once, to name the backend "auto" chose
    backend = "+".join(ewc.active_backends)
    cases[f"fastewc fwd+bwd [{backend}]"] = lambda: ewc(model).backward()
    cases[f"fastewc accumulate_grad_ [{backend}]"] = lambda: ewc.accumulate_grad_(model)
    if ewc_torch is not None:
        cases["fastewc fwd+bwd [torch]"] = lambda: ewc_torch(model).backward()
        cases["fastewc accumulate_grad_ [torch]"] = lambda: ewc_torch.accumulate_grad_(model)

    say(f"penalty: timing {len(cases) - 1} methods, {repeats} rounds")
    times = bu.time_side_by_side(cases, repeats=repeats, device=dev,
                                 on_round=lambda r: say(f"penalty: round {r + 1}/{repeats}"))
    med = {k: bu.median(v) for k, v in times.items()}
    bandwidth = copy_bytes / med.pop("copy (bandwidth probe)")
    floor = FLOOR_BYTES_PER_PARAM * P / bandwidth
    ref_t = med["reference loop fwd+bwd"]
    rows = [{"method": k, "median_ms": 1e3 * t, "speedup_vs_reference": ref_t / t,
             "GBps": FLOOR_BYTES_PER_PARAM * P / t / 1e9, "ratio_to_floor": t / floor} for k, t in med.items()]
    return {"benchmark": "penalty", "device": str(dev), "machine": bu.machine_info(dev), "params": P,
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


def fisher_benchmark(*, device: str | torch.device = "cpu", samples: int = 512, repeats: int = 3,
                     models: tuple[str, ...] = FISHER_MODELS, methods: tuple[str, ...] = ("auto", "loop"),
                     kinds: tuple[str, ...] = ("empirical",), exact_models: tuple[str, ...] = ("mlp",),
                     exact_methods: tuple[str, ...] | None = None, floor: bool = True, anchors: bool = True,
                     hf_samples: int = HF_SAMPLES, progress: Callable[[str], None] | None = None) -> dict:
    """Time the Fisher diagonal on the benchmark models: the reference per-sample loop against
    :func:`estimate_fisher` with each of ``methods``, for each of ``kinds`` ("exact" only on
    ``exact_models``, with ``exact_methods`` (default ``methods``): its reference loop takes one
    backward per class and sample).

    Models: ``mlp``, ``cnn``, ``transformer`` (:func:`fastewc.bench.models.fisher_problem`,
    ``samples`` samples) and the Hugging Face models ``bert``, ``gpt2``, ``llama``
    (:func:`fastewc.bench.models.hf_problem`, ``hf_samples`` padded sequences; the reference is
    the per-sample loop over ``model(**one_sample).loss``; methods other than ``auto``/``rules``
    are left out there: vmap cannot run their default attention with a padding mask).

    Each case is also run once under a memory probe for its extra peak memory (bytes over what
    was in use before it). With ``floor``, a row times one plain batched forward + backward over
    the same batches (eval mode, mean loss, parameter gradients): the cost of a training pass,
    which a Fisher computed "at backward-pass cost" is measured against. With ``anchors`` (small
    models only), rows for other libraries' diagonal Fisher where they are installed and support
    the model, each over the same N samples and divided by N: BackPACK (``SumGradSquared`` for the
    empirical kind, ``DiagGGNMC`` for the sampled one, ``DiagGGNExact`` for the exact one), ASDL
    (``fisher_emp`` / ``fisher_mc`` with one sample / ``fisher_exact``, shape ``diag``) and
    nngeometry (a ``PMatDiag`` from its Jacobian backend at the dataset labels /
    ``FIM_MonteCarlo`` / ``FIM``); a skipped row says why (``pip install --no-deps
    backpack-for-pytorch einops unfoldNd`` and ``pip install --no-deps asdfghjkl nngeometry``
    install them).

    Returns a JSON-ready dict with one row per (model, kind, method): ``seconds`` (median),
    ``speedup_vs_reference``, ``vs_floor``, ``peak_extra_MB`` and ``params``.
    """
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if samples < 1 or repeats < 1:
        raise EWCInputError(f"samples and repeats must be >= 1; got {samples}, {repeats}")
    say = progress or (lambda msg: None)
    rows, skipped = [], []
    for name in models:
        hf = name in HF_MODELS
        model, data = hf_problem(name, n=hf_samples) if hf else fisher_problem(name, n=samples)
        model = model.to(dev)
        data = [({k: v.to(dev) for k, v in b.items()} if hf else (b[0].to(dev), b[1].to(dev))) for b in data]
        n = hf_samples if hf else samples
        P = sum(p.numel() for p in model.parameters())
        for kind in kinds:
            if kind == "exact" and name not in exact_models:
                continue
            gen = (lambda: torch.Generator().manual_seed(0))
            cases = {"reference loop": lambda kind=kind: reference.estimate_fisher(model, data, kind=kind,
                                                                                      generator=gen())}
            use = methods if kind != "exact" or exact_methods is None else exact_methods
            for m in use:
                if hf and m not in ("auto", "rules"):
                    continue
                cases[f"fastewc {m}"] = (lambda m=m, kind=kind: estimate_fisher(
                    model, data, method=m, kind=kind, generator=gen()))
            if anchors and not hf:
                for label, method_names, case in _ANCHORS:
                    fn, why = case(model, data, kind)
                    method = f"{label} {method_names[kind]}"
                    if fn is not None:
                        cases[method] = fn
                    else:
                        skipped.append({"model": name, "kind": kind, "method": method, "reason": why})
            if floor and kind == "empirical":
                cases["floor: fwd+bwd, no Fisher"] = lambda: _train_pass(model, data)
            say(f"fisher: {name} ({P / 1e6:.2f}M parameters), {kind}, {len(cases)} methods x {repeats} rounds")
            times = bu.time_side_by_side(cases, repeats=repeats, warmup=1, device=dev)
            ref_t = bu.median(times["reference loop"])
            floor_t = bu.median(times["floor: fwd+bwd, no Fisher"]) if "floor: fwd+bwd, no Fisher" in times else None
            extra = {}
            if "fastewc auto" in cases:
                # What auto covered how, and the probe's cost on a first call (the timed calls
                # above reuse the proven plan, as a user's second call does).
                clear_plan_cache()
                _, info = estimate_fisher(model, data, kind=kind, generator=gen(), return_info=True)
                extra = {"coverage": info.summary(), "probe_seconds": info.probe_seconds,
                         "per_sample_params": len(info.vmap_params) + len(info.loop_params)}
            for method, fn in cases.items():
                _, peak = bu.peak_extra_memory(fn, dev)
                t = bu.median(times[method])
                rows.append({"model": name, "kind": kind, "method": method, "params": P, "samples": n,
                             "seconds": t, "speedup_vs_reference": ref_t / t,
                             "vs_floor": None if floor_t is None else t / floor_t,
                             "peak_extra_MB": None if peak is None else peak / 2**20,
                             **(extra if method == "fastewc auto" else {})})
    return {"benchmark": "fisher", "device": str(dev), "machine": bu.machine_info(dev), "samples": samples,
            "hf_samples": hf_samples, "kinds": list(kinds), "repeats": repeats, "rows": rows, "skipped": skipped}


_BACKPACK = {"empirical": "SumGradSquared", "sampled": "DiagGGNMC", "exact": "DiagGGNExact"}


def _backpack_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing BackPACK's diagonal of ``kind`` on a copy of ``model`` (sum reduction,
    summed over the batches, divided by N; ``fn()`` returns ``{name: diagonal}``), or
    ``(None, why)`` when it cannot run."""
    import copy
    import importlib
    import warnings

    try:
        bp = importlib.import_module("backpack")
        ext = importlib.import_module("backpack.extensions")
    except ImportError:
        return None, "backpack-for-pytorch is not installed (pip install --no-deps backpack-for-pytorch einops unfoldNd)"
    extension, attr = {"empirical": (ext.SumGradSquared, "sum_grad_squared"),
                       "sampled": (ext.DiagGGNMC, "diag_ggn_mc"),
                       "exact": (ext.DiagGGNExact, "diag_ggn_exact")}[kind]
    try:
        net = bp.extend(copy.deepcopy(model).eval(), use_converter=False)
        loss_fn = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
    except Exception as e:  # noqa: BLE001 - report why the anchor is missing
        return None, f"BackPACK cannot extend the model ({type(e).__name__}: {e})"

    def run():
        n, sums = 0, None
        for x, y in data:
            net.zero_grad(set_to_none=True)
            with warnings.catch_warnings(), bp.backpack(extension()):
                warnings.simplefilter("ignore")
                loss_fn(net(x), y).backward()
            got = [getattr(p, attr) for p in net.parameters()]
            sums = got if sums is None else [a + b for a, b in zip(sums, got)]
            n += x.shape[0]
        return {name: s / n for (name, _), s in zip(net.named_parameters(), sums)}

    return _tried(run, "BackPACK")


ANCHOR_INSTALL = "pip install --no-deps asdfghjkl nngeometry"
# ASDL's fisher types; nngeometry's functions (it has no empirical-Fisher helper: that row runs its
# Jacobian backend on log p(y|x) at the dataset labels, the construction FIM_MonteCarlo uses with
# drawn labels, stored the same way in a PMatDiag).
_ASDL = {"empirical": "fisher_emp", "sampled": "fisher_mc", "exact": "fisher_exact"}
_NNGEOMETRY = {"empirical": "PMatDiag, labels", "sampled": "FIM_MonteCarlo PMatDiag", "exact": "FIM PMatDiag"}


def _tried(run, who: str):
    """``(run, None)`` when one call of ``run`` succeeds, else ``(None, why)``: the anchor is then
    skipped with the reason (unsupported layers raise anything from anywhere inside it)."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - reported as the reason the row is skipped
        return None, f"{who} does not support this model ({type(e).__name__}: {str(e)[:160]})"
    return run, None


def _every_parameter(net: nn.Module, got: dict, why: str) -> dict:
    """``{name: diagonal}`` for every trainable parameter of ``net``, in order; NotImplementedError
    (the anchor is then skipped) naming those an anchor gave no diagonal for and ``why``."""
    missing = [n for n, p in net.named_parameters() if p.requires_grad and n not in got]
    if missing:
        raise NotImplementedError(f"no Fisher for {len(missing)} parameters ({', '.join(missing[:3])}"
                                  f"{', ...' if len(missing) > 3 else ''}): {why}")
    return {n: got[n] for n, p in net.named_parameters() if p.requires_grad}


def _asdl_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing ASDL's diagonal Fisher (``asdl.FisherConfig`` with ``fisher_type``
    ``fisher_emp`` / ``fisher_mc`` with one sample / ``fisher_exact`` for ``kind``, shape
    ``diag``) on a copy of ``model``; ``fn()`` returns ``{name: diagonal}``. Or ``(None, why)``
    when ASDL is missing or leaves parameters without a Fisher (layers it does not support).

    ASDL takes the cross-entropy with ``reduction="sum"`` and scales each batch's squared
    per-sample gradients by ``1 / data_size``: with ``data_size = N`` and the batches accumulated,
    the result is the mean over the N samples. Its exact Fisher backpropagates
    ``sqrt(p_c) * CE(z, c)`` per class, whose squared per-sample gradient is ``p_c g_c^2``: the
    same ``sum_c p_c g_c^2`` as fastewc's.
    """
    import copy
    import importlib
    import warnings

    try:
        asdl = importlib.import_module("asdl")
    except ImportError:
        return None, f"ASDL (asdfghjkl) is not installed ({ANCHOR_INSTALL})"
    n_total = sum(x.shape[0] for x, _ in data)
    net = copy.deepcopy(model).eval()
    fisher_type = {"empirical": asdl.FISHER_EMP, "sampled": asdl.FISHER_MC, "exact": asdl.FISHER_EXACT}[kind]
    config = asdl.FisherConfig(fisher_type=fisher_type, fisher_shapes=[asdl.SHAPE_DIAG],
                               loss_type=asdl.LOSS_CROSS_ENTROPY, n_mc_samples=1, data_size=n_total)
    maker = asdl.get_fisher_maker(net, config)

    def run():
        with warnings.catch_warnings():
            # ASDL's module hooks trigger PyTorch's deprecation warning on every call, and ASDL
            # warns (then skips) for layers it does not support: the coverage check reports those.
            warnings.simplefilter("ignore")
            for i, (x, y) in enumerate(data):
                out = maker.setup_model_call(net, x)
                maker.setup_loss_call(F.cross_entropy, out, y)
                # The first batch starts a new Fisher; the others add into it.
                maker.forward_and_backward(accumulate=i > 0)
        got = {}
        for mname, module in net.named_modules():
            diag = getattr(getattr(module, config.fisher_attr, None), "diag", None)
            for pname in ("weight", "bias"):
                value = getattr(diag, pname, None) if diag is not None else None
                if value is not None:
                    got[f"{mname}.{pname}" if mname else pname] = value
        return _every_parameter(net, got, "layers ASDL does not support")

    return _tried(run, "ASDL")


def _nngeometry_case(model: nn.Module, data, kind: str):
    """``(fn, None)`` timing nngeometry's diagonal Fisher (a ``PMatDiag``) for ``kind`` on a copy
    of ``model``: ``FIM(variant="classif_logits")`` for ``exact``, ``FIM_MonteCarlo(trials=1)``
    for ``sampled``, and for ``empirical`` (no helper in nngeometry) its
    ``TorchHooksJacobianBackend`` on ``log softmax(z)[y]`` at the dataset labels. ``fn()`` returns
    ``{name: diagonal}``. Or ``(None, why)`` when nngeometry is missing or does not support a
    layer of the model.

    nngeometry squares per-sample Jacobians of the function it is given and divides by the number
    of examples of its DataLoader (N): the mean over samples. The batches are handed to it as one
    DataLoader over the same samples, in the same batches, built once outside the timed call.
    Its exact Fisher factors the multinomial covariance ``diag(p) - p p^T`` (Tanabe and Sagae)
    into ``C - 1`` outputs, whose squared Jacobians sum to ``sum_c p_c g_c^2`` as fastewc's.
    """
    import copy
    import importlib

    try:
        nng = importlib.import_module("nngeometry")
        pmat = importlib.import_module("nngeometry.object")
        backend = importlib.import_module("nngeometry.backend")
        layers = importlib.import_module("nngeometry.layercollection")
    except ImportError:
        return None, f"nngeometry is not installed ({ANCHOR_INSTALL})"
    from torch.utils.data import DataLoader, TensorDataset

    net = copy.deepcopy(model).eval()
    try:
        lc = layers.LayerCollection.from_model(net)
    except Exception as e:  # noqa: BLE001 - it raises a bare Exception for unknown layers
        return None, f"nngeometry does not support this model ({type(e).__name__}: {str(e)[:160]})"
    device = next(net.parameters()).device
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
                        batch_size=data[0][0].shape[0])

    def label_log_prob(x, y):
        """log p(y | x) at the dataset labels: its squared gradient is the empirical Fisher's."""
        return torch.log_softmax(net(x.to(device)), dim=1).gather(1, y.to(device)[:, None])

    def run():
        if kind == "exact":
            mat = nng.FIM(net, loader, pmat.PMatDiag, variant="classif_logits", device=device, layer_collection=lc)
        elif kind == "sampled":
            mat = nng.FIM_MonteCarlo(net, loader, pmat.PMatDiag, variant="classif_logits", trials=1,
                                     device=device, layer_collection=lc)
        else:
            gen = backend.TorchHooksJacobianBackend(net, function=label_log_prob, layer_collection=lc)
            mat = pmat.PMatDiag(generator=gen, examples=loader)
        got = {}
        for layer_id, parts in pmat.PVector(lc, vector_repr=mat.get_diag()).to_dict().items():
            for pname, value in zip(("weight", "bias"), parts):
                got[f"{layer_id}.{pname}" if layer_id else pname] = value
        return _every_parameter(net, got, "outside nngeometry's layers")

    return _tried(run, "nngeometry")


# (row label, method name per kind, case): the anchors timed beside fastewc.
_ANCHORS = (("BackPACK", _BACKPACK, _backpack_case), ("ASDL", _ASDL, _asdl_case),
            ("nngeometry", _NNGEOMETRY, _nngeometry_case))


def _train_pass(model: nn.Module, data) -> None:
    """One batched forward + backward over ``data`` (eval mode, as estimate_fisher runs)."""
    was = model.training
    model.eval()
    try:
        for b in data:
            if isinstance(b, dict):
                model(**b).loss.backward()
            else:
                x, y = b
                F.cross_entropy(model(x), y).backward()
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)


def format_fisher(result: dict) -> str:
    """The Fisher result as a markdown table (and the anchors that were skipped, with why)."""
    lines = [f"Fisher diagonal, N = {result['samples']} samples (Hugging Face models: "
             f"{result.get('hf_samples', HF_SAMPLES)}), {result['repeats']} round-robin repeats, medians; "
             f"x floor = time / one plain training pass; peak = extra memory over the baseline", "",
             f"| {'model':<11} | {'params':>7} | {'kind':<9} | {'method':<34} | {'seconds':>8} | {'vs loop':>8} "
             f"| {'x floor':>7} | {'peak MB':>8} |",
             f"|{'-' * 13}|{'-' * 9}|{'-' * 11}|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 10}|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_extra_MB"] is None else f"{r['peak_extra_MB']:.0f}"
        floor = "" if r.get("vs_floor") is None else f"{r['vs_floor']:.2f}"
        lines.append(f"| {r['model']:<11} | {r['params'] / 1e6:>6.2f}M | {r.get('kind', 'empirical'):<9} | "
                     f"{r['method']:<34} | {r['seconds']:>8.3f} | {r['speedup_vs_reference']:>7.2f}x | {floor:>7} "
                     f"| {peak:>8} |")
    for r in result.get("skipped", []):
        lines.append(f"\n{r['method']} on {r['model']} ({r['kind']}): skipped, {r['reason']}")
    return "\n".join(lines)


def plot_bench(result: dict, path: str, label: str = "") -> str:
    """Save a figure of a ``fastewc bench`` result: penalty time per method (and Fisher time per
    model and method when present), log scale. Returns ``path``."""
    from .._utils import require

    matplotlib = require("matplotlib", extra="demo")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="demo")

    panels = [k for k in ("penalty", "fisher") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    pen = result["penalty"]
    ax = axes[0][0]
    names = [r["method"] for r in pen["rows"]]
    ax.barh(names, [r["median_ms"] for r in pen["rows"]])
    ax.axvline(pen["floor_ms"], color="k", ls="--", lw=1, label=f"memory floor {pen['floor_ms']:.1f} ms")
    ax.set_xscale("log")
    # Within one or two decades matplotlib labels the minor ticks too, and they overlap.
    ax.xaxis.set_minor_formatter(require("matplotlib.ticker", extra="demo").NullFormatter())
    ax.set_xlabel("median ms per step (log)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title(f"penalty, {pen['params'] / 1e6:.0f}M params, {pen['tasks']} tasks", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    if "fisher" in result:
        ax = axes[0][1]
        rows = result["fisher"]["rows"]
        labels = [f"{r['model']}: {r['method']}" for r in rows]
        ax.barh(labels, [r["seconds"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("seconds per estimate (log)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"Fisher diagonal, N = {result['fisher']['samples']}", fontsize=9)
    fig.suptitle("fastewc bench" + (f": {label}" if label else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
