"""LoRA-style models: Fisher, stored buffers and penalty cover only the trainable adapters."""

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastewc import EWCRegularizer, estimate_fisher
from fastewc import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from lora_ewc import lora_mlp, run, task  # noqa: E402


def test_fisher_and_penalty_cover_adapters_only():
    torch.manual_seed(0)
    model = lora_mlp().double()
    data = [(x.double(), y) for x, y in task(1, n=40)]
    fisher = estimate_fisher(model, data)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == adapters == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    ref = R.compute_fisher(model, data, 40)  # the reference differentiates trainable params only
    for n in fisher:
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-6, atol=1e-12)

    ewc = EWCRegularizer(10.0)
    ewc.register_task(fisher, {n: model.get_parameter(n).detach() + 0.1 for n in fisher})
    assert set(ewc.protected_names) == adapters
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()
    ewc.accumulate_grad_(model)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in adapters), n  # the frozen base gets no gradient


def test_registering_a_frozen_base_parameter_protects_nothing_extra():
    model = lora_mlp()
    frozen = {"0.base.weight": torch.ones(64, 32)}
    ewc = EWCRegularizer(10.0)
    ewc.register_task(frozen, {"0.base.weight": torch.zeros(64, 32)})
    assert float(ewc(model)) == 0.0  # parameters without requires_grad are not protected


def test_peft_model_if_installed():
    peft = pytest.importorskip("peft", reason="peft not installed")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    data = [(torch.randn(6, 8), torch.randint(0, 3, (6,)))]
    fisher = estimate_fisher(model, data)
    assert fisher and all("lora_" in n for n in fisher)


def test_example_runs(capsys):
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "lora_ewc.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "Fisher computed for: ['0.lora_A', '0.lora_B', '2.lora_A', '2.lora_B']" in out
    assert re.search(r"protected 660 of 3097 parameters", out), out
    penalty = float(re.search(r"penalty after task B: ([0-9.eE+-]+)", out).group(1))
    assert penalty > 0.0  # task B moved the adapters away from task A's optimum


def test_example_protects_exactly_the_adapters():
    out = run()
    model, ewc, fisher = out["model"], out["ewc"], out["fisher"]
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    assert set(fisher) == set(ewc.protected_names) == adapters
    assert all(float(f.sum()) > 0.0 for f in fisher.values())
    assert set(out["optimum"]) == adapters
    # After task B the adapters have moved: the penalty is positive and equals the reference loop.
    assert out["penalty"] > 0.0
    with torch.no_grad():
        expected = float(R.ewc_penalty_loop(model, [fisher], [out["optimum"]], 100.0))
    assert out["penalty"] == pytest.approx(expected, rel=1e-4)
