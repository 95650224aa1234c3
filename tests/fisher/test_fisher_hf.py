"""Hugging Face models built from config, default attention, padded dict batches: every
parameter covered in the one batched pass (no vmap, no loop), the value equal to the per-sample
loop over ``model(**one_sample).loss``; all three kinds."""

import pytest
import torch

import fastewc
from fastewc import reference as R

from models import assert_fisher_close, hf_batches, hf_model

pytest.importorskip("transformers")

D = torch.float64
# A Hugging Face head computes its loss from logits.float(): float64 models agree with the
# per-sample loop to float32 rounding for the empirical kind; the other kinds use fastewc's
# own cross-entropy in the model's dtype.
RTOL = {"empirical": 1e-5, "sampled": 1e-9, "exact": 1e-9}
CASES = {
    "bert": ("cls", {}),
    "bert_multi": ("multi", {"problem_type": "multi_label_classification"}),
    "bert_reg": ("reg", {"num_labels": 1}),
    "bert_tok": ("tok", {}),
    "bert_mlm": ("lm", {}),
    "gpt2": ("lm", {}),
    "llama": ("lm", {}),
    "gemma": ("lm", {}),
}


def _model(case):
    labels, overrides = CASES[case]
    name = case if case in ("bert_tok", "bert_mlm", "gpt2", "llama", "gemma") else "bert"
    return hf_model(name, **overrides), hf_batches(7, 8, 40, labels, batch_size=4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_empirical_covers_every_parameter_by_rules(case):
    model, data = _model(case)
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert not info.vmap_params and not info.loop_params, info
    assert set(info.rule_params) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=RTOL["empirical"], atol_rel=1e-7)


@pytest.mark.parametrize("case", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("kind", ["sampled", "exact"])
def test_sampled_and_exact_by_rules(case, kind):
    model, data = _model(case)
    kw = {"top_k": 3} if kind == "exact" and case != "bert" else {}
    gen = (lambda: torch.Generator().manual_seed(5)) if kind == "sampled" else (lambda: None)
    got, info = fastewc.estimate_fisher(model, data, kind=kind, generator=gen(), return_info=True, **kw)
    assert not info.vmap_params and not info.loop_params, info
    # Llama normalises in float32 inside a float64 model: its per-sample gradients carry
    # float32 rounding whatever the method.
    rtol = 1e-6 if case == "llama" else RTOL[kind]
    assert_fisher_close(got, R.estimate_fisher(model, data, kind=kind, generator=gen(), **kw), rtol=rtol,
                        atol_rel=1e-8)


def test_gpt2_tied_embedding_and_head_sum_per_sample():
    model, data = _model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    got, info = fastewc.estimate_fisher(model, data, kind="sampled", generator=torch.Generator().manual_seed(1),
                                        return_info=True)
    assert info.methods["transformer.wte.weight"] == "embedding+linear"
    assert info.methods["transformer.h.0.attn.c_attn.weight"] == "hf_conv1d"
    ref = R.estimate_fisher(model, data, kind="sampled", generator=torch.Generator().manual_seed(1))
    assert_fisher_close(got, ref, rtol=1e-10)


def test_gemma_scaled_tied_embedding_by_the_embedding_rule():
    """Gemma multiplies its looked-up rows by a scale in its embedding's own forward, and ties the
    embedding to the LM head: the embedding rule (through one replay of that forward) adds into
    the head's per-sample blocks."""
    model, data = _model("gemma")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    got, info = fastewc.estimate_fisher(model, data, kind="exact", top_k=3, return_info=True)
    assert info.methods["model.embed_tokens.weight"] == "embedding (own forward)+linear", info
    assert not info.vmap_params and not info.loop_params, info
    # Gemma normalises in float32 inside a float64 model (as Llama does)
    assert_fisher_close(got, R.estimate_fisher(model, data, kind="exact", top_k=3), rtol=1e-6, atol_rel=1e-8)


def test_llama_rmsnorm_by_the_rmsnorm_style_rule():
    model, data = _model("llama")
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    assert info.methods["model.norm.weight"] == "rmsnorm_style"
    assert info.methods["model.layers.0.self_attn.k_proj.weight"] == "linear"


def test_exact_on_a_classifier_with_attention_mask():
    # [N, C] logits with an [N, T] attention mask: the mask concerns the tokens, not the logits.
    model, data = _model("bert")
    got = fastewc.estimate_fisher(model, data, kind="exact", method="loop")
    assert_fisher_close(got, R.estimate_fisher(model, data, kind="exact"), rtol=1e-9, atol_rel=1e-9)
    rules = fastewc.estimate_fisher(model, data, kind="exact", method="rules")
    assert_fisher_close(rules, got, rtol=1e-9, atol_rel=1e-9)


def test_batch_size_invariant_and_frozen_embeddings():
    model, data = _model("bert")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    one = fastewc.estimate_fisher(model, data)
    regrouped = hf_batches(7, 8, 40, "cls", batch_size=3)
    assert "bert.embeddings.word_embeddings.weight" not in one
    assert_fisher_close(fastewc.estimate_fisher(model, regrouped), one, rtol=1e-5, atol_rel=1e-7)


def test_unknown_head_without_loss_fn_goes_per_sample_with_the_reason():
    import transformers as T

    model = T.BertForQuestionAnswering(T.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=24,
                                                    max_position_embeddings=16)).to(D).eval()
    data = hf_batches(4, 8, 40, None, batch_size=4)
    data[0]["start_positions"] = torch.tensor([1, 2, 3, 0])
    data[0]["end_positions"] = torch.tensor([2, 3, 5, 1])
    got, info = fastewc.estimate_fisher(model, data, kind="empirical", loss_fn=lambda out, _: out.start_logits.sum(),
                                        return_info=True)
    assert not info.vmap_params and not info.loop_params  # a loss_fn makes the rules usable
    with pytest.warns(UserWarning, match="falling back to method='loop'"):
        _, info = fastewc.estimate_fisher(model, [dict(data[0], labels=torch.zeros(4, dtype=torch.long))],
                                          return_info=True)
    assert "own loss has no per-sample form" in next(iter(info.reasons.values()))


