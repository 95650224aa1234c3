"""FisherTracker: the per-sample Fisher from the training steps themselves.

With the parameters fixed in place (learning rate 0) and dropout off, what the tracker sums over
training steps must equal ``estimate_fisher(kind="empirical")`` over the same batches, whatever
the loss's reduction, gradient accumulation or GradScaler does to the backward. Float64 tiny
models throughout."""

import contextlib
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastewc import EWCInputError, FisherTracker, estimate_fisher

from models import (Attention, assert_fisher_close, causal_lm_loss_fp64, hf_batches, hf_model, make_cnn,
                    make_encoder, make_mlp, make_tied, spy)

D = torch.float64
TOL = dict(rtol=1e-10, atol_rel=1e-10)
MAKERS = {"mlp": make_mlp, "cnn": make_cnn, "encoder": make_encoder, "tied": make_tied}


def _train(model, data, tracker, *, reduction="mean", accumulate=1, scaler=None):
    """Plain training loop at learning rate 0: the loss is the batch mean (or sum) of cross-entropy,
    divided by ``accumulate``, scaled by ``scaler``; an optimizer step every ``accumulate`` batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with tracker:
        for b, (x, y) in enumerate(data):
            loss = F.cross_entropy(model(x), y, reduction=reduction) / accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if (b + 1) % accumulate == 0:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
    return tracker


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_models_equal_estimate_fisher(name, reduction):
    model, data = MAKERS[name](dtype=D)
    model.eval()  # dropout off, BatchNorm on running statistics
    tracker = _train(model, data, FisherTracker(model, reduction=reduction), reduction=reduction)
    assert tracker.samples_seen == sum(len(y) for _, y in data) and tracker.steps == len(data)
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data), **TOL)


def _replayed(dtype):  # an attention called twice a step: its per-sample gradients come from replays
    torch.manual_seed(0)
    ids = torch.randint(1, 11, (8, 5))
    return TwiceAttended().to(dtype), [(ids[:4], torch.randint(0, 3, (4,))), (ids[4:], torch.randint(0, 3, (4,)))]


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied", "replayed"])
def test_a_backward_that_builds_a_graph_sums_the_same_and_records_nothing(name):
    """``backward(create_graph=True)`` (a gradient penalty's first backward) runs the hooks with
    autograd recording: the tracker's own arithmetic must stay out of the graph and sum the same."""
    model, data = {**MAKERS, "replayed": _replayed}[name](dtype=D)
    model.eval()
    tracker = FisherTracker(model)
    with tracker:
        for x, y in data:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward(create_graph=True)
    fisher = tracker.fisher()
    assert not any(t.requires_grad for t in tracker._sums.values())
    assert_fisher_close(fisher, estimate_fisher(model, data), **TOL)
    model.zero_grad(set_to_none=True)  # the graphs the gradients hold refer to the parameters


def test_gradient_accumulation_of_three():
    model, data = make_mlp(n=27, batch_size=4, dtype=D)
    tracker = _train(model, data, FisherTracker(model, accumulation_steps=3), accumulate=3)
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data), **TOL)


@pytest.mark.parametrize("name", ["mlp", "encoder", "tied"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_grad_scaler_is_divided_out(name, fraction):
    # The scale is a tensor the tracker never reads on the host: one weight per sample where the
    # sums read the gradients (the products, the kernel over a sequence, the attention read from
    # its backward, a tied head), whatever the samples tracked.
    model, data = MAKERS[name](dtype=D)
    model.eval()
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0 * 2.0**10)  # not a power of 2: no exact shortcut
    tracker = _train(model, data, FisherTracker(model, scaler=scaler, accumulation_steps=2, fraction=fraction, seed=3),
                     accumulate=2, scaler=scaler)
    assert tracker.steps_skipped == 0
    if fraction < 1.0:
        g = torch.Generator().manual_seed(3)
        data = [(x[i], y[i]) for x, y in data
                for i in [torch.randperm(len(y), generator=g)[:max(1, round(fraction * len(y)))].sort().values]]
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data), **TOL)


def test_a_step_the_scaler_skips_is_not_counted():
    model, data = make_mlp(dtype=D)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # times 1e300: the backward overflows
    tracker = FisherTracker(model, scaler=scaler)
    with tracker:
        x, y = data[0]
        scaler.scale(F.cross_entropy(model(x), y) * 1e300).backward()
    assert tracker.steps_skipped == 1 and tracker.samples_seen == 0


def test_undeclared_accumulation_is_off_by_exactly_k_squared():
    """The tracker never guesses: a loss divided by k but not declared gives the Fisher / k^2,
    which is what it must give (the declaration is what makes it right). The gradient reaching
    the logits shows a cross-entropy weighing each sample 1/k of what was declared, and a
    warning says so."""
    model, data = make_mlp(dtype=D)
    with pytest.warns(UserWarning, match=r"scales every sample's gradient by 0\.3333 .* the tracked Fisher would "
                                         r"be 0\.1111 times"):
        tracker = _train(model, data, FisherTracker(model), accumulate=3)
    ref = estimate_fisher(model, data)
    assert_fisher_close({n: 9 * t for n, t in tracker.fisher().items()}, ref, **TOL)


@pytest.mark.parametrize("loss, warned", [
    ("class weights, mean", r"average exactly one over the batch, as class weights in F\.cross_entropy"),
    ("class weights per sample, then mean", None),
    ("times 0.5", r"scales every sample's gradient by 0\.5 "),
    ("label smoothing", None),
    ("plain", None)])
def test_a_cross_entropy_weighing_samples_otherwise_than_declared_is_warned_about(loss, warned, recwarn):
    """Read from the gradient reaching the logits on the first steps: a cross-entropy's is
    ``c_n (softmax - onehot)``, and ``c_n`` must be what the declaration says. Class weights with
    reduction='mean' divide by the batch's total weight (the tracked gradients carried
    N w_y / sum(w) without a word); a loss times a constant scales the Fisher by its square. Each
    sample's own weighted loss averaged over the samples, and label smoothing, are not judged."""
    torch.manual_seed(0)
    model, data = make_mlp(dtype=D)
    w = torch.linspace(0.5, 3.0, 5, dtype=D)
    losses = {"class weights, mean": lambda o, y: F.cross_entropy(o, y, weight=w),
              "class weights per sample, then mean": lambda o, y: F.cross_entropy(o, y, weight=w, reduction="none").mean(),
              "times 0.5": lambda o, y: 0.5 * F.cross_entropy(o, y),
              "label smoothing": lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1),
              "plain": lambda o, y: F.cross_entropy(o, y)}
    with FisherTracker(model):
        for x, y in data:
            model.zero_grad()
            losses[loss](model(x), y).backward()
    said = [str(m.message) for m in recwarn.list if "the gradient reaching the logits" in str(m.message)]
    if warned is None:
        assert not said
    else:
        assert len(said) == 1 and re.search(warned, said[0]), said


def test_training_step_is_unchanged():
    """Same parameter gradients with and without the tracker, bit for bit (the encoder has a
    module-local attention, GPT-2 a position table called without a batch axis)."""
    pytest.importorskip("transformers")
    model, data = make_encoder(dtype=D)
    model.eval()
    gpt2 = hf_model("gpt2")
    cases = [(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), data),
             (gpt2, lambda m, b: m(**b).loss, hf_batches(5, 8, 40, "lm", batch_size=5))]
    for m, loss_of, batches in cases:
        for b in batches:
            m.zero_grad()
            loss_of(m, b).backward()
            plain = {n: p.grad.clone() for n, p in m.named_parameters()}
            m.zero_grad()
            with FisherTracker(m):
                loss_of(m, b).backward()
            for n, p in m.named_parameters():
                assert torch.equal(p.grad, plain[n]), n


# -- Hugging Face models: their own loss, read from the labels ----------------------------------
HF = {"bert": ("bert", "cls", {}), "bert_reg": ("bert", "reg", {"num_labels": 1}), "bert_tok": ("bert_tok", "tok", {}),
      "gpt2": ("gpt2", "lm", {}), "llama": ("llama", "lm", {}), "opt": ("opt", "lm", {})}


def _hf(case, fp64_loss=False, n=7, batch_size=3):
    name, labels, overrides = HF[case]
    model = hf_model(name, **overrides)
    if fp64_loss:
        model.loss_function = causal_lm_loss_fp64
    return model, hf_batches(n, 8, 40, labels, batch_size=batch_size)


def _hf_train(model, data, tracker, divide=1):
    with tracker:
        for b in data:
            model.zero_grad()
            (model(**b).loss / divide).backward()
    return tracker


