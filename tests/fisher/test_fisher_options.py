"""estimate_fisher options: auto fallback, training flags, params, chunking, memory
bound, progress bar."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import reference as R

from models import (Branchy, ItemCall, Mixed, assert_fisher_close, batches, make_cnn,
                           make_encoder, make_mlp)

D = torch.float64


def _count_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs=None: calls.append(1))
    return calls


# -- auto fallback ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Branchy])
def test_auto_falls_back_to_loop_with_one_warning(cls):
    # Branchy's batched forward mixes samples (a branch on the batch's sum): the rules refuse it
    # and vmap cannot transform it, so auto ends in the loop.
    model = cls().double()
    x, y = torch.randn(11, 13, dtype=D), torch.randint(0, 5, (11,))
    x[::2] = -x[::2].abs()  # both branches of Branchy taken
    x[1::2] = x[1::2].abs()
    data = batches(x, y, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fastewc.estimate_fisher(model, data, method="auto")
    fallbacks = [w for w in caught if issubclass(w.category, UserWarning)
                 and "falling back to method='loop'" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert len(str(fallbacks[0].message)) > len("falling back to method='loop'") + 10  # gives a reason
    loop = fastewc.estimate_fisher(model, data, method="loop")
    assert_fisher_close(got, loop, rtol=0, atol_rel=0)
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_item_call_needs_no_fallback_under_the_rules():
    # .item() stops vmap, but the batched pass of the rules never transforms the model.
    model = ItemCall().double()
    data = batches(torch.randn(11, 13, dtype=D), torch.randint(0, 5, (11,)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, info = fastewc.estimate_fisher(model, data, method="auto", return_info=True)
    assert info.rules == {"lin": "linear"} and not info.vmap_params and not info.loop_params
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_vmap_on_untransformable_model_raises():
    model = Branchy().double()
    data = batches(torch.randn(4, 13, dtype=D), torch.randint(0, 5, (4,)), batch_size=4)
    with pytest.raises(RuntimeError, match=r"method='vmap'.*torch.func could not transform the model"):
        fastewc.estimate_fisher(model, data, method="vmap")


def test_auto_on_good_model_does_not_warn():
    model, data = make_mlp(dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastewc.estimate_fisher(model, data, method="auto")


# -- training flags -----------------------------------------------------------------------------

def _mixed_data():
    return batches(torch.randn(9, 13, dtype=D), torch.randint(0, 5, (9,)), batch_size=4)


@pytest.mark.parametrize("kind", ["empirical", "sampled", "exact"])
@pytest.mark.parametrize("method", ["vmap", "loop", "batched"])
def test_training_flags_restored(method, kind):
    if method == "batched" and kind != "empirical":
        pytest.skip("batched is the empirical approximation only")
    model = Mixed().double().set_mixed()
    before = model.flags()
    data = _mixed_data()
    got = fastewc.estimate_fisher(model, data, method=method, kind=kind, generator=torch.Generator().manual_seed(0))
    assert model.flags() == before
    if method != "batched":  # eval mode: dropout off, BatchNorm on running statistics
        ref = R.estimate_fisher(model, data, kind=kind, generator=torch.Generator().manual_seed(0))
        assert_fisher_close(got, ref)
        assert model.flags() == before


@pytest.mark.parametrize("method", ["vmap", "loop", "auto"])
def test_training_flags_restored_on_error(method):
    model = Mixed().double().set_mixed()
    before = model.flags()

    def bad_loss(out, y):
        raise RuntimeError("boom from loss_fn")

    with pytest.raises(RuntimeError, match="boom from loss_fn"):
        fastewc.estimate_fisher(model, _mixed_data(), method=method, loss_fn=bad_loss)
    assert model.flags() == before


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_an_autocast_region_around_the_call_is_left_off(method):
    """Called inside the user's ``torch.autocast`` (bfloat16), the passes run in the parameters'
    own precision: the same Fisher as outside it, every rule kept (in bfloat16 the rules read a
    layer's float32 input beside a bfloat16 output gradient, and went to the loop), and the
    region is in force again after the call."""
    torch.manual_seed(15)
    model, data = make_encoder(dtype=torch.float32)
    fastewc.fisher.clear_plan_cache()
    want, info = fastewc.estimate_fisher(model, data, method=method, return_info=True)
    fastewc.fisher.clear_plan_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, inside = fastewc.estimate_fisher(model, data, method=method, return_info=True)
        assert torch.is_autocast_enabled("cpu")
    assert (inside.methods, inside.loop_params) == (info.methods, info.loop_params), inside
    assert_fisher_close(got, want, rtol=0.0, atol_rel=0.0)   # the same passes: the same bits


def test_model_weights_and_grads_untouched():
    model, data = make_cnn(dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastewc.estimate_fisher(model, data, method="vmap")
    fastewc.estimate_fisher(model, data, method="loop")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running stats not updated
    assert all(p.grad is None for p in model.parameters())


# -- params -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["vmap", "loop"])
@pytest.mark.parametrize("sel, expected", [
    (["enc.layers.0.linear1.weight", "head.bias"], {"enc.layers.0.linear1.weight", "head.bias"}),
    ("head.*", {"head.weight", "head.bias"}),
    (["enc.*.norm*.weight"], {"enc.layers.0.norm1.weight", "enc.layers.0.norm2.weight"}),
    (lambda name, p: p.dim() == 1 and name.startswith("enc.norm"), {"enc.norm.weight", "enc.norm.bias"}),
])
def test_params_selection(sel, expected, method):
    model, data = make_encoder(dtype=D)
    got = fastewc.estimate_fisher(model, data, params=sel, method=method)
    assert set(got) == expected
    full = R.estimate_fisher(model, data)
    assert_fisher_close(got, {k: full[k] for k in expected})


def test_params_predicate_receives_parameters():
    model, data = make_mlp(dtype=D)
    seen = {}
    fastewc.estimate_fisher(model, data, params=lambda n, p: seen.setdefault(n, p) is p and n.endswith("bias"))
    assert set(seen) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(isinstance(p, nn.Parameter) for p in seen.values())


# -- chunking and memory bound ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["empirical", "exact", "sampled"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunk_size_equals_unchunked(chunk, kind):
    model, data = make_encoder(n=14, batch_size=7, dtype=D)
    g = lambda: torch.Generator().manual_seed(4)
    calls = _count_calls(model)
    got = fastewc.estimate_fisher(model, data, kind=kind, chunk_size=chunk, method="vmap", generator=g())
    assert len(calls) >= 2 * math.ceil(7 / chunk)  # really chunked: a forward per chunk at least
    whole = fastewc.estimate_fisher(model, data, kind=kind, chunk_size=64, method="vmap", generator=g())
    assert_fisher_close(got, whole)
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind, generator=g()))


def test_tiny_max_memory_forces_small_chunks():
    model, data = make_cnn(n=12, batch_size=6, dtype=D)
    calls = _count_calls(model)
    got = fastewc.estimate_fisher(model, data, method="vmap", max_memory=1)
    assert len(calls) >= 12  # one sample per chunk
    assert_fisher_close(got, R.estimate_fisher(model, data))


def test_max_memory_between():
    model, data = make_cnn(n=12, batch_size=12, dtype=D)
    per_sample = sum(p.numel() for p in model.parameters()) * 8
    got = fastewc.estimate_fisher(model, data, method="vmap", max_memory=40 * per_sample)
    assert_fisher_close(got, R.estimate_fisher(model, data))


# -- progress -----------------------------------------------------------------------------------

def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    model, data = make_mlp(dtype=D)
    got = fastewc.estimate_fisher(model, data, progress=True)
    assert_fisher_close(got, R.estimate_fisher(model, data))
    err = capsys.readouterr().err
    assert err.strip(), "progress=True printed nothing on stderr"
