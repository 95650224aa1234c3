"""The differential harness: every model of the zoo (``tests/zoo.py``: tiny Hugging Face models
of every family, RNNs, ``nn.TransformerEncoder``, LoRA, checkpointing), float64, every kind,
padded and unpadded batches: ``fastewc.estimate_fisher`` (method auto) against the reference
per-sample loop, tensor by tensor, and what the report says went by rules.

A value off by more than the case's tolerance fails, and so does a parameter that goes per
sample (vmap or the loop) instead of by rules. ``python benchmarks/fisher_zoo.py`` prints the
same cases as a table."""

from functools import lru_cache

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import zoo  # noqa: E402  (tests/ is on the path: conftest)

# Every model, kind and padding in the default run: the whole file takes about half a minute
# on two cores (tiny models, N = 4), the reference loop included.
COMBOS = [(c, kind, padded) for c in zoo.CASES for kind in c.kinds for padded in c.paddings]


def _param(case, kind, padded):
    return pytest.param(case.name, kind, padded, id=f"{case.name}-{kind}-{'padded' if padded else 'unpadded'}")


@lru_cache(maxsize=None)
def _run(name, kind, padded):
    # the value test and the coverage test read the same run
    return zoo.run(zoo.BY_NAME[name], kind, padded)


@pytest.mark.parametrize("name,kind,padded", [_param(*c) for c in COMBOS])
def test_matches_the_reference_loop(name, kind, padded):
    r = _run(name, kind, padded)
    assert r["passed"], (f"{name} {kind}: {len(r['off'])} of {r['params']} tensors off by more than {r['tol']:g} "
                         f"(worst {r['worst']}: {r['max_rel_error']:.3g}): {r['off']}")


@pytest.mark.parametrize("name,padded", [pytest.param(c.name, p, id=f"{c.name}-{'padded' if p else 'unpadded'}")
                                         for c in zoo.CASES for p in c.paddings])
def test_matches_the_reference_loop_with_trained_sized_weights(name, padded):
    """The empirical kind again with every weight matrix times ``zoo.TRAINED``: attention away from
    uniform, so that the query and key projections' Fisher is within the comparison's scale."""
    r = zoo.run(zoo.BY_NAME[name], "empirical", padded, scale=zoo.TRAINED)
    assert r["passed"], (f"{name}: {len(r['off'])} of {r['params']} tensors off by more than {r['tol']:g} "
                         f"(worst {r['worst']}: {r['max_rel_error']:.3g}): {r['off']}")
    assert not r["coverage"]["vmap_params"] and not r["coverage"]["loop_params"], r["coverage"]


@pytest.mark.parametrize("name,kind,padded", [_param(*c) for c in COMBOS])
def test_every_parameter_by_rules(name, kind, padded):
    cov = _run(name, kind, padded)["coverage"]
    assert not cov["vmap_params"] and not cov["loop_params"], cov


def test_relative_error_is_per_tensor_and_floored():
    import torch

    ref = {"a": torch.tensor([1.0, 2.0]), "key_bias": torch.tensor([0.0, 1e-20])}
    got = {"a": torch.tensor([1.0, 2.2]), "key_bias": torch.tensor([0.0, 3e-20])}
    errs = zoo.relative_errors(got, ref)
    assert errs["a"] == pytest.approx(0.1)
    # a tensor of rounding noise is judged against 1e-9 of the model's largest entry, not itself
    assert errs["key_bias"] == pytest.approx(2e-20 / 2e-9)
    with pytest.raises(AssertionError, match="names differ"):
        zoo.relative_errors({"a": got["a"]}, ref)


@pytest.mark.parametrize("kind", ["sampled", "exact"])
def test_encoder_decoder_counts_decoder_positions_not_the_encoder_mask(kind):
    """Targets as long as the source (so the encoder's attention_mask fits the logits' positions)
    but padded elsewhere: only the positions whose label is not -100 count, on every engine."""
    import torch

    import fastewc
    from fastewc import reference as R

    model, data = zoo.bart(True)
    for b in data:
        b["labels"] = torch.cat([b["labels"], b["labels"][:, :2]], 1)        # SEQ target tokens
        b["labels"][:, 1] = -100                                               # ignored mid-sequence
    assert data[0]["labels"].shape == data[0]["attention_mask"].shape
    gen = (lambda: torch.Generator().manual_seed(3)) if kind == "sampled" else (lambda: None)
    kw = {"top_k": 2} if kind == "exact" else {}
    ref = R.estimate_fisher(model, data, kind=kind, generator=gen(), **kw)
    # (BART's default attention reads mask values in Python, which vmap cannot transform)
    for method in ("auto", "loop"):
        got = fastewc.estimate_fisher(model, data, kind=kind, generator=gen(), method=method, **kw)
        errs = zoo.relative_errors(got, ref)
        assert max(errs.values()) < 1e-10, (method, max(errs, key=errs.get))