def _causal_truth(model, data):
    """The per-sample loop: each sequence alone, its float64 loss the mean over its own shifted
    tokens, squared gradients averaged."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for b in data:
        for i in range(b["input_ids"].shape[0]):
            one = {k: v[i : i + 1] for k, v in b.items() if k != "labels"}
            logits = model(**one).logits
            shifted = F.pad(b["labels"][i : i + 1], (0, 1), value=-100)[..., 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
            for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                sums[n] += g * g
            count += 1
    return {n: s / count for n, s in sums.items()}


@pytest.mark.parametrize("case", ["bert", "bert_reg", "bert_tok"])
def test_hf_classifiers_equal_estimate_fisher(case):
    pytest.importorskip("transformers")
    model, data = _hf(case)
    tracker = _hf_train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data), **TOL)


def test_hf_causal_lm_with_as_many_positions_as_samples_is_exact():
    """Batches of 8 sequences of 8 tokens: every layer's input is ambiguous in its shape, so the
    first step probes the model on one sample (its own loss, the position table without a batch
    axis); the layers are batch first, and the sums stay exact."""
    pytest.importorskip("transformers")
    model, data = _hf("gpt2", fp64_loss=True, n=16, batch_size=8)
    assert all(b["input_ids"].shape == (8, 8) for b in data)
    tracker = _hf_train(model, data, FisherTracker(model))
    assert tracker.samples_seen == 16
    assert_fisher_close(tracker.fisher(), _causal_truth(model, data), **TOL)


@pytest.mark.parametrize("case", ["gpt2", "llama", "opt"])
def test_hf_causal_lm_token_mean_with_padding_is_exact(case):
    """Token mean over the batch's non-padding labels, the shift, a tied head (GPT-2), a position
    table without a batch axis: exact in float64 against the per-sample loop, and against
    estimate_fisher to the float32 rounding of the Hugging Face loss both use. OPT's feed-forward
    layers take the batch's tokens as rows, ``[N*T, d]``. Llama's RMSNorm normalises in float32 even in a float64 model, so a batched pass and a sample alone may round
    a value differently there: its bound is float32 rounding too."""
    pytest.importorskip("transformers")
    model, data = _hf(case, fp64_loss=True)
    tracker = _hf_train(model, data, FisherTracker(model))
    assert tracker.samples_seen == 7
    tol = TOL if case == "gpt2" else dict(rtol=1e-6, atol_rel=1e-8)
    assert_fisher_close(tracker.fisher(), _causal_truth(model, data), **tol)
    model, data = _hf(case)
    tracker = _hf_train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data), rtol=1e-6, atol_rel=1e-8)


def test_hf_causal_lm_token_mean_on_a_tracked_subset_is_exact():
    """A quarter-style subset of each batch with the token-mean loss: each tracked sample's share
    of the batch's loss scales its gradient where the rules read it in place (the CPU kernel's
    picked samples and weights); exact against the per-sample loop over the same subset."""
    pytest.importorskip("transformers")
    model, data = _hf("gpt2", fp64_loss=True, n=9, batch_size=4)
    tracker = _hf_train(model, data, FisherTracker(model, fraction=0.5, seed=4))
    g = torch.Generator().manual_seed(4)
    subset = []
    for b in data:
        n = b["input_ids"].shape[0]
        idx = torch.randperm(n, generator=g)[:max(1, round(0.5 * n))].sort().values
        subset.append({k: v[idx] for k, v in b.items()})
    assert tracker.samples_seen == sum(b["input_ids"].shape[0] for b in subset) == 5
    assert_fisher_close(tracker.fisher(), _causal_truth(model, subset), **TOL)


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_hf_encoder_decoder_token_mean_with_padding_is_exact(case):
    """An encoder-decoder's own loss: the mean over the batch's decoder labels that are not -100
    (padded targets, no shift), with the embedding tied to the head across both stacks. Against
    the per-sample reference loop in float64. Left out, by ``params=``: tables called without the
    batch on dim 0 (T5's relative position bias, on [T, S] buckets; BART's decoder positions, on
    [1, T])."""
    pytest.importorskip("transformers")
    import zoo
    from fastewc import reference

    torch.manual_seed(0)
    model, _ = zoo.BY_NAME[case].build(True)
    model = model.to(D).eval()
    data = zoo.seq2seq(True, n=7, batch_size=3)
    skip = "relative_attention_bias" if case == "t5" else "embed_positions"
    tracker = _hf_train(model, data, FisherTracker(model, params=lambda n, p: skip not in n))
    assert tracker.samples_seen == 7 and not any(skip in n for n in tracker.fisher())
    want = reference.estimate_fisher(model, data)
    # T5's layer norm computes in float32 inside a float64 model
    tol = dict(rtol=1e-6, atol_rel=1e-8) if case == "t5" else TOL
    assert_fisher_close(tracker.fisher(), {n: t for n, t in want.items() if skip not in n}, **tol)


@pytest.mark.parametrize("case", ["swin", "swinv2"])
def test_hf_windows_folded_into_rows_are_exact(case):
    """Swin's attention and feed-forward layers take each image's windows as rows,
    ``[N*windows, tokens, d]``. A batch of 4 images with windows of 2x2 tokens fits the shapes of
    a sequence-first layer too, which the tracker took them for (q, k, v 5-80% off, no error).
    Left out, by ``params=``: the position-bias tables, called without the batch."""
    pytest.importorskip("transformers")
    import zoo
    from fastewc import reference

    torch.manual_seed(0)
    model, _ = zoo.BY_NAME[case].build(False)
    model = model.to(D).eval()
    data = zoo.images(n=8, batch_size=4)
    skip = ("relative_position_bias", "continuous_position_bias_mlp", "logit_scale")
    tracker = _hf_train(model, data, FisherTracker(model, params=lambda n, p: not any(s in n for s in skip)))
    assert tracker.samples_seen == 8 and len(tracker.fisher()) >= 41
    want = reference.estimate_fisher(model, data)
    assert_fisher_close(tracker.fisher(), {n: want[n] for n in tracker.fisher()}, **TOL)


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_hf_encoder_decoder_tables_are_tracked_also_at_as_many_positions_as_samples(case):
    """T5's relative position bias (met by the batch in the attention's mask) and BART's positions
    (added to the embeddings), with batches of 4 sequences of 4 tokens (source and target): T5's
    buckets ``[T, T]`` have the batch's size on dim 0, and the table was summed as 4 samples' rows
    (70-75% off, no error). Every parameter tracked, against the reference loop."""
    pytest.importorskip("transformers")
    import zoo
    from fastewc import reference

    torch.manual_seed(0)
    model, _ = zoo.BY_NAME[case].build(False)
    model = model.to(D).eval()
    data = zoo.seq2seq(False, n=8, batch_size=4, seq=4, tgt=4)
    tracker = _hf_train(model, data, FisherTracker(model))
    want = reference.estimate_fisher(model, data)
    assert set(tracker.fisher()) == set(want)
    # T5's layer norm computes in float32 inside a float64 model
    assert_fisher_close(tracker.fisher(), want, **(dict(rtol=1e-6, atol_rel=1e-8) if case == "t5" else TOL))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hf_own_loss_of_a_half_precision_model_is_read(dtype):
    """A model trained in bfloat16 or float16 throughout: BERT's classification head computes its
    loss in that precision, which the check of the own loss's weights (to float32 rounding) took
    for another loss and refused. Within a few of the loss's own rounding steps now, and a loss
    10% off is still refused; the tracked Fisher is the float64 one on the same rounded weights
    to that precision."""
    pytest.importorskip("transformers")
    import transformers as T

    model, data = _hf("bert")
    low = hf_model("bert").to(dtype)
    low.load_state_dict(model.state_dict())
    high = hf_model("bert")
    high.load_state_dict(low.state_dict())  # the rounded weights, in float64
    got = _hf_train(low, data, FisherTracker(low)).fisher()
    want = _hf_train(high, data, FisherTracker(high)).fisher()
    # five rounding steps of the model's precision (measured: 1.4e-2 in bfloat16, 1.9e-3 in float16),
    # each tensor against its own largest entry, floored where its Fisher is rounding noise (key biases)
    largest = max(float(w.abs().max()) for w in want.values())
    for n, w in want.items():
        assert got[n].dtype == torch.float32
        scale = max(float(w.abs().max()), 1e-6 * largest)
        assert float((got[n].double() - w).abs().max()) <= 5 * torch.finfo(dtype).eps * scale, n

    class ScaledBertForSequenceClassification(T.BertForSequenceClassification):
        def forward(self, **kwargs):
            out = super().forward(**kwargs)
            out.loss = out.loss * 1.1
            return out

    low.__class__ = ScaledBertForSequenceClassification
    with pytest.raises(EWCInputError, match=r"own loss \(.*\) is not the weighted mean of its per-sample "
                                            r"sequence_classification losses the tracker assumes"):
        _hf_train(low, data, FisherTracker(low))


def test_hf_loss_of_an_unknown_head_is_refused_by_name():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForMultipleChoice(transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).to(D).eval()
    tracker = FisherTracker(model)
    with tracker, pytest.raises(EWCInputError, match="does not know how BertForMultipleChoice's own loss"):
        model(input_ids=torch.randint(0, 20, (2, 3, 4)), labels=torch.tensor([0, 2]))


def test_hf_accumulation_and_num_items_in_batch_are_read_not_declared():
    """A loss divided by k, or a token sum over ``num_items_in_batch`` (the Trainer's form under
    accumulation): the tracker reads both from the backward and the model's keywords."""
    pytest.importorskip("transformers")
    model, data = _hf("gpt2", fp64_loss=True)
    truth = _causal_truth(model, data)
    assert_fisher_close(_hf_train(model, data, FisherTracker(model), divide=3).fisher(), truth, **TOL)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    tracker = FisherTracker(model)
    with tracker:
        for b in data:
            model.zero_grad()
            model(**b, num_items_in_batch=torch.tensor(total)).loss.backward()
    assert_fisher_close(tracker.fisher(), truth, **TOL)


