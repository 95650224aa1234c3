"""EWCRegularizer against the reference loop (fastewc.reference), in float64 where it allows."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from fastewc import EWCRegularizer, OnlineEWC
from fastewc import reference as R

from models import MODELS, Tied, assert_grads_close, grads_of, make_tasks, mlp, perturb, ref_value_and_grads, register_both

# value / gradient tolerances (relative) per storage dtype, against the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def setup(name, n_tasks, *, mode="separate", gamma=1.0, storage=torch.float64, model_dtype=torch.float64,
          backend="torch", **kw):
    model = MODELS[name]().to(model_dtype)
    tasks = make_tasks(model, n_tasks, dtype=torch.float64)
    perturb(model)
    model64 = copy.deepcopy(model).double()
    if mode == "separate":
        ref = R.ReferenceEWC(123.0, scales=kw.pop("scales", None))
    else:
        ref = R.ReferenceOnlineEWC(123.0, gamma=gamma, scales=kw.pop("scales", None))
    ewc = EWCRegularizer(123.0, mode=mode, gamma=gamma, storage_dtype=storage, backend=backend, **kw)
    for f, a in tasks:
        ref.register_task(f, a)
        # model=: the parameters' dtype is recorded (the tasks are float64 whatever the model)
        ewc.register_task(f, a, model=model)
    return model, model64, ref, ewc


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n_tasks", [1, 4])
@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 1.0), ("online", 0.5)])
def test_forward_value_and_autograd_match_reference(name, n_tasks, mode, gamma, backend):
    model, model64, ref, ewc = setup(name, n_tasks, mode=mode, gamma=gamma, backend=backend)
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    v = ewc(model)
    assert v.shape == () and v.dtype == torch.float64 and v.requires_grad
    v.backward()
    torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(model), want_g, 1e-10, model)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("existing_grad", [False, True])
@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
def test_accumulate_grad_matches_reference(name, existing_grad, mode, gamma, backend):
    model, model64, ref, ewc = setup(name, 3, mode=mode, gamma=gamma, backend=backend)
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    before = {}
    if existing_grad:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
                before[n] = p.grad.clone()
    v = ewc.accumulate_grad_(model)
    assert not v.requires_grad
    torch.testing.assert_close(v, want_v, rtol=1e-10, atol=0)
    expected = {n: (g + before[n] if n in before else g) for n, g in want_g.items() if g is not None}
    expected.update({n: None for n, g in want_g.items() if g is None})
    assert_grads_close(grads_of(model), expected, 1e-10, model)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_storage_dtypes_float32_model(storage, mode, backend):
    model, model64, ref, ewc = setup("cnn", 3, mode=mode, storage=storage, model_dtype=torch.float32,
                                     backend=backend)
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    v = ewc(model)
    assert v.dtype == torch.float32
    v.backward()
    tol = TOL[storage]
    torch.testing.assert_close(v.double(), want_v, rtol=tol, atol=0)
    assert_grads_close(grads_of(model), want_g, tol, model)
    model.zero_grad(set_to_none=True)
    v2 = ewc.accumulate_grad_(model)
    torch.testing.assert_close(v2.double(), want_v, rtol=tol, atol=0)
    assert_grads_close(grads_of(model), want_g, tol, model)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(param_dtype, backend):
    """Half-precision parameters: arithmetic in float32, gradient written in the parameter dtype."""
    model, _, _, _ = setup("mlp", 1, model_dtype=param_dtype, backend=backend)
    tasks = make_tasks(model, 2, dtype=torch.float32)
    ewc = EWCRegularizer(123.0, backend=backend)
    ref = R.ReferenceEWC(123.0)
    register_both(ewc, ref, tasks, model=model)
    model64 = copy.deepcopy(model).double()
    want_v, want_g = ref_value_and_grads(model64, ref)
    v = ewc.accumulate_grad_(model)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        assert p.grad.dtype == param_dtype
    assert_grads_close(grads_of(model), want_g, 1e-2, model)


def test_mixed_dtype_model_uses_one_group_per_dtype(backend):
    model = mlp().double()
    model[2].float()
    tasks = make_tasks(model, 2, dtype=torch.float64)
    ewc = EWCRegularizer(5.0, storage_dtype=torch.float64, backend=backend)
    ref = R.ReferenceEWC(5.0)
    register_both(ewc, ref, tasks, model=model)
    v = ewc(model)
    assert len(ewc._binding.plans) == 2
    model64 = copy.deepcopy(model).double()
    want_v, want_g = ref_value_and_grads(model64, ref)
    v.backward()
    torch.testing.assert_close(v, want_v, rtol=1e-7, atol=0)
    assert_grads_close(grads_of(model), want_g, 1e-6, model)


def test_layer_lambdas_and_include_exclude(backend):
    kw = dict(layer_lambdas={"0.*": 3.0, "*bias": 0.25}, include=["0.*", "2.*"], exclude="2.bias")
    names = [n for n, _ in mlp().named_parameters()]
    scales = R.layer_scales(names, **kw)
    assert scales == {"0.weight": 3.0, "0.bias": 3.0, "2.weight": 1.0, "2.bias": 0.0}
    model, model64, ref, ewc = setup("mlp", 3, scales=scales, backend=backend, **kw)
    assert ewc.protected_names == ["0.weight", "0.bias", "2.weight"]
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    ewc(model).backward()
    assert model[2].bias.grad is None
    for n in ("0.weight", "0.bias", "2.weight"):
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, want_g[n], rtol=1e-10, atol=1e-12)


def test_lambda_change_needs_no_repack(backend):
    model, model64, ref, ewc = setup("mlp", 2, backend=backend)
    v1 = ewc(model).detach()
    plans = ewc._binding.plans
    ewc.lambda_ewc = 246.0
    v2 = ewc(model).detach()
    assert ewc._binding.plans is plans  # nothing rebuilt
    torch.testing.assert_close(v2, 2 * v1, rtol=1e-12, atol=0)
    ref.lambda_ewc = 246.0
    torch.testing.assert_close(v2, ref_value_and_grads(model64, ref)[0], rtol=1e-10, atol=0)
    assert ewc.ewc_lambda == 246.0  # the original API's other spelling


def test_nothing_registered_returns_zero_on_model_device():
    model = mlp()
    v = EWCRegularizer()(model)
    assert v.shape == () and float(v) == 0.0 and v.device == next(model.parameters()).device
    assert float(EWCRegularizer().accumulate_grad_(model)) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_all_protected_parameters_frozen_gives_zero(backend):
    model, _, _, ewc = setup("mlp", 2, backend=backend)
    for p in model.parameters():
        p.requires_grad_(False)
    assert float(ewc(model)) == 0.0


def test_unfreezing_rebinds(backend):
    model, model64, ref, ewc = setup("frozen", 2, backend=backend)
    ewc(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for p in model64.parameters():
        p.requires_grad_(True)
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    v = ewc(model)
    v.backward()
    torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(model), want_g, 1e-10, model)


def test_tasks_with_different_parameter_sets(backend):
    """A later task may protect new parameters (the layout grows) or omit some."""
    model = mlp().double()
    names = [n for n, _ in model.named_parameters()]
    t1 = make_tasks(model, 1, names=names[:2])[0]
    t2 = make_tasks(model, 1, names=names[1:])[0]
    t3 = make_tasks(model, 1, names=names[:1])[0]
    for mode, gamma in (("separate", 1.0), ("online", 0.5)):
        ewc = EWCRegularizer(9.0, mode=mode, gamma=gamma, storage_dtype=torch.float64, backend=backend)
        ref = R.ReferenceEWC(9.0) if mode == "separate" else R.ReferenceOnlineEWC(9.0, gamma=gamma)
        for i, (f, a) in enumerate((t1, t2, t3)):
            ewc.register_task(f, a)
            ref.register_task(f, a)
            if i == 0:
                ewc(model)  # bound between registrations: the layout must grow correctly
        perturb(model)
        want_v, want_g = ref_value_and_grads(model, ref)
        model.zero_grad(set_to_none=True)
        v = ewc(model)
        v.backward()
        torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
        assert_grads_close(grads_of(model), want_g, 1e-10, model)


def test_tied_weights_count_once(backend):
    model = Tied().double()
    assert [n for n, _ in model.named_parameters()] == ["emb.weight", "mid.weight", "mid.bias"]
    model, model64, ref, ewc = setup("tied", 2, backend=backend)
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    v = ewc(model)
    v.backward()
    torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(model), want_g, 1e-10, model)


def test_tied_alias_name_is_accepted_and_canonicalised(backend):
    model = Tied().double()
    tasks = make_tasks(model, 1)
    f, a = tasks[0]
    f = {("out.weight" if n == "emb.weight" else n): t for n, t in f.items()}
    a = {("out.weight" if n == "emb.weight" else n): t for n, t in a.items()}
    ewc = EWCRegularizer(2.0, storage_dtype=torch.float64, backend=backend)
    ewc.register_task(f, a)
    ref = R.ReferenceEWC(2.0)
    ref.register_task(*tasks[0])
    perturb(model)
    want_v, _ = ref_value_and_grads(copy.deepcopy(model), ref)
    torch.testing.assert_close(ewc(model).detach(), want_v, rtol=1e-10, atol=0)
    assert "emb.weight" in ewc.protected_names and "out.weight" not in ewc.protected_names


def test_parameters_replaced_or_moved_are_picked_up(backend):
    """load_state_dict(assign=True) swaps Parameter objects: the next step must use the new ones."""
    model, model64, ref, ewc = setup("mlp", 2, backend=backend)
    ewc(model)
    perturb(model64)
    model.load_state_dict({k: v.clone() for k, v in model64.state_dict().items()}, assign=True)
    want_v, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    v = ewc(model)
    v.backward()
    torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(model), want_g, 1e-10, model)


def test_empty_one_element_and_many_tensors(backend):
    """Empty and one-element tensors, and many tensors of odd sizes spanning several blocks."""
    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = nn.ParameterList(
                [nn.Parameter(torch.randn(0, 3)), nn.Parameter(torch.randn(1))]
                + [nn.Parameter(torch.randn(int(s))) for s in torch.randint(1, 300, (150,))])

    model = Many().double()
    tasks = make_tasks(model, 3)
    ewc = EWCRegularizer(3.0, storage_dtype=torch.float64, backend=backend)
    ref = R.ReferenceEWC(3.0)
    register_both(ewc, ref, tasks)
    perturb(model)
    want_v, want_g = ref_value_and_grads(copy.deepcopy(model), ref)
    model.zero_grad(set_to_none=True)
    v = ewc(model)
    v.backward()
    torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
    assert_grads_close(grads_of(model), want_g, 1e-10, model)
    model.zero_grad(set_to_none=True)
    ewc.accumulate_grad_(model)
    assert_grads_close(grads_of(model), want_g, 1e-10, model)


def test_channels_last_parameter(backend):
    model, model64, ref, ewc = setup("cnn", 2, backend=backend)
    model.conv.weight.data = model.conv.weight.data.to(memory_format=torch.channels_last)
    assert not model.conv.weight.is_contiguous()
    want_v, want_g = ref_value_and_grads(model64, ref)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        v = ewc(model)
        v.backward()
        torch.testing.assert_close(v.detach(), want_v, rtol=1e-10, atol=0)
        assert_grads_close(grads_of(model), want_g, 1e-10, model)
        model.zero_grad(set_to_none=True)
        model.conv.weight.grad = torch.zeros_like(model.conv.weight)  # channels_last grad
        ewc.accumulate_grad_(model)
        assert_grads_close(grads_of(model), want_g, 1e-10, model)


def test_retain_graph_and_scaled_loss(backend):
    model, model64, ref, ewc = setup("mlp", 2, backend=backend)
    _, want_g = ref_value_and_grads(model64, ref)
    model.zero_grad(set_to_none=True)
    v = 2.5 * ewc(model)
    v.backward(retain_graph=True)
    v.backward()
    assert_grads_close(grads_of(model), {n: 5.0 * g for n, g in want_g.items()}, 1e-10, model)


def test_autograd_grad_and_in_place_modification_detected(backend):
    model, model64, ref, ewc = setup("mlp", 2, backend=backend)
    _, want_g = ref_value_and_grads(model64, ref)
    params = list(model.parameters())
    got = torch.autograd.grad(ewc(model), params)
    for (n, _), g in zip(model.named_parameters(), got):
        torch.testing.assert_close(g, want_g[n], rtol=1e-10, atol=1e-12)
    v = ewc(model)
    with torch.no_grad():
        params[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        v.backward()


def test_no_grad_forward_is_value_only(backend):
    model, model64, ref, ewc = setup("mlp", 2, backend=backend)
    with torch.no_grad():
        v = ewc(model)
    assert not v.requires_grad
    torch.testing.assert_close(v, ref_value_and_grads(model64, ref)[0], rtol=1e-10, atol=0)


def test_online_ewc_seed_interface(backend):
    model = mlp().double()
    tasks = make_tasks(model, 3)
    ours, ref = OnlineEWC(50.0, gamma=0.5, storage_dtype=torch.float64, backend=backend), R.ReferenceOnlineEWC(50.0, 0.5)
    assert ours.mode == "online"
    assert float(ours.compute_penalty(model)) == 0.0
    for f, a in tasks:
        ours.register_task(f, a)
        ref.register_task(f, a)
    perturb(model)
    torch.testing.assert_close(ours.compute_penalty(model).detach(), ref.compute_penalty(model).detach(),
                               rtol=1e-10, atol=0)


def test_config_dict_form():
    ewc = EWCRegularizer({"ewc_lambda": 5000.0})
    assert ewc.lambda_ewc == 5000.0 and ewc.mode == "separate"
    ewc = EWCRegularizer({"lambda_ewc": 7.0, "mode": "online", "gamma": 0.9})
    assert (ewc.lambda_ewc, ewc.mode, ewc.gamma) == (7.0, "online", 0.9)
    ewc = EWCRegularizer({"check_finite": True, "storage_dtype": torch.bfloat16}, backend="torch")
    assert (ewc.lambda_ewc, ewc.check_finite, ewc.storage_dtype, ewc.backend) == (1000.0, True, torch.bfloat16, "torch")


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
@pytest.mark.parametrize("storage", [torch.float64, torch.bfloat16])
def test_state_dict_round_trip(mode, gamma, storage, backend):
    kw = dict(layer_lambdas={"0.*": 2.0}, exclude=["2.bias"])
    model, model64, ref, ewc = setup("mlp", 3, mode=mode, gamma=gamma, storage=storage,
                                     scales=R.layer_scales([n for n, _ in mlp().named_parameters()], **kw),
                                     backend=backend, **kw)
    ewc.lambda_ewc = 77.0
    ewc(model)  # bound: the state must not depend on it
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)
    buf.seek(0)
    fresh = EWCRegularizer(backend=backend)  # how it runs is the instance's own, not state
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert (fresh.lambda_ewc, fresh.mode, fresh.gamma, fresh.storage_dtype, fresh.tasks_seen) == (
        77.0, mode, gamma, storage, 3)
    assert fresh.protected_names == ewc.protected_names
    for n, t in ewc.importance().items():
        assert torch.equal(fresh.importance()[n], t) and torch.equal(fresh.anchors()[n], ewc.anchors()[n])
    torch.testing.assert_close(fresh(model), ewc(model), rtol=0, atol=0)
    # registering one more task continues from the restored state exactly
    f, a = make_tasks(model, 1)[0]
    for r in (ewc, fresh):
        r.register_task(f, a)
    torch.testing.assert_close(fresh(model), ewc(model), rtol=0, atol=0)
    assert fresh.state_dict()["_extra_state"]["selection"] == ewc.state_dict()["_extra_state"]["selection"]


def test_pickle_and_deepcopy(backend):
    model, _, _, ewc = setup("mlp", 2, backend=backend)
    v = ewc(model).detach()
    for clone in (pickle.loads(pickle.dumps(ewc)), copy.deepcopy(ewc)):
        torch.testing.assert_close(clone(model).detach(), v, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_to_the_models_device():
    model, model64, ref, ewc = setup("mlp", 2, storage=torch.float32, model_dtype=torch.float32)
    v_cpu = ewc(model).detach()
    model.cuda()
    v = ewc(model)
    assert v.device.type == "cuda" and ewc._store.importance[0].device.type == "cuda"
    torch.testing.assert_close(v.detach().cpu(), v_cpu, rtol=1e-5, atol=0)
    fresh = EWCRegularizer()
    fresh.load_state_dict(ewc.state_dict())
    torch.testing.assert_close(fresh(model).detach(), v.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("mode,gamma", [("separate", 1.0), ("online", 0.5)])
def test_registration_never_modifies_the_callers_tensors(mode, gamma):
    model = mlp().double()
    tasks = make_tasks(model, 3, dtype=torch.float64)
    copies = [({n: t.clone() for n, t in f.items()}, {n: t.clone() for n, t in a.items()}) for f, a in tasks]
    ewc = EWCRegularizer(1.0, mode=mode, gamma=gamma, storage_dtype=torch.float64, layer_lambdas={"0.*": 2.0})
    for f, a in tasks:
        ewc.register_task(f, a)
    for (f, a), (f0, a0) in zip(tasks, copies):
        assert all(torch.equal(f[n], f0[n]) and torch.equal(a[n], a0[n]) for n in f)
