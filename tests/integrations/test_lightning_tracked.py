"""EWCCallback(track_fisher=True): the Fisher tracked during fit is registered at its end, with no
second pass over the data. Float64 MLP on CPU at learning rate 0 (parameters fixed), so it must
equal estimate_fisher(kind="empirical") over the same batches."""

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch", reason="lightning not installed (extra 'lightning')")

from fastewc import EWCInputError, EWCRegularizer, estimate_fisher  # noqa: E402
from fastewc.integrations.lightning import EWCCallback  # noqa: E402

from models import assert_fisher_close  # noqa: E402

TOL = dict(rtol=1e-10, atol_rel=1e-10)  # as tests/fisher/test_tracker.py for plain models


class Module(L.LightningModule):
    def __init__(self, reduction="mean", through_self=True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
        self.reduction, self.through_self = reduction, through_self
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x) if self.through_self else self.net(x), y, reduction=self.reduction)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loader(n=24, bs=8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def fit(module, callback, **kw):
    L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kw).fit(module, loader())


def spy(ewc):
    registered = []
    register = ewc.register_task
    ewc.register_task = lambda fisher, optimum, **kw: (registered.append(fisher), register(fisher, optimum, **kw))
    return registered


@pytest.mark.parametrize("accumulate, reduction", [(1, "mean"), (3, "mean"), (1, "sum")])
def test_fit_registers_the_tracked_fisher_without_a_second_pass(caplog, accumulate, reduction):
    module, ewc = Module(reduction), EWCRegularizer(1.0)
    registered = spy(ewc)
    track = True if reduction == "mean" else {"reduction": reduction}
    with caplog.at_level(logging.INFO, logger="fastewc.integrations"):
        fit(module, EWCCallback(ewc, track_fisher=track), accumulate_grad_batches=accumulate)
    # the three training steps and, at the first, the tracker's probe on one sample (without
    # gradients); no pass at the end
    assert module.forwards == 4
    assert "no extra pass over the data" in caplog.text
    assert ewc.tasks_seen == 1 and len(registered) == 1
    assert_fisher_close(registered[0], estimate_fisher(module, loader(), kind="empirical"), **TOL)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())  # tracker stopped


def test_steps_that_bypass_the_module_forward_are_refused():
    with pytest.raises(EWCInputError, match="training_step must call self"):
        fit(Module(through_self=False), EWCCallback(EWCRegularizer(1.0), track_fisher=True))


@pytest.mark.parametrize("kwargs, match", [
    (dict(track_fisher=True, consolidate_data=[]), "Give one or the other"),
    (dict(track_fisher=True, num_samples=8), "Give one or the other"),
    (dict(track_fisher={"scaler": None}), r"\['scaler'\] are read from the training loop"),
    (dict(track_fisher=1), "track_fisher must be a bool or a dict"),
])
def test_bad_track_fisher(kwargs, match):
    with pytest.raises(EWCInputError, match=match):
        EWCCallback(EWCRegularizer(1.0), **kwargs)