@pytest.mark.parametrize("case", ["bert", "bert_tok", "gpt2"])
def test_whether_the_models_loss_sums_over_num_items_in_batch_is_read_from_the_loss(case):
    """Given ``num_items_in_batch`` (the Trainer's keyword under accumulation), Hugging Face's
    shared loss functions sum over it (GPT-2), a loss written in the model's forward ignores it
    (BERT's classification heads). The first batch here gets its own count, where both
    conventions weigh the samples alike; the later ones twice it, where the model's loss says
    which convention it follows. Either way the tracker equals the per-sample truth."""
    pytest.importorskip("transformers")
    model, data = _hf(case, fp64_loss=case == "gpt2")
    tracker = FisherTracker(model)
    with tracker:
        for b, batch in enumerate(data):
            labels = batch["labels"][:, 1:] if case == "gpt2" else batch["labels"]
            count = int((labels != -100).sum())
            model.zero_grad()
            model(**batch, num_items_in_batch=torch.tensor(count if b == 0 else 2 * count)).loss.backward()
    assert tracker._sums_over_num_items is (case == "gpt2")
    truth = _causal_truth(model, data) if case == "gpt2" else estimate_fisher(model, data, kind="empirical")
    assert_fisher_close(tracker.fisher(), truth, **TOL)


@pytest.mark.parametrize("inputs", ["self", "cross"])
@pytest.mark.parametrize("route", ["observed", "sums", "blocks"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_attention_sums_without_blocks_match_the_loop(inputs, route, fraction, monkeypatch):
    """``nn.MultiheadAttention``'s parameters, used nowhere else, are read from the training
    backward's own nodes ("observed"); where that is refused they are summed from one batched
    replay like Linear layers ("sums"); with that refused too, its per-sample blocks serve
    ("blocks"). Self- and cross-attention, against the per-sample reference loop, key padding and
    a tracked subset included."""
    from fastewc import reference
    from fastewc.fisher.rules import attention, replay

    observed = spy(monkeypatch, replay.OBSERVERS, nn.MultiheadAttention,
                   attention.observe_projections if route == "observed" else (lambda *a: None))
    summed = spy(monkeypatch, replay.LOCAL_SQ_SUMS, nn.MultiheadAttention,
                 (lambda *a: None) if route == "blocks" else attention.mha_sq_sums)
    torch.manual_seed(4)
    model = Attention(inputs).to(D)
    ids = torch.randint(1, 11, (8, 5))
    ids[::2, -2:] = 0
    data = [(ids[i:i + 4], torch.randint(0, 3, (4,))) for i in range(0, 8, 4)]
    tracker = _train(model, data, FisherTracker(model, fraction=fraction, seed=2))
    want = data
    if fraction < 1:
        g = torch.Generator().manual_seed(2)
        want = [(x[i], y[i]) for x, y in data for i in [torch.randperm(len(y), generator=g)[:2].sort().values]]
    assert_fisher_close(tracker.fisher(), reference.estimate_fisher(model, want), **TOL)
    read = route == "observed"
    assert observed and all(observed) == read, observed
    assert (summed == []) if read else (summed and all(summed) == (route != "blocks")), summed


@pytest.mark.parametrize("inputs", ["self", "cross"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("weights", ["none", "averaged"])
def test_attention_in_training_mode_with_dropout_is_exact(inputs, batch_first, weights):
    """Read from its own backward, an attention needs no replay, so its dropout (and the encoder
    layer's) may stay on: the truth is the per-sample loop over the very same forward, the dropout
    masks drawn again from the same seed, one sample's loss differentiated at a time."""
    torch.manual_seed(5)
    model = Attention(inputs, weights=weights, batch_first=batch_first).to(D)
    model.attn.dropout = 0.3
    model.train()
    ids = torch.randint(1, 11, (6, 5))
    ids[::2, -2:] = 0
    y = torch.randint(0, 3, (6,))
    tracker = FisherTracker(model)
    with tracker:
        torch.manual_seed(9)
        F.cross_entropy(model(ids), y).backward()
    torch.manual_seed(9)
    losses = F.cross_entropy(model(ids), y, reduction="none")
    params = dict(model.named_parameters())
    truth = {n: torch.zeros_like(t) for n, t in params.items()}
    for i in range(len(y)):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:  # the cross-attention's memory layer is unused here
                truth[n] += g * g / len(y)
    assert_fisher_close(tracker.fisher(), truth, **TOL)


@pytest.mark.parametrize("end", ["backward", "stop", "next forward"])
def test_no_step_outlives_its_pass(end):
    """What a tracked forward recorded is let go when its pass is folded, dropped by ``stop()`` or
    replaced by the next forward: a module-local record holds outputs whose gradient hooks hold
    the pass, a cycle through autograd's nodes that Python's collector cannot free, which kept
    every step's graph (its activations) alive."""
    import gc
    import weakref

    model = Attention("cross").to(D)  # a module-local site: its record holds its hooked outputs
    outputs = []
    model.attn.register_forward_hook(lambda m, a, o: outputs.append(weakref.ref(o[0])))
    ids, y = torch.randint(1, 11, (4, 5)), torch.randint(0, 3, (4,))
    tracker = FisherTracker(model).start()
    loss = F.cross_entropy(model(ids), y)
    if end == "backward":
        loss.backward()
    elif end == "stop":
        tracker.stop()
    else:
        model(ids)
    del loss
    gc.collect()
    assert outputs[0]() is None
    tracker.stop()


@pytest.mark.parametrize("inputs", ["self", "cross"])
@pytest.mark.parametrize("route", ["observed", "replayed"])
def test_a_backward_inside_autocast_sums_as_one_outside(inputs, route, monkeypatch):
    """The tracker's own arithmetic runs outside autocast, and a replay under the autocast its
    forward ran in: a backward called inside the autocast region sums the same as the usual
    backward after it (a replay's half-precision products used to meet float32 inputs)."""
    from fastewc.fisher.rules import attention, replay

    spy(monkeypatch, replay.OBSERVERS, nn.MultiheadAttention,
        attention.observe_projections if route == "observed" else (lambda *a: None))
    torch.manual_seed(3)
    model = Attention(inputs, mask="none")
    # the same recorded tensors and the same float32 arithmetic: the same bits (in half precision
    # the sums were 2e-3 off)
    _same_bits_inside_and_after_autocast(model, [(torch.randint(1, 11, (6, 5)), torch.randint(0, 3, (6,)))])


def _same_bits_inside_and_after_autocast(model, data) -> None:
    """Track ``data`` with the backward inside the bfloat16 autocast region of the forward, then
    after it: the Fishers must be the same bits."""
    got = []
    for inside in (True, False):
        tracker = FisherTracker(model)
        with tracker:
            for x, y in data:
                model.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                    if inside:
                        loss.backward()
                if not inside:
                    loss.backward()
        got.append(tracker.fisher())
    assert all(torch.equal(got[0][n], got[1][n]) for n in got[1]), \
        {n: float((got[0][n] - got[1][n]).abs().max()) for n in got[1]}


def test_a_tied_heads_sum_keeps_float32_in_a_backward_inside_autocast():
    """A tied head's sum runs a matrix product of its own (over the rows the lookups took), which
    an autocast region still around the backward would run in bfloat16."""
    model, data = make_tied()
    _same_bits_inside_and_after_autocast(model.eval(), data)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_mask_with_as_many_rows_as_samples_is_not_a_sample_axis(batch_first):
    """A causal mask ``[T, T]`` whose T equals the batch size is passed to every sample whole, not
    split or subset with the samples (the record names the per-sample arguments; no size decides)."""
    from fastewc import reference

    torch.manual_seed(5)
    model = Attention("self", "causal", "none", batch_first=batch_first).to(D)
    ids = torch.randint(1, 11, (8, 4))
    data = [(ids[i:i + 4], torch.randint(0, 3, (4,))) for i in range(0, 8, 4)]   # T = 4 = batch size
    tracker = _train(model, data, FisherTracker(model, fraction=0.5, seed=3))
    g = torch.Generator().manual_seed(3)
    want = [(x[i], y[i]) for x, y in data for i in [torch.randperm(len(y), generator=g)[:2].sort().values]]
    assert_fisher_close(tracker.fisher(), reference.estimate_fisher(model, want), **TOL)


def test_a_shared_table_with_as_many_rows_as_samples_is_not_split():
    """A module-local module fed a table ``[T, d]`` with T = the batch size: the tracker proves on
    one sample which arguments hold the samples (the table does not), instead of splitting it."""
    from fastewc import reference
    from test_fisher_local_rules import WithAngles

    torch.manual_seed(0)
    model = WithAngles().to(D)
    x, y = torch.randn(8, 4, 3, dtype=D), torch.randint(0, 2, (8,))
    data = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 8, 4)]   # T = 4 = batch size
    tracker = _train(model, data, FisherTracker(model))
    assert tracker.rules["rot.scale"] == "module-local"
    assert_fisher_close(tracker.fisher(), reference.estimate_fisher(model, data), **TOL)


def test_a_module_whose_samples_interact_is_refused_by_name():
    class Centre(nn.Module):   # no rule: subtracts the batch's mean, so samples interact
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(5))

        def forward(self, h):
            return (h - h.mean(0, keepdim=True)) * self.scale

    model = nn.Sequential(nn.Linear(3, 5), Centre(), nn.Linear(5, 2)).to(D)
    tracker = FisherTracker(model)
    with tracker, pytest.raises(EWCInputError, match=r"1 \(Centre\) has no hand rule.*params="):
        model(torch.randn(4, 3, dtype=D))


# -- fraction, decay, state ---------------------------------------------------------------------
def test_fraction_tracks_the_seeded_subset_exactly():
    model, data = make_mlp(n=30, batch_size=8, dtype=D)
    tracker = _train(model, data, FisherTracker(model, fraction=0.25, seed=7))
    g = torch.Generator().manual_seed(7)
    subset = []
    for x, y in data:
        k = max(1, round(0.25 * len(y)))
        idx = torch.randperm(len(y), generator=g)[:k].sort().values
        subset.append((x[idx], y[idx]))
    assert tracker.samples_seen == sum(len(y) for _, y in subset) == 8
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, subset), **TOL)


