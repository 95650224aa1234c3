"""estimate_fisher on labels and model outputs its loss cannot use (issue 23): labels out of
range or not class indices, named by batch and sample with the valid range; a model with one
output under softmax cross-entropy; outputs without logits. Each raises EWCInputError before
any gradient is taken, on every method."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastewc
from fastewc import EWCInputError
from fastewc import reference as R

from models import assert_fisher_close, batches, hf_batches, hf_model

METHODS = ["auto", "vmap", "loop", "batched"]


def _data(labels, batch_size=4):
    x = torch.randn(len(labels), 4)
    return batches(x, torch.as_tensor(labels), batch_size=batch_size)


# -- labels -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("labels, value, batch, sample", [
    ([0, 1, 2, 0, 1, 5, 2, 0], 5, 1, 1),       # class 5 of 3
    ([0, 1, 2, -1, 1, 1, 2, 0], -1, 0, 3),     # -1 is not the ignore index
    ([0, 1, 2, 0, 1, 2, 2, 3], 3, 1, 3),       # one past the last class
])
def test_label_out_of_range_names_batch_sample_and_range(method, labels, value, batch, sample):
    model = nn.Linear(4, 3)
    with pytest.raises(EWCInputError, match=rf"^batch {batch}, sample {sample} \(sample {4 * batch + sample} of the "
                                            rf"data\): label {value} is out of range; .* labels must be in \[0, 2\] "
                                            rf"\(or -100, ignored\)"):
        fastewc.estimate_fisher(model, _data(labels), method=method)


def test_ignore_index_is_accepted():
    # -100 is cross-entropy's ignore_index: the sample counts with a zero gradient.
    model = nn.Linear(4, 3).double()
    data = [(x.double(), y) for x, y in _data([0, -100, 2, 1, -100, 0, 2, 1])]
    assert_fisher_close(fastewc.estimate_fisher(model, data), R.estimate_fisher(model, data))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_labels_not_class_indices(dtype):
    model = nn.Linear(4, 3)
    data = [(x, y.to(dtype)) for x, y in _data([0, 1, 2, 0, 1, 1, 2, 0])]
    with pytest.raises(EWCInputError, match=rf"^batch 0: the labels are {dtype}, but the default loss .* needs "
                                            r"integer class indices in \[0, 2\] \(torch\.long\).*pass loss_fn"):
        fastewc.estimate_fisher(model, data)


def test_one_hot_labels_say_one_index_per_sample():
    model = nn.Linear(4, 3)
    data = [(x, F.one_hot(y, 3)) for x, y in _data([0, 1, 2, 0, 1, 1, 2, 0])]
    with pytest.raises(EWCInputError, match=r"^batch 0: the labels have shape \(4, 3\), but .* one class index per "
                                            r"sample, shape \(4,\)"):
        fastewc.estimate_fisher(model, data)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_other_integer_labels_count_as_class_indices(dtype):
    # cross_entropy itself takes only int64 (and uint8) targets: narrower integers are widened.
    model = nn.Linear(4, 3).double()
    data = [(x.double(), y) for x, y in _data([0, 1, 2, 0, 1, 1, 2, 0])]
    narrow = [(x, y.to(dtype)) for x, y in data]
    assert_fisher_close(fastewc.estimate_fisher(model, narrow), fastewc.estimate_fisher(model, data), rtol=0)


def test_token_labels_past_the_vocabulary():
    pytest.importorskip("transformers")
    model = hf_model("gpt2")                               # vocabulary of 40
    data = hf_batches(6, 8, 40, "lm", batch_size=4)        # -100 on padding: accepted
    data[1]["labels"][1, 4] = 40
    with pytest.raises(EWCInputError, match=r"^batch 1, sample 1 \(sample 5 of the data\): label 40 is out of "
                                            r"range; GPT2LMHeadModel's own loss .* must be in \[0, 39\]"):
        fastewc.estimate_fisher(model, data)


def test_sequence_class_out_of_range():
    pytest.importorskip("transformers")
    model = hf_model("bert")                               # 3 labels
    data = hf_batches(6, 8, 40, "cls", batch_size=4)
    data[0]["labels"][2] = 3
    with pytest.raises(EWCInputError, match=r"^batch 0, sample 2 \(sample 2 of the data\): label 3 is out of "
                                            r"range; BertForSequenceClassification's own loss .* \[0, 2\]"):
        fastewc.estimate_fisher(model, data)


def test_float_targets_of_a_multi_label_classifier_are_not_class_indices():
    # Float labels are the multi-label (or regression) targets of a sequence classifier: not checked.
    pytest.importorskip("transformers")
    model = hf_model("bert", problem_type="multi_label_classification")
    data = hf_batches(6, 8, 40, "multi", batch_size=4)
    got = fastewc.estimate_fisher(model, data)
    assert any(bool(f.abs().sum() > 0) for f in got.values())


def test_labels_of_a_user_loss_are_not_checked():
    # loss_fn decides what its targets mean: regression targets pass as they are.
    model = nn.Linear(4, 1).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    data = batches(x, y, batch_size=4)
    got = fastewc.estimate_fisher(model, data, loss_fn=F.mse_loss)
    assert_fisher_close(got, R.estimate_fisher(model, data, loss_fn=F.mse_loss))


# -- one output under softmax cross-entropy -----------------------------------------------------

WHY_ZERO = {"exact": r"the exact Fisher would be zero",
            "sampled": r"every drawn label is class 0 and the Fisher would be zero",
            "empirical": r"the default loss \(cross-entropy\) is 0 for every sample"}


# method='batched' takes the empirical kind only
@pytest.mark.parametrize("kind, method", [(k, m) for k in WHY_ZERO for m in METHODS
                                          if m != "batched" or k == "empirical"])
def test_one_output_model_raises_saying_why_and_what_to_use(kind, method):
    why = WHY_ZERO[kind]
    model = nn.Linear(4, 1)
    data = _data([0, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(EWCInputError, match=rf"kind='{kind}' on a model with one output per sample \(logits of "
                                            rf"shape \(1, 1\)\): softmax over one class is constant \(p = 1\), so "
                                            rf"{why}.*pass a loss_fn .* with kind='empirical', or give the model two "
                                            rf"logits"):
        fastewc.estimate_fisher(model, data, kind=kind, method=method)


def test_one_output_sampled_with_a_loss_fn_raises_too():
    model = nn.Linear(4, 1)
    with pytest.raises(EWCInputError, match=r"every drawn label would be class 0 whatever the model predicts"):
        fastewc.estimate_fisher(model, _data([0] * 8), kind="sampled",
                                loss_fn=lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], y.float()))


# -- outputs without logits ---------------------------------------------------------------------

class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), x.sum(1)


class DictOut(TupleOut):
    def forward(self, x):
        return {"scores": self.lin(x)}


@pytest.mark.parametrize("cls, got", [(TupleOut, "tuple"), (DictOut, "dict")])
def test_output_without_logits_under_the_default_kind_says_to_pass_loss_fn(cls, got):
    with pytest.raises(EWCInputError, match=rf"^kind='empirical' with the default loss .* needs logits, but the model "
                                            rf"returned a {got} .*: pass loss_fn\(output, target\)"):
        fastewc.estimate_fisher(cls(), _data([0, 1, 2, 0]))


@pytest.mark.parametrize("kind", ["sampled", "exact"])
def test_output_without_logits_names_the_kind(kind):
    with pytest.raises(EWCInputError, match=rf"^kind='{kind}' .* needs logits, but the model returned a tuple"):
        fastewc.estimate_fisher(TupleOut(), [(torch.randn(4, 4),)], kind=kind)


def test_output_without_logits_works_with_loss_fn():
    model = TupleOut().double()
    data = [(x.double(), y) for x, y in _data([0, 1, 2, 0, 1, 2, 2, 0])]
    loss = lambda out, y: F.cross_entropy(out[0], y)  # noqa: E731
    ref = R.estimate_fisher(model.lin, data)  # the same loss on the logits alone
    assert_fisher_close(fastewc.estimate_fisher(model, data, loss_fn=loss), {f"lin.{n}": f for n, f in ref.items()})


def test_a_second_call_keeps_the_output_check_with_the_proven_plan_and_still_checks_every_label():
    """The one-sample forward that reads the model's output runs on the call that proves the plan;
    a later call with the same model and input signature takes what it found from the plan, so it
    runs one forward per batch, and its labels are still checked against the same classes."""
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    x = torch.randn(8, 4, dtype=torch.float64)
    data = batches(x, torch.tensor([0, 1, 2, 0, 1, 2, 2, 0]), batch_size=4)
    first = fastewc.estimate_fisher(model, data)
    assert 1 in calls  # the output check's forward of one sample
    calls.clear()
    again = fastewc.estimate_fisher(model, data)
    assert calls == [4, 4]
    assert_fisher_close(again, first, rtol=1e-12)
    assert_fisher_close(again, R.estimate_fisher(model, data), rtol=1e-10)
    with pytest.raises(EWCInputError, match=r"^batch 1, sample 2 \(sample 6 of the data\): label 3 is out of range"):
        fastewc.estimate_fisher(model, batches(x, torch.tensor([0, 1, 2, 0, 1, 2, 3, 0]), batch_size=4))
    calls.clear()
    fastewc.estimate_fisher(model, data, kind="sampled")  # another kind: another plan, checked again
    assert calls[0] == 1
