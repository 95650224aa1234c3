"""``FisherTracker`` on every model of the zoo (``tests/zoo.py``): the Fisher summed over the
training steps (learning rate 0, eval mode) against the reference per-sample loop, tensor by
tensor, float64, padded and unpadded batches.

A model's own loss is back-propagated where its batches carry labels (a causal LM's in float64:
``models.causal_lm_loss_fp64``), else a cross-entropy declared as a mean over the samples (a
per-token head's: each sample's mean over its own tokens). What the tracker cannot take is named
per family below and left out with ``params=``: tables the model calls without the batch on dim
0 that meet the batch where the tracker cannot take each sample's share (T5's and BART's tables,
met in an addition or the attention's mask, are tracked). Without ``params=`` each of those
families is refused by name, never summed wrong."""

import warnings
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

import zoo  # noqa: E402  (tests/ is on the path: conftest)
from models import causal_lm_loss_fp64  # noqa: E402

from fastewc import EWCInputError, FisherTracker, UntrackableParameters, check_tracking  # noqa: E402
from fastewc import reference as R  # noqa: E402

# family -> (parameter names containing any of these are left out, why): tables the model calls
# without the batch that meet it where the tracker does not follow (the windows folded into rows)
LEFT_OUT = {
    "swin": (("relative_position_bias",), "Swin's position-bias tables"),
    "swinv2": (("continuous_position_bias_mlp", "logit_scale"), "SwinV2's position-bias MLP, on a grid of offsets"),
    "deberta": (("rel_embeddings", "pos_key_proj", "pos_query_proj", "pos_proj", "pos_q_proj"),
                "DeBERTa's relative embeddings and their projections"),
    "deberta_v3": (("rel_embeddings", "encoder.LayerNorm", "query_proj", "key_proj"),
                   "DeBERTa-v2/v3's relative embeddings, their norm, and the query and key projections that also "
                   "project them (share_att_key)"),
    "wav2vec2": (("pos_conv_embed",), "wav2vec2's positional convolution (weight norm by parametrization: run on "
                                     "one sample it does not reproduce its batched output)"),
}
# family -> why its bound is float32 rounding here (the zoo's own reasons apply too)
FP32 = {"funnel": "its attention has no hand rule and is replayed per sample, through a softmax taken in float32"}
CASES = [(c, p) for c in zoo.CASES for p in c.paddings]


def _declared_loss(out, y):
    """The mean over the samples of each sample's own loss (a per-token head's: the mean over its
    tokens whose target is not -100)."""
    out = out.logits if hasattr(out, "logits") else out
    if out.dim() == 3:
        per = F.cross_entropy(out.transpose(1, 2), y, reduction="none", ignore_index=-100).sum(1)
        return (per / (y != -100).sum(1)).mean()
    return F.cross_entropy(out, y)