def test_fraction_on_tied_and_module_local_sites():
    model, data = make_encoder(n=12, batch_size=6, dtype=D)
    model.eval()
    tracker = _train(model, data, FisherTracker(model, fraction=0.5, seed=3))
    g = torch.Generator().manual_seed(3)
    subset = [(x[i], y[i]) for x, y in data for i in [torch.randperm(len(y), generator=g)[:3].sort().values]]
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, subset), **TOL)


def _tracked_batches(model, data, tracker) -> list[int]:
    """Train over ``data`` at lr 0 under ``tracker``, one step per batch: which batches it tracked."""
    tracked = []
    with tracker:
        for b, (x, y) in enumerate(data):
            steps = tracker.steps
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if tracker.steps > steps:
                tracked.append(b)
    return tracked


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_one_in_tracks_one_step_of_each_run_exactly(fraction):
    """``one_in=3``: one batch of each run of three, at the position the seeded generator drew
    when the run began, and only its samples (a seeded subset of them with ``fraction``)."""
    model, data = make_mlp(n=80, batch_size=8, dtype=D)   # ten batches: three runs and one begun
    tracked = _tracked_batches(model, data, FisherTracker(model, one_in=3, fraction=fraction, seed=5))
    g = torch.Generator().manual_seed(5)
    want, subset = [], []
    for start in range(0, len(data), 3):
        pick = int(torch.randint(3, (1,), generator=g))
        if start + pick < len(data):
            want.append(start + pick)
            x, y = data[start + pick]
            if fraction < 1:
                idx = torch.randperm(len(y), generator=g)[:4].sort().values
                x, y = x[idx], y[idx]
            subset.append((x, y))
    assert tracked == want and len(set(b // 3 for b in tracked)) == len(tracked)
    tracker = FisherTracker(model, one_in=3, fraction=fraction, seed=5)
    _tracked_batches(model, data, tracker)
    assert tracker.samples_seen == sum(len(y) for _, y in subset)
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, subset), **TOL)
    other = _tracked_batches(model, data, FisherTracker(model, one_in=3, fraction=fraction, seed=6))
    assert all(b // 3 == i for i, b in enumerate(other)) and other != tracked  # another seed, other picks


def test_one_in_counts_training_forwards_only_and_resumes_from_its_state():
    """Forwards without gradients (an evaluation) are no step of a run; a tracker restored from
    ``state_dict`` in the middle of a run picks what the uninterrupted one picks."""
    model, data = make_mlp(n=64, batch_size=8, dtype=D)
    whole = _tracked_batches(model, data, FisherTracker(model, one_in=4, seed=1))
    first = FisherTracker(model, one_in=4, seed=1)
    head = _tracked_batches(model, data[:3], first)
    with torch.no_grad(), first:
        model(data[0][0])
    rest = FisherTracker(model, one_in=4, seed=1)
    rest.load_state_dict(first.state_dict())
    tail = [b + 3 for b in _tracked_batches(model, data[3:], rest)]
    assert head + tail == whole and len(whole) == 2
    assert rest.samples_seen == 8 * len(whole)


def test_decay_is_the_moving_average_over_steps():
    model, data = make_mlp(n=21, batch_size=7, dtype=D)
    tracker = _train(model, data, FisherTracker(model, decay=0.75))
    steps = [estimate_fisher(model, [b]) for b in data]
    want = steps[0]
    for f in steps[1:]:
        want = {n: 0.75 * want[n] + 0.25 * f[n] for n in want}
    assert tracker.steps == 3
    assert_fisher_close(tracker.fisher(), want, **TOL)


def test_state_dict_round_trip_and_reset():
    model, data = make_mlp(dtype=D)
    tracker = _train(model, data[:2], FisherTracker(model, fraction=0.5))
    fresh = FisherTracker(model, fraction=0.5)
    fresh.load_state_dict(tracker.state_dict())
    _train(model, data[2:], tracker)
    _train(model, data[2:], fresh)  # the same draws: the generator's state travelled too
    assert fresh.samples_seen == tracker.samples_seen
    assert_fisher_close(fresh.fisher(), tracker.fisher(), rtol=0, atol_rel=0)
    tracker.reset()
    assert tracker.samples_seen == 0
    with pytest.raises(EWCInputError, match="no training step"):
        tracker.fisher()


def test_float64_and_float32_parameters_keep_their_sum_dtype():
    model, data = make_mlp()
    tracker = _train(model, data, FisherTracker(model))
    assert all(t.dtype == torch.float32 for t in tracker.fisher().values())
    model, data = make_mlp(dtype=D)
    assert all(t.dtype == D for t in _train(model, data, FisherTracker(model)).fisher().values())


def test_stop_removes_every_hook_and_eval_forwards_are_not_tracked():
    model, data = make_mlp(dtype=D)
    tracker = _train(model, data[:1], FisherTracker(model))
    seen = tracker.samples_seen
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    (x, y), n = data[1], data[1][0].shape[0]
    with tracker:
        out = model(x)
        with torch.no_grad():
            model(x[:2])  # an evaluation between forward and backward opens no pass of its own
        F.cross_entropy(out, y).backward()
    assert tracker.samples_seen == seen + n
    with tracker:
        out = model(x)
    F.cross_entropy(out, y).backward()  # back-propagated after stop(): dropped, as stop() says
    assert tracker.samples_seen == seen + n
    F.cross_entropy(model(x), y).backward()  # no hooks left: nothing tracked
    assert tracker.samples_seen == seen + n


# -- refusals ----------------------------------------------------------------------------------
class WithToken(nn.Module):
    """A class token: an nn.Parameter the forward uses outside any module."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 4))
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x + self.cls)


def test_parameter_outside_any_module_is_refused_by_name_and_can_be_left_out():
    model = WithToken().to(D)
    with pytest.raises(EWCInputError, match=r"\['cls'\] are used outside any module"):
        FisherTracker(model)
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    tracker = _train(model, [(x, y)], FisherTracker(model, params=["lin.*"]))
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, [(x, y)], params=["lin.*"]), **TOL)


class _ReusedWeight(nn.Module):
    """``lin``'s weight used again by ``F.linear`` in the parent's forward, outside ``lin``'s."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(torch.tanh(self.lin(x)), self.lin.weight)))


class _ReadByParent(nn.Module):
    """A child never called: its parameters read by the parent's forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.lin.weight.T + self.lin.bias))


class _OutsideWithoutGradient(nn.Module):
    """Reads of ``lin``'s weight outside ``lin`` that add nothing to its gradient: its dtype,
    a detached copy, a product under no_grad."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        x = x.to(self.lin.weight.dtype) + self.lin.weight.detach().sum() * 0
        with torch.no_grad():
            norm = self.lin.weight.norm()
        return self.head(torch.tanh(self.lin(x)) * (norm / norm))


@pytest.mark.parametrize("cls, names", [(_ReusedWeight, r"\['lin.weight'\] are used in the model's forward outside"),
                                        (_ReadByParent, r"\['lin.bias', 'lin.weight'\] are used in the model's forward "
                                                        r"outside")])
def test_a_parameter_used_outside_the_module_whose_hooks_read_it_is_refused(cls, names):
    """Without the check both were tracked without a word: lin.weight 0.8 (reused) and 1.0 (never
    called: sums of zero) off the per-sample truth, relative to its largest entry."""
    torch.manual_seed(0)
    model = cls().to(D)
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    tracker = FisherTracker(model)
    with tracker, pytest.raises(EWCInputError, match=names):
        F.cross_entropy(model(x), y).backward()
    assert tracker.samples_seen == 0 and not any(bool(s.any()) for s in tracker._sums.values())
    # nothing of the check outlives the refused forward: no mode on the stack, the model's hooks
    # are the tracker's own until it stops
    assert torch._C._len_torch_function_stack() == 0
    assert not model._forward_hooks and not model.lin._forward_pre_hooks
    # left out, the rest is exact
    kept = FisherTracker(model, params=["head.*"])
    _train(model, [(x[:3], y[:3]), (x[3:], y[3:])], kept)
    assert_fisher_close(kept.fisher(), estimate_fisher(model, [(x[:3], y[:3]), (x[3:], y[3:])], params=["head.*"]),
                        **TOL)


def test_reads_of_a_parameter_that_add_nothing_to_its_gradient_are_not_uses():
    torch.manual_seed(0)
    model = _OutsideWithoutGradient().to(D)
    data = [(torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))) for _ in range(2)]
    assert_fisher_close(_train(model, data, FisherTracker(model)).fisher(), estimate_fisher(model, data), **TOL)