def test_second_call_reuses_the_proven_plan():
    model, data = _model("gpt2")
    fastewc.fisher.clear_plan_cache()
    _, first = fastewc.estimate_fisher(model, data, return_info=True)
    _, second = fastewc.estimate_fisher(model, data, return_info=True)
    assert not first.plan_cached and first.probe_seconds > 0
    assert second.plan_cached and second.probe_seconds == 0 and "plan cached" in second.summary()
    with torch.no_grad():  # training changes values, not the structure: still cached
        model.lm_head.weight.mul_(1.01)
    assert fastewc.estimate_fisher(model, data, return_info=True)[1].plan_cached
    model.transformer.h[0].mlp.c_fc = type(model.transformer.h[0].mlp.c_fc)(64, 16).to(D)  # new module
    assert not fastewc.estimate_fisher(model, data, return_info=True)[1].plan_cached


def test_decoder_inputs_of_a_model_that_shifts_its_labels_in_its_forward():
    """Whisper makes its decoder's inputs from ``labels`` inside its forward and has no
    ``prepare_decoder_input_ids_from_labels``: the batched passes (called without labels) had no
    decoder inputs, and every kind raised the model's own ValueError. The inputs are read from the
    model's forward, stopped at its decoder's call: the labels shifted right, the random state and
    the model's hooks as they were."""
    import zoo
    from fastewc.fisher.batches import Batch
    from fastewc.fisher.problem import with_decoder_inputs

    model, data = zoo.whisper(padded=True)
    b = data[0]
    state = torch.random.get_rng_state()
    got = with_decoder_inputs(model, Batch(b, None, 3, 0)).inputs["decoder_input_ids"]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not any(m._forward_pre_hooks for m in model.modules())
    labels = b["labels"]
    want = torch.cat([torch.full((3, 1), model.config.decoder_start_token_id), labels[:, :-1]], 1)
    assert torch.equal(got, want.masked_fill(want == -100, model.config.pad_token_id))
    # the Fisher of every kind against the reference loop: tests/fisher/test_zoo.py (case "whisper")


