"""fastewc.integrations.lightning.EWCCallback with a small LightningModule on CPU."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch", reason="lightning not installed (extra 'lightning')")

from fastewc import EWCRegularizer  # noqa: E402
from fastewc.integrations.lightning import EWCCallback  # noqa: E402


class Module(L.LightningModule):
    def __init__(self, lr=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.lr = lr
        self.grads = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
        self.grads.append([p.grad.detach().clone() for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(seed, n=24, bs=8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def trainer(callbacks, **kw):
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


def registered(module):
    ewc = EWCRegularizer(20.0)
    ewc.register_task({n: torch.rand_like(p) for n, p in module.named_parameters()},
                      {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in module.named_parameters()})
    return ewc


@pytest.mark.parametrize("accumulate", [1, 3])
def test_gradient_gets_the_penalty_once_per_optimizer_step(accumulate):
    torch.manual_seed(0)
    with_cb, without = Module(), Module()
    without.load_state_dict(with_cb.state_dict())
    ewc = registered(with_cb)
    trainer([EWCCallback(ewc)], accumulate_grad_batches=accumulate).fit(with_cb, loader(1))
    trainer([], accumulate_grad_batches=accumulate).fit(without, loader(1))
    assert len(with_cb.grads) == 3 // accumulate
    penalty_grad = torch.autograd.grad(ewc(with_cb), list(with_cb.parameters()))  # lr 0: params unchanged
    for step_a, step_b in zip(with_cb.grads, without.grads):
        for a, b, pg in zip(step_a, step_b, penalty_grad):
            torch.testing.assert_close(a, b + pg, rtol=1e-5, atol=1e-6)


def test_no_tasks_means_no_change():
    torch.manual_seed(0)
    a, b = Module(), Module()
    b.load_state_dict(a.state_dict())
    trainer([EWCCallback(EWCRegularizer(5.0))]).fit(a, loader(1))
    trainer([]).fit(b, loader(1))
    for x, y in zip(a.grads[-1], b.grads[-1]):
        assert torch.equal(x, y)


def test_bad_argument():
    with pytest.raises(TypeError, match="EWCRegularizer"):
        EWCCallback({"lambda": 1})