def test_a_forward_that_raises_while_its_uses_are_watched_leaves_nothing_behind():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    tracker = FisherTracker(model)
    with tracker:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model(torch.randn(3, 5, dtype=D))
        assert torch._C._len_torch_function_stack() == 0
        assert len(model._forward_hooks) == 1 and not model[0]._forward_pre_hooks  # the tracker's own
        # the next forward is watched instead, and tracked
        F.cross_entropy(model(torch.randn(3, 4, dtype=D)), torch.randint(0, 3, (3,))).backward()
    assert tracker.samples_seen == 3


def test_a_users_hook_that_changes_a_layers_output_is_seen_after_the_trackers():
    """A forward hook of the user's that scales a layer's output (registered before the tracker):
    the tracker's hook ran after it and read the scaled output as the layer's, so the layer's
    Fisher came out at a quarter of the truth without a word. The tracker's hooks now come first;
    a hook that uses the layer's weight itself is a use outside its forward, refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(D)
    handle = model[2].register_forward_hook(lambda m, args, out: out * 2.0)
    data = [(torch.randn(5, 6, dtype=D), torch.randint(0, 4, (5,))) for _ in range(2)]
    assert_fisher_close(_train(model, data, FisherTracker(model)).fisher(), estimate_fisher(model, data), **TOL)
    handle.remove()
    model[2].register_forward_hook(lambda m, args, out: out + 0.1 * F.linear(args[0], m.weight))
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"\['2.weight'\] are used in the model's forward "
                                                                  r"outside"):
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()


def test_parameters_frozen_while_tracking_are_refused_not_diluted():
    """The first layer frozen after the tracker was made: no gradient of its parameters arrives
    any more, while the steps' samples went on being counted (its Fisher came out diluted by the
    share of steps before the freeze). Refused at the first step after it; the steps before stay
    readable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(D)
    data = [(torch.randn(5, 6, dtype=D), torch.randint(0, 4, (5,))) for _ in range(2)]
    tracker = _train(model, data[:1], FisherTracker(model))
    model[0].requires_grad_(False)
    with tracker, pytest.raises(EWCInputError, match=r"\['0.weight', '0.bias'\] no longer require grad"):
        F.cross_entropy(model(data[1][0]), data[1][1]).backward()
    model[0].requires_grad_(True)
    assert tracker.samples_seen == 5
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data[:1]), **TOL)


def test_a_sequence_first_model_input_into_an_rnn_is_refused_by_name():
    """Tokens fed sequence first ([T, N]) to an embedding and a GRU: the tracker takes dim 0 as the
    samples, and the GRU (its batch on axis 1) ran into a RuntimeError from inside torch.func in
    the backward. Its own layout says where its batch is: refused in the forward, by name."""
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(11, 8), nn.GRU(8, 8), nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(self.rnn(self.emb(tokens))[0])

    model = Tagger().to(D)
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"rnn \(GRU, batch_first=False\) is called on a "
                                                                  r"batch of 6, but the tracker took 4 samples"):
        model(torch.randint(0, 11, (4, 6)))


def test_batchnorm_in_training_mode_is_refused():
    model, data = make_cnn(dtype=D)
    model.train()
    with FisherTracker(model), pytest.raises(EWCInputError, match="BatchNorm 'bn' normalises with the batch"):
        model(data[0][0])


class TwiceAttended(nn.Module):
    """One attention applied twice in a forward: its per-sample gradients add up over the calls,
    which the tracker forms from a replay of each."""

    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(11, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_active_dropout_in_a_replayed_module_is_refused():
    """An attention called twice in one step is replayed, and a replay would draw other dropout
    masks."""
    model = TwiceAttended().to(D)
    model.attn.dropout = 0.1
    model.train()
    with FisherTracker(model), pytest.raises(EWCInputError, match="attn .*dropout"):
        model(torch.randint(1, 11, (4, 5)))


def test_a_mode_changed_between_steps_is_seen_at_the_next_forward():
    """The modules' modes are read at every tracked forward, not once: a BatchNorm put in
    training mode, or a replayed module's dropout switched on, after a tracked step is refused at
    the next forward."""
    model, data = make_cnn(dtype=D)
    model.eval()
    with FisherTracker(model) as tracker:
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()
        model.bn.train()
        with pytest.raises(EWCInputError, match="BatchNorm 'bn' normalises with the batch"):
            model(data[1][0])
    assert tracker.samples_seen == len(data[0][1])
    model = TwiceAttended().to(D)
    model.attn.dropout = 0.1
    model.eval()
    ids, y = torch.randint(1, 11, (4, 5)), torch.randint(0, 3, (4,))
    with FisherTracker(model) as tracker:
        F.cross_entropy(model(ids), y).backward()
        model.train()
        with pytest.raises(EWCInputError, match="attn .*dropout"):
            model(ids)
    assert tracker.samples_seen == 4


def test_hf_labels_without_backward_through_own_loss_is_refused():
    pytest.importorskip("transformers")
    model, data = _hf("gpt2")
    with FisherTracker(model), pytest.raises(EWCInputError, match="does not go through its own loss"):
        out = model(**data[0])
        out.logits.square().mean().backward()


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_a_model_returning_a_tuple_is_read_as_its_output_object(case):
    """``return_dict=False``: the loss comes first in the tuple, the logits second; before, the
    tracker found no ``output.loss`` and refused with a message about a backward that did not go
    through it."""
    pytest.importorskip("transformers")
    model, data = _hf(case, fp64_loss=case == "gpt2")
    tracker = FisherTracker(model)
    with tracker:
        for b in data:
            model.zero_grad()
            model(**b, return_dict=False)[0].backward()
    truth = _causal_truth(model, data) if case == "gpt2" else estimate_fisher(model, data, kind="empirical")
    assert tracker.samples_seen == sum(len(b["labels"]) for b in data)
    assert_fisher_close(tracker.fisher(), truth, **TOL)


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_a_loss_added_on_the_outputs_besides_the_models_own_is_refused(case):
    """Distillation on the logits beside ``output.loss``: the logits' gradient has a part no
    sample share of ``output.loss`` accounts for, and the tracked Fisher would mix it in; refused
    in the backward of the first steps. A scaled own loss plus a penalty on the parameters
    (an EWC term) is what the tracker handles, and passes."""
    pytest.importorskip("transformers")
    model, data = _hf(case)
    b = data[0]
    with FisherTracker(model) as tracker:
        out = model(**b)
        (3.0 * out.loss + sum(p.square().sum() for p in model.parameters())).backward()
        assert tracker.samples_seen == len(b["labels"])
        model.zero_grad()
        out = model(**b)
        with pytest.raises(EWCInputError, match="reaches .* logits through more than its output.loss"):
            teacher = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(0), dtype=D).mul(5).softmax(-1)
            kd = F.kl_div(out.logits.log_softmax(-1), teacher, reduction="batchmean")
            (out.loss + 0.01 * kd).backward()