def _fp64_loss(model) -> None:
    """Causal LMs compute their own loss in float32 (``logits.float()``); in float64 here."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    for m in model.modules():
        if getattr(m, "loss_function", None) is ForCausalLMLoss:
            m.loss_function = causal_lm_loss_fp64


def _track(model, data, params=None):
    own = isinstance(data[0], dict)
    tracker = FisherTracker(model, params=params)
    with tracker, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in data:
            model.zero_grad()
            (model(**b).loss if own else _declared_loss(model(b[0]), b[1])).backward()
    return tracker


def _truth(model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(data[0], dict):
            return R.estimate_fisher(model, data)
        return R.estimate_fisher(model, data, loss_fn=lambda o, y: _declared_loss(o, y))


def _check(case, model, data):
    """``(tracker, its Fisher, the reference's)`` over ``data``, the family's tables left out by
    name, every tracked tensor held to the case's tolerance."""
    _fp64_loss(model)
    skip = LEFT_OUT.get(case.name, ((), ""))[0]
    keep = (lambda n, p: p.requires_grad and not any(s in n for s in skip)) if skip else None
    tracker = _track(model, data, keep)
    got = tracker.fisher()
    truth = _truth(model, data)
    errs = zoo.relative_errors(got, {n: truth[n] for n in got})
    tol = zoo.TOL_FP32 if case.name in FP32 else case.tol("empirical")[0]
    off = {n: f"{e:.2e}" for n, e in errs.items() if not e <= tol}
    assert not off, f"{case.name}: {len(off)} of {len(got)} tensors off by more than {tol:g}: {off}"
    return tracker, got, truth


@pytest.mark.parametrize("scale", [1.0, zoo.TRAINED], ids=["init", "trained"])
@pytest.mark.parametrize("case,padded", [pytest.param(c, p, id=f"{c.name}-{'padded' if p else 'unpadded'}")
                                         for c, p in CASES])
def test_tracked_matches_the_reference_loop(case, padded, scale):
    """``scale``: every weight matrix times ``zoo.TRAINED`` first, so that attention is away from
    uniform and the query and key projections' Fisher is within the comparison's scale."""
    model, data = zoo.build_scaled(case, padded, scale)
    tracker, got, truth = _check(case, model, data)
    assert tracker.samples_seen == zoo.N
    skip = LEFT_OUT.get(case.name, ((), ""))[0]
    assert set(got) == {n for n in truth if not any(s in n for s in skip)}, sorted(set(truth) - set(got))


@lru_cache(maxsize=None)
def _square_batches(name):
    """The case's kind of text batches with as many tokens as samples (4 and 4, source and target),
    or None for a case that takes no token ids: every sequence layer's input ``[N, T, d]`` then
    has the batch's size on two axes, and tables on ``[T, T]`` or ``arange(T)`` have as many rows
    as the batch has samples. Read once per case (collection asks first)."""
    case = zoo.BY_NAME[name]
    _, data = case.build(True)
    b = data[0]
    if not isinstance(b, dict) or "input_ids" not in b:
        return None
    if b["labels"].shape[1:] != b["input_ids"].shape[1:] or case.name in ("t5", "bart", "marian"):
        return zoo.seq2seq(True, n=8, batch_size=4, seq=4, tgt=4) if b["labels"].dim() == 2 else \
            zoo.text("cls", True, n=8, seq=4, batch_size=4)
    lm = bool(((b["labels"] == b["input_ids"]) | (b["labels"] == -100)).all())
    return zoo.text("lm" if lm else "tok", True, n=8, seq=4, batch_size=4)


SQUARE = [c for c, p in CASES if p and _square_batches(c.name) is not None]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in SQUARE])
def test_tracked_with_as_many_positions_as_samples_matches_the_reference_loop(case):
    """Batches of 4 sequences of 4 tokens at every step (T = N): shapes cannot tell samples from
    positions there; each layer's layout is read from an earlier step or the first step's probe,
    and a table with as many rows as samples is refused (left out here by name)."""
    model, _ = zoo.build_scaled(case, True)
    tracker, _, _ = _check(case, model, _square_batches(case.name))
    assert tracker.samples_seen == 8


@pytest.mark.parametrize("name", sorted(LEFT_OUT))
def test_what_the_tracker_cannot_take_is_refused_by_name(name):
    """Without ``params=``, the first step names a parameter it cannot track."""
    case = zoo.BY_NAME[name]
    torch.manual_seed(0)
    model, data = case.build(case.paddings[0])
    _fp64_loss(model)
    with pytest.raises(EWCInputError, match=r"FisherTracker: .*(leave .*parameters out with params=|params=)"):
        _track(model, data)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in zoo.CASES])
def test_check_tracking_leaves_out_only_what_the_family_cannot_track(case):
    """``check_tracking`` on the family's first batch leaves out some of the parameters named in
    ``LEFT_OUT`` and nothing else (every parameter of the other families tracks; Swin's later
    stages, with one window per sample, track their tables too), and what it keeps tracks
    exactly: the tracker on ``check.params`` against the reference loop over the family's
    batches."""
    torch.manual_seed(0)
    model, data = case.build(case.paddings[0])
    _fp64_loss(model)
    b = data[0]
    step = (lambda: model(**b).loss) if isinstance(b, dict) else (lambda: _declared_loss(model(b[0]), b[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check = check_tracking(model, step)
    skip = LEFT_OUT.get(case.name, ((), ""))[0]
    named = {n for n, p in model.named_parameters() if p.requires_grad and any(s in n for s in skip)}
    assert set(check.left_out) <= named, str(check)
    assert bool(check.left_out) == bool(named), str(check)
    assert set(check.params) == {n for n, p in model.named_parameters() if p.requires_grad} - set(check.left_out)
    got = _track(model, data, check.params).fisher()
    truth = _truth(model, data)
    errs = zoo.relative_errors(got, {n: truth[n] for n in got})
    tol = zoo.TOL_FP32 if case.name in FP32 else case.tol("empirical")[0]
    assert set(got) == set(check.params) and all(e <= tol for e in errs.values()), errs


def test_a_refused_table_names_its_own_parameters():
    """DeBERTa-v3 without ``params=``: the first refusal is the position table (the encoder's
    norm of its relative embeddings) meeting the batch where the tracker does not follow, and it
    names that norm's parameters alone, not the first layer's query and key projections the table
    went through: those are refused on their own once it is left out (``check_tracking``)."""
    torch.manual_seed(0)
    model, data = zoo.BY_NAME["deberta_v3"].build(True)
    with pytest.raises(UntrackableParameters, match=r"deberta\.encoder\.LayerNorm \(LayerNorm\) is a table") as e:
        _track(model, data)
    assert e.value.params == ("deberta.encoder.LayerNorm.weight", "deberta.encoder.LayerNorm.bias")
