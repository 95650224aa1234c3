"""fastewc.integrations.transformers.EWCHFTrainer on a tiny randomly initialised GPT-2 (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")

from fastewc import EWCRegularizer  # noqa: E402
from fastewc.integrations.transformers import EWCHFTrainer  # noqa: E402


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


def dataset(seed, n=16, length=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (n, length), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def make_trainer(tmp_path, model, data, ewc, **args):
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=2,
        disable_tqdm=True, seed=0, **args)
    return EWCHFTrainer(model=model, args=targs, train_dataset=data, ewc=ewc)


def registered_ewc(model, lam=10.0):
    ewc = EWCRegularizer(lam)
    ewc.register_task({n: torch.rand_like(p) for n, p in model.named_parameters()},
                      {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()})
    return ewc


def test_penalty_is_in_the_loss_and_its_gradient_matches(tmp_path):
    model = tiny_gpt2()
    for m in model.modules():  # dropout off: two train-mode forwards must agree
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ewc = registered_ewc(model)
    trainer = make_trainer(tmp_path, model, dataset(1), ewc)
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(dataset(1)))))
    model.train()
    params = list(model.parameters())
    total = trainer.compute_loss(model, batch)
    task = model(**batch).loss
    torch.testing.assert_close(total - task, ewc(model), rtol=1e-5, atol=1e-6)
    g_total = torch.autograd.grad(total, params, allow_unused=True)
    g_task = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
    g_ewc = torch.autograd.grad(ewc(model), params, allow_unused=True)
    for a, b, c in zip(g_total, g_task, g_ewc):
        want = (b if b is not None else 0) + (c if c is not None else 0)
        torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-6)
    model.eval()  # no penalty outside training (evaluation loss stays the task loss)
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), model(**batch).loss)


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("num_items", [None, 28])
def test_penalty_counted_once_per_optimizer_step(tmp_path, accumulation, num_items):
    """Over one optimizer step of ``accumulation`` micro-batches the accumulated gradient holds the
    penalty's gradient exactly once, whether or not the Trainer divides the loss by the GA steps
    (GPT-2 accepts loss kwargs, so with ``num_items_in_batch`` it does not divide)."""
    from fastewc.integrations.transformers import EWCTrainerMixin

    class ZeroTaskLoss(transformers.Trainer):  # isolates the penalty's contribution
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            return model(**inputs).loss * 0.0

    class Probe(EWCTrainerMixin, ZeroTaskLoss):
        pass

    model = tiny_gpt2()
    ewc = registered_ewc(model)
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                           gradient_accumulation_steps=accumulation, disable_tqdm=True)
    trainer = Probe(model=model, args=targs, train_dataset=dataset(1), ewc=ewc)
    trainer.current_gradient_accumulation_steps = accumulation  # set by the training loop
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(dataset(1)))))
    model.zero_grad(set_to_none=True)
    n = None if num_items is None else torch.tensor(num_items)
    for _ in range(accumulation):
        trainer.training_step(model, batch, num_items_in_batch=n)
    want = torch.autograd.grad(ewc(model), list(model.parameters()))
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


def test_training_with_ewc_stays_closer_to_the_anchor(tmp_path):
    dists = {}
    for name, lam in (("plain", 0.0), ("ewc", 50.0)):
        model = tiny_gpt2()
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        ewc = EWCRegularizer(lam)
        ewc.register_task({n: torch.ones_like(p) for n, p in model.named_parameters()}, anchor)
        trainer = make_trainer(tmp_path / name, model, dataset(2), ewc, max_steps=6)
        trainer.train()
        dists[name] = sum(((p.detach() - anchor[n]) ** 2).sum().item() for n, p in model.named_parameters())
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert logged and all("ewc_penalty" in h for h in logged)
    assert dists["ewc"] < 0.5 * dists["plain"], dists


def test_bad_ewc_argument(tmp_path):
    with pytest.raises(TypeError, match="EWCRegularizer"):
        make_trainer(tmp_path, tiny_gpt2(), dataset(1), ewc={"lambda": 3})


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_wrappers_around_the_model_are_taken_off():
    # What the Trainer may hand compute_loss: DDP/DeepSpeed-like ".module" wrappers and
    # torch.compile (torch_compile=True), in any nesting.
    from fastewc.integrations.transformers import _unwrap

    class Engine(torch.nn.Module):  # an accelerate / DeepSpeed style wrapper
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_gpt2()
    for wrapped in (Engine(model), torch.compile(model), Engine(torch.compile(Engine(model))),
                    torch.nn.DataParallel(torch.compile(model))):
        assert _unwrap(wrapped) is model
    assert _unwrap(model) is model