@pytest.mark.parametrize("extra", ["shift_labels", "ignore_index"])
def test_hf_keywords_that_change_which_labels_the_loss_counts_are_refused(extra):
    """``shift_labels`` (context-parallel training) or ``ignore_index`` go to the model's own loss,
    which then counts other tokens than ``labels`` says: each sample's share is unknown, and a
    first step where they agree would prove nothing for the later ones."""
    pytest.importorskip("transformers")
    model, data = _hf("gpt2")
    b = data[0]
    value = F.pad(b["labels"], (0, 1), value=-100)[:, 1:] if extra == "shift_labels" else -1
    with FisherTracker(model), pytest.raises(EWCInputError, match=rf"called with \['{extra}'\] besides labels="):
        model(**b, **{extra: value})


def test_two_forwards_into_one_backward_are_refused():
    model, data = make_mlp(dtype=D)
    (x, y), (x2, y2) = data[:2]
    with FisherTracker(model), pytest.raises(EWCInputError, match="not the latest one"):
        (F.cross_entropy(model(x), y) + F.cross_entropy(model(x2), y2)).backward()


class SeqFirst(nn.Module):
    """PyTorch's own layers in their default layout: an encoder layer fed ``[T, N, d]``, its
    Linear layers and norms (rule sites) and attention all sequence first."""

    def __init__(self, d=8, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(13, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=dropout)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x).transpose(0, 1)).mean(0))


class SeqFirstOfTwoOrMore(SeqFirst):
    """A model that refuses to run fewer than two samples: the tracker's one-sample probe of the
    layers' axes cannot run, so their layouts are read from the steps' shapes alone."""

    def forward(self, x):
        if x.shape[0] < 2:
            raise ValueError("at least two samples")
        return super().forward(x)


def _seq_batches(lengths, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 13, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)) for T in lengths]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_sequence_first_layers_are_tracked_with_their_samples_on_axis_1(fraction):
    # The second batch has as many positions as samples (T = N = 4): the axis seen before serves.
    torch.manual_seed(0)
    model = SeqFirst().to(D)
    data = _seq_batches([5, 4, 3])
    tracker = _train(model, data, FisherTracker(model, fraction=fraction, seed=1))
    assert tracker.rules["enc.linear1.weight"] == "linear" and tracker.rules["enc.norm1.weight"] == "layernorm"
    if fraction == 1.0:
        want = data
    else:
        g = torch.Generator().manual_seed(1)
        want = [(x[i], y[i]) for x, y in data for i in [torch.randperm(4, generator=g)[:2].sort().values]]
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, want), **TOL)


def test_a_sequence_first_layer_with_as_many_positions_as_samples_at_every_step_is_exact():
    # T = N at every step: no step's shapes tell [T, N, d] from [N, T, d]; the model run on one
    # sample at the first step does.
    torch.manual_seed(0)
    model = SeqFirst().to(D)
    data = _seq_batches([4, 4, 4])
    tracker = _train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data), **TOL)


def test_the_probe_of_the_axes_leaves_the_training_step_unchanged():
    # It runs in the middle of the first tracked step with T = N, with dropout active: the rest of
    # the step draws the masks it draws untracked, so its gradients are the same bit for bit.
    torch.manual_seed(0)
    model = SeqFirst(dropout=0.3).to(D).train()
    x, y = _seq_batches([4])[0]
    grads = []
    for tracked in (False, True):
        model.zero_grad()
        torch.manual_seed(7)
        with FisherTracker(model) if tracked else contextlib.nullcontext():
            F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


class Calls:
    """An object handed to the forward, which the forward changes (as a key-value cache is)."""

    def __init__(self):
        self.sizes = []


class SeqFirstWithState(SeqFirst):
    def forward(self, x, calls):
        calls.sizes.append(x.shape[0])
        return super().forward(x)


def test_the_probe_leaves_an_object_the_forward_changes_alone():
    # T = N, so the probe would run; the forward is given an object it changes, so the probe does
    # not run (its call would change that object too) and the step calls the model once.
    torch.manual_seed(0)
    model, calls = SeqFirstWithState().to(D), Calls()
    x, y = _seq_batches([4])[0]
    with FisherTracker(model):
        F.cross_entropy(model(x, calls), y).backward()
    assert calls.sizes == [4]


def test_without_the_probe_a_layer_first_seen_with_as_many_positions_as_samples_is_not_summed_silently():
    # The probe cannot run (the model needs two samples): T = N on the first step is taken samples
    # first (the common layout), which the next step (T != N) shows was wrong: an error naming the
    # remedy, not a wrong Fisher; after reset() the sums are exact.
    torch.manual_seed(0)
    model = SeqFirstOfTwoOrMore().to(D)
    tracker = FisherTracker(model)
    with pytest.raises(EWCInputError, match=r"enc\.\w+ \(\w+\) takes its samples on axis 1 \(shape \(5, 4, 8\) now\), "
                                            r"but earlier steps called it with as many positions as samples .*reset\(\)"):
        _train(model, _seq_batches([4, 5]), tracker)
    tracker.reset()
    data = _seq_batches([5, 4], seed=2)
    _train(model, data, tracker)
    twin = SeqFirst().to(D)  # the same weights, for the engine's probe and loop on one sample
    twin.load_state_dict(model.state_dict())
    assert_fisher_close(tracker.fisher(), estimate_fisher(twin, data), **TOL)


def test_without_the_probe_a_first_axis_that_is_a_multiple_of_the_batch_is_refused():
    # [8, 4, d] is a sequence-first layer's [T, N, d], or a batch of 4 folded into rows of 2 with 4
    # positions ([N*2, 4, d], Swin's windows at a batch of 4): only the probe, which this model
    # cannot run, could tell. Refused by name, never summed on a guessed axis.
    model = SeqFirstOfTwoOrMore().to(D)
    with pytest.raises(EWCInputError, match=r"enc\.\w+ \(\w+\) is called on a tensor of shape \(8, 4, 8\) whose "
                                            r"first axis is not the batch of 4 samples, and the model run on its "
                                            r"first sample alone does not show where the samples are"):
        _train(model, _seq_batches([8]), FisherTracker(model))


def test_a_convolution_fed_its_samples_on_another_axis_is_refused():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 2, 1)

        def forward(self, x):  # [N, 5, L] handed as [5, N, L]: not a layout a convolution takes
            return self.conv(x.transpose(0, 1)).sum()

    model = Inner().to(D)
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"conv \(Conv1d\) is called on a tensor of shape "
                                                                  r"\(5, 3, 4\) whose first axis is not the batch of 3 "
                                                                  r"samples; its rule needs the samples on dim 0"):
        model(torch.randn(3, 5, 4, dtype=D))


@pytest.mark.parametrize("kwargs, match", [
    ({"reduction": "token"}, "reduction must be one of"),
    ({"accumulation_steps": 0}, "accumulation_steps must be a positive int"),
    ({"fraction": 0.0}, r"fraction must be a number in \(0, 1\]"),
    ({"decay": 1.0}, r"decay must be None .* or a number in \[0, 1\)"),
    ({"one_in": 0}, "one_in must be a positive int"),
    ({"one_in": 2.5}, "one_in must be a positive int"),
    ({"one_in": True}, "one_in must be a positive int"),
    ({"scaler": object()}, "scaler must be a torch.amp.GradScaler"),
    ({"params": ["nope.*"]}, "params: nothing in the model matches"),
])
def test_bad_arguments(kwargs, match):
    model, _ = make_mlp(dtype=D)
    with pytest.raises(EWCInputError, match=match):
        FisherTracker(model, **kwargs)


def test_misuse_of_the_lifecycle():
    model, data = make_mlp(dtype=D)
    tracker = FisherTracker(model).start()
    with pytest.raises(EWCInputError, match="already started"):
        tracker.start()
    tracker.stop()
    with pytest.raises(EWCInputError, match="no training step"):
        tracker.fisher()
    with pytest.raises(EWCInputError, match="saved with decay=None"):
        FisherTracker(model, decay=0.5).load_state_dict(tracker.state_dict())
    other = FisherTracker(model, params=["0.*"])
    with pytest.raises(EWCInputError, match="parameters differ"):
        other.load_state_dict(tracker.state_dict())
    assert math.isfinite(float(sum(t.sum() for t in _train(model, data, tracker).fisher().values())))


