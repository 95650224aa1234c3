"""Every bad input gets a clear error naming the parameter, and leaves the regularizer unchanged."""

import pytest
import torch
import torch.nn as nn

from fastewc import EWCInputError, EWCRegularizer, ModelMismatchError

from models import make_tasks, mlp


def snapshot(ewc):
    st = ewc.state_dict()["_extra_state"]
    return {k: ({n: t.clone() for n, t in v.items()} if k in ("importance", "anchor") else v) for k, v in st.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k in ("importance", "anchor"):
            assert a[k].keys() == b[k].keys()
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        else:
            assert a[k] == b[k], k


def assert_refused(ewc, call, error, match):
    """``call()`` raises ``error`` matching ``match`` and leaves ``ewc`` as it was."""
    before = snapshot(ewc)
    with pytest.raises(error, match=match):
        call()
    assert_same(snapshot(ewc), before)


@pytest.fixture
def registered():
    model = mlp()
    ewc = EWCRegularizer(10.0)
    f, a = make_tasks(model, 1)[0]
    ewc.register_task(f, a)
    return model, ewc


def good(model):
    return make_tasks(model, 1)[0]


def bad_cases(model):
    f, a = good(model)
    cases = {}

    def case(name, match, fisher=None, anchors=None):
        cases[name] = (fisher if fisher is not None else dict(f), anchors if anchors is not None else dict(a), match)

    case("shape", r"fisher\['0.weight'\] has shape \(17, 12\) but optimal_params\['0.weight'\] has shape \(17, 13\)",
         fisher={**f, "0.weight": torch.rand(17, 12)})
    case("shape vs registered", r"fisher\['0.bias'\] has shape \(3,\), but \(17,\) was registered",
         fisher={**f, "0.bias": torch.rand(3)}, anchors={**a, "0.bias": torch.rand(3)})
    case("int fisher", r"fisher\['2.bias'\] must have a floating dtype, got torch.int64",
         fisher={**f, "2.bias": torch.ones(5, dtype=torch.long)})
    case("int anchor", r"optimal_params\['2.bias'\] must have a floating dtype",
         anchors={**a, "2.bias": torch.ones(5, dtype=torch.int32)})
    nan = f["0.bias"].clone()
    nan[3] = float("nan")
    case("nan fisher", r"fisher\['0.bias'\] contains 1 NaN and 0 Inf", fisher={**f, "0.bias": nan})
    inf = a["2.weight"].clone()
    inf[0, 0] = float("inf")
    case("inf anchor", r"optimal_params\['2.weight'\] contains 0 NaN and 1 Inf", anchors={**a, "2.weight": inf})
    both = a["0.bias"].clone()
    both[[1, 5]] = torch.tensor([float("inf"), -float("inf")])  # they cancel to NaN in a sum
    case("inf and -inf anchor", r"optimal_params\['0.bias'\] contains 0 NaN and 2 Inf", anchors={**a, "0.bias": both})
    half = f["0.bias"].to(torch.bfloat16)
    half[0] = float("nan")
    case("nan bf16 fisher", r"fisher\['0.bias'\] contains 1 NaN and 0 Inf", fisher={**f, "0.bias": half})
    neg = f["2.weight"].clone()
    neg[1, 2] = -0.5
    case("negative", r"fisher\['2.weight'\] has negative entries \(min -0.5\)", fisher={**f, "2.weight": neg})
    case("anchor missing", r"every parameter in fisher needs an anchor in optimal_params; missing for '2.bias'",
         anchors={k: v for k, v in a.items() if k != "2.bias"})
    case("not a dict", "fisher must be a dict", fisher=[1, 2])
    case("not a tensor", r"fisher\['0.bias'\] must be a torch.Tensor, got list", fisher={**f, "0.bias": [0.0]})
    case("empty", "fisher is empty", fisher={}, anchors={})
    case("unknown name", r"the model has no parameter named 'head.weight'",
         fisher={**f, "head.weight": torch.rand(2)}, anchors={**a, "head.weight": torch.rand(2)})
    return cases


@pytest.mark.parametrize("case", list(bad_cases(mlp())))
def test_register_task_rejects_and_leaves_state_unchanged(case, registered):
    model, ewc = registered
    ewc(model)  # bound: the model is known, so unknown names are caught at registration
    fisher, anchors, match = bad_cases(model)[case]
    before = snapshot(ewc)
    with pytest.raises(EWCInputError, match=match):
        ewc.register_task(fisher, anchors)
    assert_same(before, snapshot(ewc))
    assert ewc.tasks_seen == 1
    ewc(model)  # still usable


def test_unknown_names_without_model_caught_at_first_step():
    model = mlp()
    f, a = good(model)
    ewc = EWCRegularizer(1.0)
    ewc.register_task({**f, "module.extra": torch.rand(3)}, {**a, "module.extra": torch.rand(3)})
    with pytest.raises(ModelMismatchError, match=r"no parameter named 'module.extra'"):
        ewc(model)


def test_wrapper_prefix_hint():
    model = mlp()
    f, a = good(model)
    ewc = EWCRegularizer(1.0)
    # DDP's "module." and torch.compile's "_orig_mod." are taken off (test_wrapped_models.py);
    # another prefix is the user's own and is only hinted at.
    ewc.register_task({"backbone." + k: v for k, v in f.items()}, {"backbone." + k: v for k, v in a.items()})
    with pytest.raises(ModelMismatchError, match="'backbone.0.weight'.*was the Fisher taken on a wrapped model"):
        ewc(model)
    wrapped = nn.Sequential()
    wrapped.add_module("module", mlp())
    ewc = EWCRegularizer(1.0)
    ewc.register_task(f, a)
    with pytest.raises(ModelMismatchError, match="was the Fisher taken on an unwrapped model"):
        ewc(wrapped)


@pytest.mark.parametrize("change", ["shape", "dtype", "missing"])
def test_model_changed_since_registration(change, registered):
    model, ewc = registered
    ewc(model)
    before = snapshot(ewc)
    if change == "shape":
        model[2] = nn.Linear(17, 6)
        match = r"'2.weight' has shape \(6, 17\), registered with \(5, 17\)"
    elif change == "dtype":
        model.double()
        match = r"'0.weight' changed dtype from torch.float32 to torch.float64"
    else:
        model[2] = nn.Identity()
        match = r"no parameter named '2.weight', '2.bias'"
    with pytest.raises(ModelMismatchError, match=match):
        ewc(model)
    with pytest.raises(ModelMismatchError, match=match):
        ewc.accumulate_grad_(model)
    assert_same(before, snapshot(ewc))


def _tied_tasks(model):
    """Two tasks over the Tied model (float64), the second's tied weight under its other name."""
    (f1, a1), (f2, a2) = make_tasks(model, 2)
    f2["out.weight"], a2["out.weight"] = f2.pop("emb.weight"), a2.pop("emb.weight")
    return (f1, a1), (f2, a2)


def _loop(model, tasks, lam):
    """The per-task loop, with every name of the tied weight taken as that one tensor."""
    from fastewc.reference import ewc_penalty_loop

    canon = [({n.replace("out.weight", "emb.weight"): t for n, t in f.items()},
              {n.replace("out.weight", "emb.weight"): t for n, t in a.items()}) for f, a in tasks]
    return ewc_penalty_loop(model, [f for f, _ in canon], [a for _, a in canon], lam)


@pytest.mark.parametrize("model_known", [False, True], ids=["before any step", "after a step"])
def test_a_tied_parameter_registered_under_its_other_name_is_folded(model_known):
    # GPT-2's transformer.wte.weight / lm_head.weight: task 1 under one name, task 2 under the
    # other. Known from a step (or model=), the alias is renamed at registration; registered
    # before any step, the two entries are folded into one at the first step. Never refused
    # forever after.
    from models import Tied

    model = Tied().double()
    (f1, a1), (f2, a2) = _tied_tasks(model)
    ewc = EWCRegularizer(3.0)
    ewc.register_task(f1, a1)
    if model_known:
        ewc(model)
    ewc.register_task(f2, a2)
    want = _loop(model, [(f1, a1), (f2, a2)], 3.0)
    got = ewc(model)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert ewc.protected_names.count("out.weight") == 0 and "emb.weight" in ewc.protected_names
    got.backward()
    g = model.emb.weight.grad.clone()
    model.zero_grad()
    want.backward()
    torch.testing.assert_close(g, model.emb.weight.grad, rtol=1e-12, atol=0)


def test_online_tied_parameter_under_its_other_name():
    """Online EWC moves a parameter's anchor with each task: known from a step, the alias is
    renamed at registration and the penalty is the reference's; registered before the model was
    known, the two names cannot be merged afterwards and the first step says so, unchanged."""
    from fastewc import OnlineEWC
    from fastewc.reference import ReferenceOnlineEWC
    from models import Tied

    model = Tied().double()
    (f1, a1), (f2, a2) = _tied_tasks(model)
    ref = ReferenceOnlineEWC(3.0, gamma=0.9)
    ref.register_task(f1, a1)
    ref.register_task({n.replace("out.weight", "emb.weight"): t for n, t in f2.items()},
                      {n.replace("out.weight", "emb.weight"): t for n, t in a2.items()})
    known = OnlineEWC(3.0, gamma=0.9)
    known.register_task(f1, a1)
    known(model)
    known.register_task(f2, a2)
    torch.testing.assert_close(known(model), ref.compute_penalty(model), rtol=1e-12, atol=0)

    unknown = OnlineEWC(3.0, gamma=0.9)
    unknown.register_task(f1, a1)
    unknown.register_task(f2, a2)
    assert_refused(unknown, lambda: unknown(model), ModelMismatchError,
                   r"'out.weight' and 'emb.weight' are one tied parameter, registered under two names .* pass model= "
                   r"to register_task")


def test_a_tied_alias_of_another_shape_is_refused():
    from models import Tied

    model = Tied().double()
    (f1, a1), (f2, a2) = _tied_tasks(model)
    f2["out.weight"], a2["out.weight"] = f2["out.weight"][:1], a2["out.weight"][:1]  # (1, 6) would broadcast
    ewc = EWCRegularizer(1.0)
    ewc.register_task(f1, a1)
    ewc.register_task(f2, a2)
    assert_refused(ewc, lambda: ewc(model), ModelMismatchError,
                   r"'out.weight' \(the tied parameter 'emb.weight'\) was registered with shape \(1, 6\), the "
                   r"parameter has \(11, 6\)")


def test_one_fisher_naming_a_tied_parameter_twice_is_refused_when_the_model_is_known():
    from models import Tied

    model = Tied()
    f, a = make_tasks(model, 1)[0]
    f["out.weight"], a["out.weight"] = f["emb.weight"].clone(), a["emb.weight"].clone()
    ewc = EWCRegularizer(1.0)
    assert_refused(ewc, lambda: ewc.register_task(f, a, model=model), EWCInputError,
                   r"fisher names 'emb.weight' and 'out.weight', which are one \(tied\) parameter of the model; give "
                   r"its Fisher once, under 'emb.weight'")
    # Without the model the dict cannot be judged: the first step folds both entries into one,
    # two quadratics of the one tensor.
    ewc.register_task(f, a)
    one = ({n: t for n, t in f.items() if n != "out.weight"}, a)
    other = ({"emb.weight": f["out.weight"]}, {"emb.weight": a["out.weight"]})
    torch.testing.assert_close(ewc(model), _loop(model, [one, other], 1.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lambda_ewc=-1.0), r"lambda_ewc must be a finite number >= 0, got -1.0"),
    (dict(lambda_ewc=float("nan")), "lambda_ewc must be a finite number"),
    (dict(lambda_ewc="big"), "lambda_ewc must be a number"),
    (dict(mode="online", gamma=1.5), r"gamma must be in \[0, 1\], got 1.5"),
    (dict(mode="online", gamma=-0.1), r"gamma must be in \[0, 1\]"),
    (dict(gamma=0.5), "gamma=0.5 only applies to mode='online'"),
    (dict(mode="sepArate"), "unknown mode 'sepArate'; expected one of 'separate', 'online'"),
    (dict(backend="cuda"), "unknown backend 'cuda'; expected one of 'auto', 'torch', 'triton'"),
    (dict(storage_dtype=torch.int8), "storage_dtype must be one of"),
    (dict(layer_lambdas={"a.*": -2.0}), r"layer_lambdas\['a.\*'\] must be a finite number >= 0"),
    (dict(layer_lambdas=[("a", 1.0)]), "layer_lambdas must be a dict"),
    (dict(include=[3]), "include must contain glob strings"),
    (dict(lambda_ewc={"ewc_lamda": 5.0}), r"unknown config key\(s\) 'ewc_lamda'"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(EWCInputError, match=match):
        EWCRegularizer(**kwargs)


def test_bad_lambda_assignment_keeps_old_value(registered):
    _, ewc = registered
    with pytest.raises(EWCInputError, match="lambda_ewc"):
        ewc.lambda_ewc = -3
    assert ewc.lambda_ewc == 10.0


def test_filters_that_leave_nothing_are_an_error():
    model = mlp()
    ewc = EWCRegularizer(1.0, include="head.*")
    with pytest.raises(EWCInputError, match="no parameter of this task is protected"):
        ewc.register_task(*good(model))
    assert ewc.tasks_seen == 0 and ewc.protected_names == []


def test_env_override_and_unavailable_backend(monkeypatch, registered):
    model, ewc = registered
    monkeypatch.setenv("FASTEWC_BACKEND", "nope")
    ewc._binding = None
    with pytest.raises(EWCInputError, match="unknown FASTEWC_BACKEND 'nope'"):
        ewc(model)
    monkeypatch.delenv("FASTEWC_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forced = EWCRegularizer(1.0, backend="triton")
    forced.register_task(*good(model))
    with pytest.raises(EWCInputError, match="backend 'triton' is not available"):
        forced(model)


def test_bad_state_dict():
    ewc = EWCRegularizer()
    with pytest.raises(EWCInputError, match="not an EWCRegularizer state: expected a dict"):
        ewc.set_extra_state([1])
    with pytest.raises(EWCInputError, match=r"no valid format version \(got None\)"):
        ewc.set_extra_state({"lambda_ewc": 1.0})


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_penalty_that_overflows_float32_is_inf_on_every_backend(backend):
    import fastewc.penalty.backends as backends

    if backend == "cpu" and backends.cpu_backend_status(torch.device("cpu")) is not None:
        pytest.skip(backends.cpu_backend_status(torch.device("cpu")))
    model = mlp()
    f, a = good(model)
    ewc = EWCRegularizer(10.0, backend=backend)
    ewc.register_task(f, a)
    with torch.no_grad():
        model[0].weight[:] = 1.5e19
    assert torch.isinf(ewc(model)) and torch.isinf(ewc.accumulate_grad_(model))
    with torch.no_grad():
        assert torch.isinf(ewc(model))


def test_finite_values_whose_sum_overflows_are_accepted():
    # The finiteness check sums first; a sum that overflows float32 must not pass for an Inf.
    model = mlp()
    f, a = good(model)
    f["0.weight"] = torch.full_like(f["0.weight"], 3e38)
    ewc = EWCRegularizer(1.0)
    ewc.register_task(f, a)
    assert ewc.tasks_seen == 1

