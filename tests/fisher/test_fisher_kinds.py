"""estimate_fisher vs reference.estimate_fisher (float64): every kind on every model, GPT-2 dict
batches, batch-size invariance, exact num_samples, the batched approximation."""

import math

import pytest
import torch

import fastewc
from fastewc import reference as R

from models import MAKERS, assert_fisher_close, make_gpt2, make_mlp, rebatch

D = torch.float64
METHODS = ["vmap", "loop", "auto", "rules"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_empirical_matches_reference(name, method):
    model, data = MAKERS[name](dtype=D)
    ref = R.estimate_fisher(model, data)
    got = fastewc.estimate_fisher(model, data, method=method)
    assert_fisher_close(got, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_exact_matches_reference(name, method):
    model, data = MAKERS[name](dtype=D)
    ref = R.estimate_fisher(model, data, kind="exact", num_samples=5)
    got = fastewc.estimate_fisher(model, data, kind="exact", num_samples=5, method=method)
    assert_fisher_close(got, ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_sampled_same_labels_as_reference(name, method):
    model, data = MAKERS[name](dtype=D)
    ref = R.estimate_fisher(model, data, kind="sampled", generator=torch.Generator().manual_seed(7))
    got = fastewc.estimate_fisher(model, data, kind="sampled", method=method,
                                  generator=torch.Generator().manual_seed(7))
    assert_fisher_close(got, ref)


@pytest.mark.parametrize("kind", ["sampled", "exact"])
def test_label_free_batches(kind):
    """``(inputs,)`` batches are enough for kinds that do not read labels."""
    model, data = make_mlp(dtype=D)
    bare = [(x,) for x, _ in data]
    ref = R.estimate_fisher(model, bare, kind=kind, generator=torch.Generator().manual_seed(3))
    got = fastewc.estimate_fisher(model, bare, kind=kind, generator=torch.Generator().manual_seed(3))
    assert_fisher_close(got, ref)


def test_exact_matches_seed_exact_fisher():
    model, data = make_mlp(dtype=D)
    assert_fisher_close(fastewc.estimate_fisher(model, data, kind="exact"),
                        R.compute_exact_fisher(model, data, num_samples=10**9))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k(k):
    """Raw probabilities of the k most likely classes; equals exact at k = C."""
    model, data = MAKERS["token_encoder"](dtype=D)
    ref = R.estimate_fisher(model, data, kind="exact", top_k=k, num_samples=4)
    got = fastewc.estimate_fisher(model, data, kind="exact", top_k=k, num_samples=4)
    assert_fisher_close(got, ref)
    if k == 5:
        assert_fisher_close(got, R.estimate_fisher(model, data, kind="exact", num_samples=4))


def test_float32_model_returns_float32():
    model, data = make_mlp()
    got = fastewc.estimate_fisher(model, data)
    for name, p in model.named_parameters():
        assert got[name].dtype == torch.float32 and got[name].shape == p.shape
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-4, atol_rel=1e-6)


def test_tied_and_frozen_names():
    model, data = MAKERS["tied"](dtype=D)
    got = fastewc.estimate_fisher(model, data)
    assert set(got) == {n for n, _ in model.named_parameters()}  # tied weight once
    assert "out.weight" not in got and "emb.weight" in got
    model, data = MAKERS["frozen"](dtype=D)
    got = fastewc.estimate_fisher(model, data)
    assert set(got) == {"2.weight", "2.bias"}


# -- Hugging Face GPT-2, dict batches ----------------------------------------------------------

@pytest.fixture
def gpt2(request):
    """Default attention (sdpa: not vmappable with padding, so method='auto' falls back to the
    loop), or eager attention for method='vmap'."""
    pytest.importorskip("transformers", reason="transformers (optional test dependency) not installed")
    callspec = getattr(request.node, "callspec", None)
    method = callspec.params.get("method", "auto") if callspec is not None else "auto"
    return make_gpt2(dtype=D, attn="eager" if method == "vmap" else None)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:.*falling back to method='loop'")
def test_gpt2_empirical(gpt2, method):
    model, data = gpt2
    assert_fisher_close(fastewc.estimate_fisher(model, data, method=method), R.estimate_fisher(model, data))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_gpt2_sampled(gpt2, method):
    model, data = gpt2
    ref = R.estimate_fisher(model, data, kind="sampled", generator=torch.Generator().manual_seed(1))
    got = fastewc.estimate_fisher(model, data, kind="sampled", method=method,
                                  generator=torch.Generator().manual_seed(1))
    assert_fisher_close(got, ref)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_gpt2_exact_top_k(gpt2, method):
    model, data = gpt2
    ref = R.estimate_fisher(model, data, kind="exact", top_k=4, num_samples=3)
    got = fastewc.estimate_fisher(model, data, kind="exact", top_k=4, num_samples=3, method=method)
    assert_fisher_close(got, ref)


@pytest.mark.filterwarnings("ignore:.*falling back to method='loop'")
def test_gpt2_exact_full_vocab(gpt2):
    model, data = gpt2
    ref = R.estimate_fisher(model, data, kind="exact", num_samples=2)
    assert_fisher_close(fastewc.estimate_fisher(model, data, kind="exact", num_samples=2), ref)


@pytest.mark.filterwarnings("ignore:.*falling back to method='loop'")
def test_gpt2_batch_size_invariance(gpt2):
    model, data = gpt2
    one = fastewc.estimate_fisher(model, rebatch(data, 1))
    assert_fisher_close(fastewc.estimate_fisher(model, rebatch(data, 5)), one)


# -- batch size, num_samples, batched ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["empirical", "exact", "sampled"])
@pytest.mark.parametrize("name", ["cnn", "token_encoder"])
def test_batch_size_invariance(name, kind):
    model, data = MAKERS[name](dtype=D)
    results = [fastewc.estimate_fisher(model, rebatch(data, bs), kind=kind,
                                       generator=torch.Generator().manual_seed(11))
               for bs in (1, 7, 64)]
    assert_fisher_close(results[1], results[0])
    assert_fisher_close(results[2], results[0])


@pytest.mark.parametrize("kind", ["empirical", "exact", "sampled"])
@pytest.mark.parametrize("n", [1, 6, 9, 13, 20])
def test_num_samples_exact(n, kind):
    """The first n samples, also when n ends mid-batch (batches of 7)."""
    model, data = make_mlp(dtype=D)
    ref = R.estimate_fisher(model, data, kind=kind, num_samples=n, generator=torch.Generator().manual_seed(2))
    got = fastewc.estimate_fisher(model, data, kind=kind, num_samples=n, generator=torch.Generator().manual_seed(2))
    assert_fisher_close(got, ref)
    if n < 20:
        other = R.estimate_fisher(model, data, kind=kind, num_samples=n + 1,
                                  generator=torch.Generator().manual_seed(2))
        assert any(not torch.allclose(got[k].double(), other[k]) for k in got)


def test_num_samples_beyond_data_uses_all():
    model, data = make_mlp(dtype=D)
    assert_fisher_close(fastewc.estimate_fisher(model, data, num_samples=1000), R.estimate_fisher(model, data))


def test_dataloader_input():
    model, data = make_mlp(dtype=D)
    x = torch.cat([b[0] for b in data]); y = torch.cat([b[1] for b in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    assert_fisher_close(fastewc.estimate_fisher(model, loader, num_samples=11),
                        R.estimate_fisher(model, data, num_samples=11))


def test_custom_loss_fn():
    model, data = make_mlp(dtype=D)
    loss = lambda out, y: torch.nn.functional.cross_entropy(out, y) * 3.0 + out.pow(2).mean()
    for method in ("vmap", "loop"):
        assert_fisher_close(fastewc.estimate_fisher(model, data, loss_fn=loss, method=method),
                            R.estimate_fisher(model, data, loss_fn=loss))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_batched_is_seed_batch_fisher(name):
    model, data = MAKERS[name](dtype=D)
    ref = R.batch_fisher_estimation(model, data, num_samples=10**9)
    assert_fisher_close(fastewc.estimate_fisher(model, data, method="batched"), ref)
    exact = R.estimate_fisher(model, data)
    assert any(not torch.allclose(ref[k], exact[k]) for k in ref)  # biased: not the Fisher


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 9), (0, 3), (1, 1)])
def test_labels_drawn_at_once_equal_one_sample_at_a_time(shape, monkeypatch):
    """The batched draw gives torch.multinomial's per-sample labels and leaves the generator where
    the per-sample draws leave it, also across chunks (here one or two samples per chunk)."""
    from fastewc.fisher import problem

    monkeypatch.setattr(problem, "_DRAW_BYTES", 8 * max(1, math.prod(shape[1:])) * 2 - 1)
    z = torch.randn(shape) * 3
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    want = [torch.multinomial(torch.softmax(z[i].double(), -1), 1, generator=g1)[..., 0] for i in range(shape[0])]
    want = torch.stack(want) if want else torch.empty(shape[:-1], dtype=torch.long)
    got = problem.draw_labels(z, g2)
    assert got.dtype == torch.long and torch.equal(got, want)
    assert torch.equal(g1.get_state(), g2.get_state())