def test_a_module_that_writes_into_its_input_is_refused_by_name():
    """A module-local module that doubles its input in place: the recorded input is no longer what
    it computed from, so a replay would use the wrong one (it raised from inside torch.func). The
    one-sample check (run on copies, so it cannot touch the step's tensors) finds no split that
    reproduces the call, and the tracker refuses the module by name."""
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(5) + 0.5)

        def forward(self, h):
            return h.mul_(2.0) * self.scale

    model = nn.Sequential(nn.Linear(3, 5), Doubling(), nn.Tanh(), nn.Linear(5, 2)).to(D)
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"1 \(Doubling\) has no hand rule"):
        model(torch.randn(4, 3, dtype=D))


class _Tagger(nn.Module):
    """Per-position logits ``[N, T, 3]``: a token tagger."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.emb(x))))


def _tagged(padded: bool):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 9, (6, 5), generator=g), torch.randint(0, 3, (6, 5), generator=g)
    if padded:  # right padding the loss ignores: lengths 5, 4, 3, 5, 4, 3
        y[torch.arange(5)[None] >= (5 - torch.arange(6) % 3)[:, None]] = -100
    return [(x[i:i + 3], y[i:i + 3]) for i in (0, 3)]


def _tag_loss(out, y, per_sample: bool):
    if per_sample:  # each sample's mean over its own tokens, then the mean over samples
        return (F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1) / (y != -100).sum(1)).mean()
    return F.cross_entropy(out.flatten(0, 1), y.flatten())  # the mean over the batch's tokens


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
def test_a_declared_loss_over_sequences_of_unequal_lengths_is_warned_about(padded, per_sample, recwarn):
    """A loss averaged over the batch's tokens weighs each sample by its number of tokens, which
    no declared reduction describes: where the samples' lengths differ (padding the loss ignores)
    the tracked Fisher is off, and a warning says so and how to average per sample instead. Equal
    lengths make the two losses one; averaged per sample first, the Fisher is exact."""
    torch.manual_seed(0)
    model = _Tagger().to(D)
    data = _tagged(padded)
    tracker = FisherTracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with tracker:
        for x, y in data:
            opt.zero_grad()
            _tag_loss(model(x), y, per_sample).backward()
            opt.step()
    said = [w for w in recwarn.list if "FisherTracker: the model's output has positions" in str(w.message)]
    assert len(said) == (1 if padded else 0)
    if padded:
        assert "average per sample first" in str(said[0].message)
    want = estimate_fisher(model, data, kind="empirical")
    if per_sample or not padded:
        assert_fisher_close(tracker.fisher(), want, **TOL)
    else:  # what the warning is about: the token mean's Fisher is another one
        got = tracker.fisher()
        assert max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want) > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_declared_loss_that_leaves_samples_out_is_warned_about(reduction, recwarn):
    """A loss over a masked subset of the batch's outputs: the tracked Fisher was 0.5 off (mean)
    without a word. Now the output gradient of the first steps shows samples without any gradient,
    and a warning says to filter the batch before the forward; filtered, the Fisher is exact and
    nothing is said."""
    torch.manual_seed(0)
    model, _ = make_mlp(dtype=D)
    x, y = torch.randn(6, 13, dtype=D), torch.randint(0, 5, (6,))
    keep = torch.tensor([True, True, False, True, False, True])

    def run(masked: bool):
        tracker = FisherTracker(model, reduction=reduction)
        with tracker:
            for s in (slice(0, 3), slice(3, 6)):
                model.zero_grad()
                if masked:
                    loss = F.cross_entropy(model(x[s])[keep[s]], y[s][keep[s]], reduction=reduction)
                else:
                    loss = F.cross_entropy(model(x[s][keep[s]]), y[s][keep[s]], reduction=reduction)
                loss.backward()
        return tracker.fisher()

    want = estimate_fisher(model, [(x[keep], y[keep])])
    got = run(masked=True)
    said = [w for w in recwarn.list if "samples get no gradient at the model's output" in str(w.message)]
    assert len(said) == 1 and "1 of 3 samples" in str(said[0].message) and "model(x[keep])" in str(said[0].message)
    assert max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want) > 0.1
    recwarn.clear()
    assert_fisher_close(run(masked=False), want, **TOL)
    assert not [w for w in recwarn.list if "FisherTracker" in str(w.message)]


class _WithBalance(nn.Module):
    """Logits and a scalar computed over the whole batch, as a mixture of experts' load-balancing
    ``aux_loss`` is (here: the squared batch mean of the hidden units)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return {"logits": self.head(h), "aux_loss": h.mean(0).square().sum()}


def test_a_loss_with_a_term_over_the_whole_batch_is_refused():
    """A term computed over the batch (Mixtral's aux_loss added to the loss) has no per-sample
    gradient: the tracked Fisher was 30-45% off on Mixtral without a word. A gradient reaching an
    output without a batch axis is now refused by name; without the term the Fisher is exact."""
    torch.manual_seed(0)
    model = _WithBalance().to(D)
    data = [(torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))) for _ in range(2)]
    tracker = FisherTracker(model)
    with tracker, pytest.raises(EWCInputError, match=r"the loss uses output\.aux_loss, an output of the model "
                                                     r"without a batch axis"):
        out = model(data[0][0])
        (F.cross_entropy(out["logits"], data[0][1]) + 0.1 * out["aux_loss"]).backward()
    assert tracker.samples_seen == 0
    with tracker:
        for x, y in data:
            model.zero_grad()
            F.cross_entropy(model(x)["logits"], y).backward()
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data, loss_fn=lambda o, y: F.cross_entropy(o["logits"], y)),
                        **TOL)


class _Folded(_Tagger):
    """OPT's pattern: the layers take the batch's positions as rows, ``[N*T, d]``, sample by sample
    (``order="samples"``); or, a fold the tracker must not take for one, position by position
    (``"positions"``, ``[T*N, d]``)."""

    def __init__(self, order="samples"):
        super().__init__()
        self.order = order

    def forward(self, x):
        h = self.emb(x)
        if self.order == "samples":
            return self.head(torch.tanh(self.lin(h.flatten(0, 1))).view(*h.shape).mean(1))
        rows = torch.tanh(self.lin(h.transpose(0, 1).flatten(0, 1)))
        return self.head(rows.view(h.shape[1], h.shape[0], -1).transpose(0, 1).mean(1))


class _Windows(nn.Module):
    """Swin's pattern: each sample's tokens cut into windows that are batched as rows,
    ``[N*windows, tokens, d]``, sample by sample. With as many tokens per window as samples the
    shapes also read as a sequence-first layer's ``[T, N, d]``: the tracker took them so and
    summed the windows' positions as samples (80% off on Swin at a batch of 4 with 2x2 windows,
    no error)."""

    def __init__(self, tokens=4, d=5):
        super().__init__()
        self.tokens = tokens
        self.lin, self.norm, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):  # x [N, windows * tokens, d]
        w = x.reshape(-1, self.tokens, x.shape[-1])          # [N*windows, tokens, d]
        h = torch.tanh(self.norm(self.lin(w))).reshape(x.shape)
        return self.head(h.mean(1))


def _reference(model, data):
    from fastewc import reference

    return reference.estimate_fisher(model, data)


def test_a_batch_folded_into_rows_sample_by_sample_is_exact():
    """The first folded call runs the model on the batch's first sample alone, whose rows are
    the step's first rows: the rows go to the rule as ``[N, T, d]``. Batches of 3 and 2 samples,
    the rows per sample changing with the length."""
    torch.manual_seed(0)
    model = _Folded().to(D)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 9, (3, 5), generator=g), torch.tensor([0, 1, 2])),
            (torch.randint(0, 9, (2, 4), generator=g), torch.tensor([2, 0]))]
    tracker = _train(model, data, FisherTracker(model))
    assert tracker.samples_seen == 5
    assert_fisher_close(tracker.fisher(), _reference(model, data), **TOL)


def test_a_layer_on_samples_flattened_into_rows_is_exact():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x.reshape(-1, 4)).reshape(x.shape[0], -1)

    torch.manual_seed(0)
    model = Flat().to(D)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(3, 2, 4, generator=g, dtype=D), torch.randint(0, 6, (3,), generator=g)) for _ in range(2)]
    tracker = _train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), _reference(model, data), **TOL)


@pytest.mark.parametrize("n", [4, 3])
def test_windows_as_many_tokens_as_samples_are_not_taken_for_a_sequence_first_layer(n):
    """Windows of 4 tokens: at a batch of 4 the shapes ``[N*2, 4, d]`` fit a sequence-first layer
    too; the probe's one sample shows ``[2, 4, d]``, windows of one sample, not ``[.., 1, d]``."""
    torch.manual_seed(0)
    model = _Windows().to(D)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 8, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)) for _ in range(2)]
    tracker = _train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), _reference(model, data), **TOL)


