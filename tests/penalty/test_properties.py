"""Property tests: random histories of a regularizer, compared with the reference loop.

Each case draws, from its own seed, a small model (random shapes, empty and one-element tensors
and odd sizes, float32/float64 parameters, frozen ones, sometimes a tied one), a mode (separate,
or online with some gamma), a storage dtype (None/float32/bfloat16/float64) and a backend, then a
random sequence of steps: register a task (a random subset of the trainable and frozen names,
anchors a snapshot of every parameter, sometimes the same task again), round trips through
``state_dict`` and through files, freezing/unfreezing, perturbing the parameters, and after each
step a comparison of value and gradient (``forward`` + backward, and ``accumulate_grad_``) with
``ReferenceEWC`` / ``ReferenceOnlineEWC`` run in float64. A seeded generator, not hypothesis, so a
failing case is re-run by its seed alone: ``pytest tests/penalty/test_properties.py -k "case_17"``.
"""

import copy
import io
import random

import pytest
import torch
import torch.nn as nn

import fastewc.penalty.backends as backends
from plans import split_cpu_backend, use_torch_backend
from fastewc import EWCRegularizer, load_regularizer, save_regularizer
from fastewc import reference as R

CASES = 240
# relative tolerance by the narrowest dtype among parameters and storage
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-2}
SHAPES = [(0,), (1,), (7,), (3, 5), (0, 4), (2, 1, 3), (61,), (130,), (1, 1), (11, 13)]


class Model(nn.Module):
    def __init__(self, rnd: random.Random, dtypes, tied: bool):
        super().__init__()
        for i in range(rnd.randint(1, 5)):
            shape = rnd.choice(SHAPES)
            p = nn.Parameter(torch.randn(shape, dtype=rnd.choice(dtypes)))
            p.requires_grad_(rnd.random() > 0.2)
            self.register_parameter(f"p{i}", p)
        if tied:
            self.register_parameter("alias", self.p0)  # named_parameters() gives it once, as "p0"


def draw_task(rnd, model, names, dtype_of):
    fisher, anchors = {}, {}
    for n, p in model.named_parameters():
        anchors[n] = (p.detach() + rnd.choice([0.0, 0.5, 1.0]) * torch.randn_like(p)).to(dtype_of(p))
        if n in names:
            f = torch.rand(p.shape, dtype=dtype_of(p))
            f[torch.rand(p.shape) < 0.2] = 0.0
            fisher[n] = f
    return fisher, anchors


def penalty_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    v = fn(model)
    if v.requires_grad:
        v.backward()
    return v.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def compare(ewc, model, ref, tol, lam):
    model64 = copy.deepcopy(model).double()
    want_v, want_g = penalty_and_grads(ref if isinstance(ref, nn.Module) else ref.compute_penalty, model64)
    a_max = max((float(t.abs().max()) for t in ewc.importance().values() if t.numel()), default=0.0)
    m_max = max((float(t.abs().max()) for t in ewc.anchors().values() if t.numel()), default=0.0)
    p_max = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
    n_total = sum(p.numel() for p in model.parameters())
    g_scale = lam * a_max * (m_max + p_max) + 1e-30  # bound on |A (theta - m)| stored-dtype errors are relative to
    for step in ("forward", "accumulate"):
        if step == "forward":
            got_v, got_g = penalty_and_grads(ewc, model)
        else:
            model.zero_grad(set_to_none=True)
            got_v = ewc.accumulate_grad_(model).double()
            got_g = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        # Rounding the stored anchor by a relative tol moves each term by up to
        # lam A (2 |theta - m| + tol |m|) tol |m|: relative to the value, plus a second-order rest.
        rest = lam * a_max * n_total * (tol * (m_max + p_max)) ** 2
        assert abs(float(got_v) - float(want_v)) <= tol * float(want_v.abs()) + rest + 1e-300, (
            step, float(got_v), float(want_v))
        assert got_g.keys() == want_g.keys(), (step, sorted(got_g), sorted(want_g))
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=tol, atol=tol * g_scale,
                                       msg=lambda m: f"{step} {n}: {m}")


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"case_{s}") for s in range(CASES)])
def test_random_history_matches_reference(seed, tmp_path, monkeypatch):
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    param_dtypes = rnd.choice([[torch.float32], [torch.float64], [torch.float32, torch.float64]])
    model = Model(rnd, param_dtypes, tied=rnd.random() < 0.25)
    storage = rnd.choice([None, torch.float32, torch.bfloat16, torch.float64])
    narrowest = storage if storage is not None else min(param_dtypes, key=lambda d: torch.finfo(d).bits)
    narrowest = min([narrowest, *param_dtypes], key=lambda d: torch.finfo(d).bits)
    tol = TOL[torch.float32 if narrowest == torch.float16 else narrowest]
    mode = rnd.choice(["separate", "online"])
    gamma = rnd.choice([1.0, 0.5, 0.9]) if mode == "online" else 1.0
    lam = rnd.choice([1.0, 37.5])
    backend = rnd.choice(["blocked", "foreach", *_available()])
    if backend in ("blocked", "foreach"):
        use_torch_backend(monkeypatch, strategy=backend, block=rnd.choice([61, 1 << 18]))
    elif backend == "cpu":
        split_cpu_backend(monkeypatch, threads=rnd.choice([1, 2, 3]))

    ewc = EWCRegularizer(lam, mode=mode, gamma=gamma, storage_dtype=storage,
                         backend=backend if backend in ("triton", "cpu") else "torch")
    ref = R.ReferenceEWC(lam) if mode == "separate" else R.ReferenceOnlineEWC(lam, gamma=gamma)
    names = [n for n, _ in model.named_parameters()]
    last = None
    for _ in range(rnd.randint(1, 5)):
        op = rnd.choice(["register", "register", "register", "again", "state", "file", "freeze", "perturb"])
        if op == "again" and last is not None:
            fisher, anchors = last  # the same task registered a second time
        elif op in ("register", "again"):
            chosen = set(rnd.sample(names, rnd.randint(1, len(names))))
            wide = rnd.random() < 0.5  # float64 inputs for any parameter dtype: needs model=
            fisher, anchors = draw_task(rnd, model, chosen, (lambda p: torch.float64) if wide else (lambda p: p.dtype))
        if op in ("register", "again"):
            ewc.register_task(fisher, anchors, model=model if (wide or rnd.random() < 0.5) else None)
            ref.register_task(fisher, anchors)
            last = fisher, anchors
        elif op == "state" and ewc.tasks_seen:
            buf = io.BytesIO()
            torch.save(ewc.state_dict(), buf)
            buf.seek(0)
            fresh = EWCRegularizer()
            fresh.load_state_dict(torch.load(buf, weights_only=True))
            ewc = fresh
        elif op == "file" and ewc.tasks_seen:
            suffix = rnd.choice([".pt", ".safetensors"] if _has_safetensors() else [".pt"])
            ewc = load_regularizer(save_regularizer(ewc, tmp_path / f"ewc{suffix}"))
        elif op == "freeze":
            p = rnd.choice(list(model.parameters()))
            p.requires_grad_(not p.requires_grad)
        elif op == "perturb":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        if ewc.tasks_seen:
            compare(ewc, model, ref, tol, lam)
    if mode == "separate":
        assert ewc.tasks_seen == len(ref.task_fishers)


def _available():
    cpu = torch.device("cpu")
    return ([name for name, why in (("triton", backends.triton_status(cpu)), ("cpu", backends.cpu_backend_status(cpu)))
             if why is None])


def _has_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        return False
    return safetensors.torch is not None
