"""EWCHFTrainer(track_fisher=True): the Fisher tracked during train() is what consolidate()
registers, with no second pass over the data. Tiny float64 Hugging Face models, CPU, learning
rate 0 (parameters fixed, so the tracked Fisher must equal estimate_fisher on the same samples)."""

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")

from fastewc import EWCInputError, EWCRegularizer, estimate_fisher  # noqa: E402
from fastewc.integrations.transformers import EWCHFTrainer  # noqa: E402

from models import assert_fisher_close, hf_batches, hf_model  # noqa: E402

# dropout off: the Trainer trains in training mode, and estimate_fisher's pass must see the same model
NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}
LABELS = {"bert": "cls", "gpt2": "lm"}
# As tests/fisher/test_tracker.py: BERT exact in float64; GPT-2's loss is taken in float32 by
# transformers on both sides, so float32 rounding bounds the difference.
TOL = {"bert": dict(rtol=1e-10, atol_rel=1e-10), "gpt2": dict(rtol=1e-6, atol_rel=1e-8)}


def samples(name, n=6):
    (full,) = hf_batches(n, 8, 40, LABELS[name], batch_size=n)
    return [{k: v[i] for k, v in full.items()} for i in range(n)]


def make(tmp_path, name, data, track_fisher=True, **args):
    torch.manual_seed(0)
    model = hf_model(name, **NO_DROPOUT[name])
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, per_device_eval_batch_size=3, learning_rate=0.0,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, num_train_epochs=1, **args)
    trainer = EWCHFTrainer(model=model, args=targs, train_dataset=data, ewc=EWCRegularizer(1.0),
                         track_fisher=track_fisher)
    return model, trainer


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("name, accumulation", [("bert", 1), ("bert", 2), ("gpt2", 2)])
def test_consolidate_registers_the_tracked_fisher_without_a_second_pass(tmp_path, caplog, name, accumulation):
    """GPT-2 with accumulation 2: the Trainer passes num_items_in_batch (a token sum over both
    micro-batches) to the model's own loss; BERT's loss is divided by the Trainer instead. The
    tracker reads either from the labels and the backward, nothing declared."""
    data = samples(name)
    model, trainer = make(tmp_path, name, data, gradient_accumulation_steps=accumulation)
    trainer.train()
    assert trainer.tracked_fisher.samples_seen == len(data) and trainer.tracked_fisher.steps == 2
    calls = count_forwards(model)
    with caplog.at_level(logging.INFO, logger="fastewc.integrations"):
        fisher = trainer.consolidate()
    assert calls == []  # no forward: nothing was estimated
    assert "no extra pass over the data" in caplog.text
    assert trainer.ewc.tasks_seen == 1 and trainer.tracked_fisher is None
    model.eval()
    batches = [{k: torch.stack([s[k] for s in data[i:i + 3]]) for k in data[0]} for i in range(0, len(data), 3)]
    assert_fisher_close(fisher, estimate_fisher(model, batches, kind="empirical"), **TOL[name])


def test_one_in_tracks_one_micro_batch_of_each_run(tmp_path):
    """``track_fisher={"one_in": 2}`` with accumulation 2: one of each two forwards the Trainer
    runs (micro-batches, shuffled by its sampler) is tracked, at the position the tracker's
    generator drew, and consolidate() registers exactly those samples' Fisher."""
    data = samples("bert", n=12)
    model, trainer = make(tmp_path, "bert", data, track_fisher={"one_in": 2}, gradient_accumulation_steps=2)
    seen = []
    model.register_forward_pre_hook(  # the training forwards (not the tracker's probe, run without gradients)
        lambda m, args, kwargs: seen.append({k: v.clone() for k, v in kwargs.items()
                                             if torch.is_tensor(v) and k != "num_items_in_batch"})
        if torch.is_grad_enabled() else None,
        with_kwargs=True)
    trainer.train()
    assert len(seen) == 4 and trainer.tracked_fisher.steps == 2 and trainer.tracked_fisher.samples_seen == 6
    g = torch.Generator().manual_seed(0)
    picks = [run + int(torch.randint(2, (1,), generator=g)) for run in range(0, len(seen), 2)]
    fisher = trainer.consolidate()
    model.eval()
    assert_fisher_close(fisher, estimate_fisher(model, [seen[i] for i in picks], kind="empirical"), **TOL["bert"])


def test_a_dataset_or_options_ask_for_an_estimate_and_without_tracking_nothing_changes(tmp_path):
    data = samples("bert")
    model, trainer = make(tmp_path / "a", "bert", data)
    trainer.train()
    calls = count_forwards(model)
    trainer.consolidate(data, num_samples=4)
    assert len(calls) > 0 and trainer.tracked_fisher is None
    model, trainer = make(tmp_path / "b", "bert", data, track_fisher=False)
    trainer.train()
    assert trainer.tracked_fisher is None
    calls = count_forwards(model)
    trainer.consolidate()
    assert len(calls) > 0


@pytest.mark.parametrize("track_fisher, match", [
    ("yes", "track_fisher must be a bool or a dict"),
    ({"accumulation_steps": 2}, r"\['accumulation_steps'\] are read from the training loop"),
    ({"reduction": "sum"}, r"\['reduction'\] are read from the training loop"),
])
def test_bad_track_fisher(tmp_path, track_fisher, match):
    with pytest.raises(EWCInputError, match=match):
        make(tmp_path, "bert", samples("bert"), track_fisher=track_fisher)


def test_loss_the_tracker_cannot_read_is_refused(tmp_path):
    with pytest.raises(EWCInputError, match="label smoothing or a compute_loss_func"):
        make(tmp_path, "bert", samples("bert"), label_smoothing_factor=0.1)
    data = [{k: v for k, v in s.items() if k != "labels"} for s in samples("gpt2")]

    class OwnLoss(EWCHFTrainer):
        def compute_loss(self, model, inputs, **kw):
            return model(**inputs).logits.square().mean()

    model = hf_model("gpt2", **NO_DROPOUT["gpt2"])
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[],
                                           use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=0.0)
    trainer = OwnLoss(model=model, args=targs, train_dataset=data, track_fisher=True)
    with pytest.raises(EWCInputError, match="training batch has no 'labels'"):
        trainer.train()
    assert not trainer.tracked_fisher and not any(m._forward_hooks for m in model.modules())