def test_a_batch_folded_position_by_position_is_refused():
    """``[T*N, d]``: its first rows are every sample's first position, not the first sample's rows."""
    model = _Folded(order="positions").to(D)
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"lin \(Linear\) is called on a tensor of shape "
                                                                  r"\(15, 6\) whose first axis is not the batch of 3 "
                                                                  r"samples, and the model run on its first sample "
                                                                  r"alone does not show where the samples are there .* "
                                                                  r"The first axis is 5 rows per sample: a batch folded "
                                                                  r"into rows is tracked where .*; estimate_fisher "
                                                                  r"covers it after training, or leave lin's parameters "
                                                                  r"out with params="):
        F.cross_entropy(model(torch.randint(0, 9, (3, 5))), torch.tensor([0, 1, 2])).backward()


class _Positions(nn.Module):
    """Token embeddings plus a position table looked up on ``arange(T)`` without a batch axis,
    by an ``nn.Embedding`` (a rule site) or by a module of its own (module-local)."""

    class Table(nn.Module):
        def __init__(self, T, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(T, d))

        def forward(self, positions):
            return self.weight[positions] * 1.5

    def __init__(self, own_module: bool, T=4, d=6):
        super().__init__()
        self.emb = nn.Embedding(9, d)
        self.pos = self.Table(T, d) if own_module else nn.Embedding(T, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x) + self.pos(torch.arange(x.shape[1]))).mean(1))


@pytest.mark.parametrize("T", [4, 5])
@pytest.mark.parametrize("own_module", [False, True])
def test_a_position_table_is_tracked_where_it_meets_the_batch(own_module, T):
    """``pos(arange(T))`` added to a batch: the table's gradient in the backward is summed over
    the samples; each sample's share is read where its output meets the batch (the addition).
    At T = N its input and output also have the batch's size on dim 0, and were summed as N
    samples' rows (T5's relative position bias at T = N: 70-75% off, no error)."""
    torch.manual_seed(0)
    model = _Positions(own_module, T=T).to(D)
    g = torch.Generator().manual_seed(6)
    data = [(torch.randint(0, 9, (4, T), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    for kwargs in ({}, {"fraction": 0.5}):
        tracker = _train(model, data, FisherTracker(model, seed=2, **kwargs))
        want = data
        if kwargs:
            gen = torch.Generator().manual_seed(2)
            want = [(x[i], y[i]) for x, y in data for i in [torch.randperm(4, generator=gen)[:2].sort().values]]
        assert_fisher_close(tracker.fisher(), _reference(model, want), **TOL)


class _TableThrough(nn.Module):
    """A table fed through layers before it meets the batch (SwinV2's position-bias MLP), and,
    with ``how``, meeting it otherwise: in a product (``matmul``), twice, or not at all."""

    def __init__(self, how="add", d=6):
        super().__init__()
        self.how = how
        self.emb, self.pos, self.mix, self.head = nn.Embedding(9, d), nn.Embedding(5, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        t = self.mix(torch.tanh(self.pos(torch.arange(x.shape[1]))))   # [T, d], no batch
        if self.how == "matmul":
            h = h + h @ t.T @ t
        elif self.how == "twice":
            h = (h + t) * 0.5 + t.unsqueeze(0).expand(x.shape[0], -1, -1)
        elif self.how == "add":
            h = h + t
        return self.head(torch.tanh(h).mean(1))


def test_a_table_fed_through_layers_is_tracked_with_them():
    torch.manual_seed(0)
    model = _TableThrough().to(D)
    g = torch.Generator().manual_seed(7)
    data = [(torch.randint(0, 9, (3, 5), generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    tracker = _train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), _reference(model, data), **TOL)


@pytest.mark.parametrize("how, match", [
    ("matmul", r"pos \(Embedding\) is a table the model calls without the batch, and its output meets the batch in "
               r"matmul, where the tracker cannot take each sample's share"),
    ("twice", r"pos \(Embedding\) is a table .* meets the batch in two places of one forward"),
    ("none", r"pos \(Embedding\) is a table .* does not meet the batch in the forward where the tracker can follow it"),
])
def test_a_table_meeting_the_batch_otherwise_is_refused(how, match):
    model = _TableThrough(how).to(D)
    tracker = FisherTracker(model)
    with pytest.raises(EWCInputError, match=match + r".*params="):
        _train(model, [(torch.randint(0, 9, (3, 5)), torch.tensor([0, 1, 2]))], tracker)
    assert tracker.samples_seen == 0 and tracker.steps == 0  # refused in the forward: nothing was summed


class _InPlaceAfter(nn.Module):
    """Outputs modified in place after their layer: a query scaled (Longformer's ``query /=
    sqrt(d)``) and a residual added to a projection (``out += h``), on ``[N, T, d]``."""

    def __init__(self, d=6, bias=True):
        super().__init__()
        self.emb = nn.Embedding(9, d)
        self.q, self.proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.emb(x)
        q = self.q(h)
        q /= 2.0
        out = self.proj(torch.tanh(q))
        out += h
        return self.head(out.mean(1))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_outputs_modified_in_place_afterwards_are_summed(bias):
    """A Linear's output on three axes is a view of its two-axis product; modified in place, its
    gradient went around the view's node where the tracker's hook sat: q's and proj's sums stayed
    0 without an error (Longformer's queries, 100% off). The hook sits on the product now."""
    torch.manual_seed(0)
    model = _InPlaceAfter(bias=bias).to(D)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randint(0, 9, (3, 5), generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    tracker = _train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), _reference(model, data), **TOL)


class _OwnProduct(nn.Module):
    """No hand rule: a product with its own weight, returned as a view of it (and, with
    ``pair``, beside a second output)."""

    def __init__(self, d, pair=False):
        super().__init__()
        self.pair = pair
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, h):
        out = (h.reshape(-1, h.shape[-1]) @ self.w).view(h.shape)
        return (out, torch.tanh(out)) if self.pair else out


class _ModifiesLocal(nn.Module):
    def __init__(self, pair, d=6):
        super().__init__()
        self.emb, self.own, self.head = nn.Embedding(9, d), _OwnProduct(d, pair), nn.Linear(d, 3)

    def forward(self, x):
        got = self.own(self.emb(x))
        o = got[0] if isinstance(got, tuple) else got
        o *= 2.0
        return self.head(torch.tanh(o).mean(1) + (got[1].mean(1) if isinstance(got, tuple) else 0))


def test_a_module_local_output_modified_in_place_afterwards_is_summed_or_refused():
    """A module without a hand rule returning a view that the model scales in place: its sums
    stayed 0 without an error; hooked on the product now, exact. With two outputs the model gets
    aliases, whose in-place change is refused by name at the end of the backward."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randint(0, 9, (3, 5), generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(2)]
    model = _ModifiesLocal(pair=False).to(D)
    tracker = _train(model, data, FisherTracker(model))
    assert_fisher_close(tracker.fisher(), _reference(model, data), **TOL)
    model = _ModifiesLocal(pair=True).to(D)
    tracker = FisherTracker(model)
    with pytest.raises(EWCInputError, match=r"an output of own \(_OwnProduct\) is modified in place after the module "
                                            r"returns it, which hides its gradient .* params="):
        _train(model, data, tracker)
    assert tracker.samples_seen == 0


def test_a_convolution_on_a_batch_folded_into_rows_is_refused_saying_what_covers_it():
    """A video model's frames as rows ``[N*frames, C, H, W]``: a convolution's rule takes no axes
    between the samples and the channels."""

    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(3, 2)

        def forward(self, x):  # [N, frames, C, H, W]
            h = self.conv(x.flatten(0, 1)).mean((2, 3))
            return self.head(h.view(x.shape[0], x.shape[1], -1).mean(1))

    model = Frames().to(D)
    with FisherTracker(model), pytest.raises(EWCInputError, match=r"conv \(Conv2d\) is called on a tensor of shape "
                                                                  r"\(6, 2, 5, 5\) whose first axis is not the batch "
                                                                  r"of 3 samples; its rule needs the samples on dim 0\. "
                                                                  r"The first axis is 2 rows per sample: a layer without "
                                                                  r"sequence axes on a batch folded into rows is not "
                                                                  r"tracked; estimate_fisher covers it after training"):
        F.cross_entropy(model(torch.randn(3, 2, 2, 5, 5, dtype=D)), torch.tensor([0, 1, 0])).backward()


def test_a_model_that_holds_its_parameters_itself_is_tracked():
    """A model with no submodules whose forward uses its own parameters: its module-local replay
    at the end of the backward calls the model itself, which the tracker's hook on the model must
    not take for a forward inside a backward (gradient checkpointing), as it did."""
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=D))
            self.b = nn.Parameter(torch.randn(3, dtype=D))

        def forward(self, x):
            return torch.tanh(x @ self.w) + self.b

    torch.manual_seed(0)
    model = Bare()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 4, generator=g, dtype=D), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]
    tracker = FisherTracker(model)
    with tracker:
        for x, y in data:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
    assert_fisher_close(tracker.fisher(), estimate_fisher(model, data, kind="empirical"), **TOL)
