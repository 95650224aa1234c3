"""The proven-plan cache: a later call on the same model reuses the plan (and what the first
call's output check found) and gives the same Fisher, and the cache never keeps a model alive:
a model the user lets go is freed, with its plan."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import reference as R
from fastewc.fisher import probe

from models import assert_fisher_close, batches, hf_batches, hf_model
from test_fisher_local_rules import Followed, Tokens

D = torch.float64


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(D), \
        batches(torch.randn(7, 4, dtype=D), torch.randint(0, 3, (7,)), batch_size=4)


def _tokens():  # op-local parameters followed inside a module's forward
    return Tokens().to(D), batches(torch.randn(7, 4, 6, dtype=D), torch.randint(0, 3, (7,)), batch_size=3)


def _followed():  # a batch-free module followed inside its parent's forward
    return Followed("inside").to(D), batches(torch.randint(0, 9, (7, 5)), torch.randint(0, 3, (7,)), batch_size=4)


def _gpt2():  # a tied head, attention, layer norms, a Hugging Face loss
    pytest.importorskip("transformers")
    model = hf_model("gpt2")
    return model, hf_batches(6, 8, model.config.vocab_size, "lm", batch_size=3)


@pytest.mark.parametrize("make", [_mlp, _tokens, _followed, _gpt2], ids=["mlp", "tokens", "followed", "gpt2"])
def test_a_later_call_reuses_the_plan_and_the_model_is_freed_when_let_go(make):
    fastewc.fisher.clear_plan_cache()
    torch.manual_seed(3)
    model, data = make()
    first, info1 = fastewc.estimate_fisher(model, data, return_info=True)
    again, info2 = fastewc.estimate_fisher(model, data, return_info=True)
    assert not info1.plan_cached and info2.plan_cached
    assert info2.methods == info1.methods and not info2.vmap_params and not info2.loop_params
    assert_fisher_close(again, first, rtol=1e-12)
    assert_fisher_close(again, R.estimate_fisher(model, data), rtol=1e-8)
    alive = weakref.ref(model)
    del model, first, again, info1, info2
    gc.collect()
    assert alive() is None, "the plan cache keeps the model alive"
    assert len(probe._CACHE) == 0


def test_the_probe_proves_the_plan_on_a_padded_sample_too(monkeypatch):
    """Padding takes other paths through a model than full rows (Funnel's masked relative
    attention went wrong on padded samples only): where the first samples' lengths differ, the
    probe compares the first with the one among the first four whose length differs most."""
    seen = []
    real = probe._plain_truth

    def truth(check, part, labels, names):
        seen.append(part.inputs["attention_mask"].sum(1).tolist())
        return real(check, part, labels, names)

    monkeypatch.setattr(probe, "_plain_truth", truth)
    pytest.importorskip("transformers")
    model = hf_model("bert").eval()
    data = hf_batches(7, 8, 40, "cls", batch_size=4)   # lengths 8, 7, 6, 8, ...
    fastewc.fisher.clear_plan_cache()
    got = fastewc.estimate_fisher(model, data)
    assert seen and all(lengths == [8, 6] for lengths in seen), seen
    assert_fisher_close(got, R.estimate_fisher(model, data), rtol=1e-10)
