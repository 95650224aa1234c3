"""estimate_fisher and consolidate on wrapped models (torch.compile, DataParallel): the Fisher of
the module inside, under its own parameter names, as the regularizer stores them (issue 23:
estimate_fisher(torch.compile(m)) returned "_orig_mod." names, consolidate plain ones)."""

import pytest
import torch
import torch.nn as nn

import fastewc
from fastewc import reference as R

from models import assert_fisher_close, make_mlp

D = torch.float64
WRAPS = {"compile": torch.compile, "data_parallel": nn.DataParallel,
         "both": lambda m: nn.DataParallel(torch.compile(m))}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_estimate_fisher_names_parameters_as_the_module_does(wrap):
    model, data = make_mlp(dtype=D)
    got = fastewc.estimate_fisher(WRAPS[wrap](model), data)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert_fisher_close(got, R.estimate_fisher(model, data))


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_consolidate_and_estimate_fisher_agree_on_names(wrap):
    model, data = make_mlp(dtype=D)
    fisher, optimum = fastewc.consolidate(fastewc.EWCRegularizer(), WRAPS[wrap](model), data)
    assert set(fisher) == set(optimum) == set(fastewc.estimate_fisher(WRAPS[wrap](model), data))