def test_a_module_without_the_batch_axis_only_after_the_probe_goes_per_sample():
    """Longformer feeds its attention projections ``[T, N, d]``: with T = 8 and the probe's two
    samples the rows read as a batch folded by 4, with a later batch of three as a module without
    the batch. That later reading was taken unproven (its outputs followed as a position table),
    and the replay failed with a raw ``SiteFailed``; the module now goes per sample there."""
    import transformers as T

    cfg = T.LongformerConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=24, max_position_embeddings=32, attention_window=4,
                             pad_token_id=1, num_labels=3)
    torch.manual_seed(0)
    model = T.LongformerForSequenceClassification(cfg).to(D).eval()
    data = hf_batches(4, 7, 40, "cls", batch_size=3)
    got, info = fastewc.estimate_fisher(model, data, kind="empirical", return_info=True)
    assert_fisher_close(got, R.estimate_fisher(model, data, kind="empirical"), rtol=1e-10)
    assert info.rule_params  # the other layers keep their rules


def _wavlm(scale: float):
    """A tiny WavLM classifier, its attention weights times ``scale``, and four clips."""
    import transformers as T

    cfg = T.WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                        num_conv_pos_embedding_groups=2, num_labels=3, num_buckets=8, max_bucket_distance=16)
    torch.manual_seed(0)
    model = T.WavLMForSequenceClassification(cfg).to(D).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attention." in name and p.dim() == 2:
                p.mul_(scale)
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(4, 400, generator=g, dtype=D), torch.randint(0, 3, (4,), generator=g)


def test_a_first_batch_of_one_sample_proves_no_plan_for_larger_batches():
    """WavLM's attention takes ``[T, N, d]``; a plan proven on a first batch of one sample (where
    no size tells the batch axis from another) failed on the next batch of three with a raw
    ``SiteFailed``. The first batch of more than one sample proves the plan again. Attention
    weights of a trained model's size."""
    model, x, y = _wavlm(8.0)
    data = [{"input_values": x[:1], "labels": y[:1]}, {"input_values": x[1:], "labels": y[1:]}]
    fastewc.fisher.clear_plan_cache()
    got, info = fastewc.estimate_fisher(model, data, kind="empirical", return_info=True)
    assert_fisher_close(got, R.estimate_fisher(model, data, kind="empirical"))
    assert info.rule_params and not info.plan_cached


def test_wavlm_query_and_key_at_initialisation():
    """WavLM's attention passes its projections' weights, and their biases joined, to
    ``F.multi_head_attention_forward`` on a sequence-first input: the op recorder took that
    operation's result for one without a batch axis, and the query and key weights got a Fisher of
    0 where the truth is ~1e-11 of the largest entry, below the probe's floor. Every tensor now
    matches the loop, on the absolute scale of each tensor's own largest entry."""
    model, x, y = _wavlm(1.0)
    data = [{"input_values": x[:2], "labels": y[:2]}, {"input_values": x[2:], "labels": y[2:]}]
    fastewc.fisher.clear_plan_cache()
    got = fastewc.estimate_fisher(model, data, kind="empirical")
    ref = R.estimate_fisher(model, data, kind="empirical")
    assert_fisher_close(got, ref, rtol=1e-10, atol_rel=1e-12)


def test_levit_with_a_last_batch_of_one_sample():
    """LeViT's patch embedding ends in a batch norm whose output becomes tokens into a residual
    block: PyTorch's batch norm backward is wrong there for a batch of one (see
    ``contiguous_norm_gradients``), which made the reference loop, the loop engine and the rules
    on a last batch of one sample wrong (the conv weights 85% off at 5e-4 of the largest entry).
    Trained-sized weights; every tensor against the loop, and the loop against vmap."""
    import transformers as T

    cfg = T.LevitConfig(image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                        key_dim=[8, 8, 8], patch_size=16, num_labels=3)
    torch.manual_seed(0)
    model = T.LevitForImageClassification(cfg).to(D).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 64, 64, generator=g, dtype=D), torch.randint(0, 3, (4,), generator=g)
    data = [{"pixel_values": x[:3], "labels": y[:3]}, {"pixel_values": x[3:], "labels": y[3:]}]
    fastewc.fisher.clear_plan_cache()
    got, info = fastewc.estimate_fisher(model, data, return_info=True)
    ref = R.estimate_fisher(model, data)
    assert not info.vmap_params and not info.loop_params, info
    assert_fisher_close(got, ref, rtol=1e-10, atol_rel=1e-12)
    assert_fisher_close(fastewc.estimate_fisher(model, data, method="vmap"), ref, rtol=1e-10, atol_rel=1e-12)
