"""Seed-compatible entry points (the original reference API; see fastewc.compat): FisherInformation,
compute_fisher, compute_true_fisher, EWCTrainer, EWCRegularizer.consolidate."""

import torch
import torch.nn.functional as F

import fastewc
from fastewc import reference as R

from models import assert_fisher_close, make_cnn, make_mlp

D = torch.float64


def _loader(n=24, batch_size=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 13, generator=g, dtype=dtype)
    y = (x[:, :5].argmax(1))  # learnable
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def test_compute_fisher_matches_seed():
    model, data = make_mlp(dtype=D)
    for n in (7, 13, 200):
        assert_fisher_close(fastewc.compute_fisher(model, data, num_samples=n),
                            R.compute_fisher(model, data, num_samples=n))
    loss = lambda o, y: 2.0 * F.cross_entropy(o, y)
    assert_fisher_close(fastewc.compute_fisher(model, data, 9, loss), R.compute_fisher(model, data, 9, loss))


def test_compute_true_fisher_matches_seed():
    model, data = make_mlp(dtype=D)
    got = fastewc.compute_true_fisher(model, data, num_samples=11, generator=torch.Generator().manual_seed(9))
    ref = R.compute_true_fisher(model, data, num_samples=11, generator=torch.Generator().manual_seed(9))
    assert_fisher_close(got, ref)


def test_fisher_information_empirical():
    model, data = make_cnn(dtype=D)
    fisher, optimal = fastewc.FisherInformation(model, fisher_samples=9, empirical=True).compute(data)
    assert_fisher_close(fisher, R.compute_fisher(model, data, num_samples=9))
    assert set(optimal) == set(fisher)
    params = dict(model.named_parameters())
    for name, value in optimal.items():
        assert torch.equal(value, params[name].detach()) and value.data_ptr() != params[name].data_ptr()


def test_fisher_information_criterion():
    model, data = make_mlp(dtype=D)
    crit = torch.nn.CrossEntropyLoss()
    fisher, _ = fastewc.FisherInformation(model, fisher_samples=200).compute(data, criterion=lambda o, y: 3 * crit(o, y))
    ref = R.compute_fisher(model, data, num_samples=200)
    assert_fisher_close(fisher, {k: 9 * v for k, v in ref.items()})


def test_fisher_information_true_fisher_smoke():
    model, data = make_mlp(dtype=D)
    fisher, optimal = fastewc.FisherInformation(model, fisher_samples=10, empirical=False).compute(data)
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert fisher[name].shape == p.shape and torch.isfinite(fisher[name]).all() and (fisher[name] >= 0).all()


def test_regularizer_consolidate():
    model, data = make_mlp(dtype=D)
    ewc = fastewc.EWCRegularizer(50.0)
    fisher, optimal = ewc.consolidate(model, data, kind="exact", num_samples=10)
    assert_fisher_close(fisher, R.estimate_fisher(model, data, kind="exact", num_samples=10))
    assert ewc.tasks_seen == 1
    assert float(ewc(model).detach()) == 0.0  # at the optimum
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    value = ewc(model)
    assert float(value) > 0.0
    ref = R.ewc_penalty_loop(model, [fisher], [optimal], 50.0)
    torch.testing.assert_close(value.double(), ref.double(), rtol=1e-5, atol=0)


def test_regularizer_consolidate_params_subset():
    model, data = make_mlp(dtype=D)
    ewc = fastewc.EWCRegularizer(1.0)
    fisher, optimal = ewc.consolidate(model, data, params="2.*")
    assert set(fisher) == {"2.weight", "2.bias"} and set(ewc.protected_names) == {"2.weight", "2.bias"}


def test_ewc_trainer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    trainer = fastewc.EWCTrainer(model, fisher_samples=20, ewc_lambda=100.0, learning_rate=1e-2)
    assert isinstance(trainer.ewc, fastewc.EWCRegularizer)
    task_a = _loader()
    trainer.train_task(task_a, num_epochs=3)
    fisher, optimal = trainer.consolidate(task_a)
    assert_fisher_close(fisher, R.compute_fisher(model, task_a, num_samples=20), rtol=1e-4, atol_rel=1e-6)
    assert trainer.ewc.tasks_seen == 1
    assert float(trainer.ewc(model).detach()) == 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task_b = _loader(n=16)
    trainer.train_task(task_b, num_epochs=1, criterion=torch.nn.CrossEntropyLoss())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert float(trainer.ewc(model).detach()) > 0.0
    for name, value in trainer.ewc.importance().items():
        torch.testing.assert_close(value.float(), fisher[name].float())


def test_ewc_trainer_optimizer_argument():
    model = torch.nn.Linear(13, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = fastewc.EWCTrainer(model, fisher_samples=8, optimizer=opt)
    w = model.weight.detach().clone()
    trainer.train_task(_loader(n=8), num_epochs=1)
    assert not torch.equal(w, model.weight)
