"""Determinism of the rule plan in bfloat16 (issue 24, item 4): the same model, data and seed
give the same plan and the same methods in every process, and no bf16 parameter falls to the
loop. A bf16 probe cannot tell a wrong rule (~1e-2 off the loop) from bf16 rounding (also
~1e-2), so it used to reject right rules by chance; the probe now decides on a float32 copy of
the model and the bf16 model runs the plan it proved.

The plan cache is per process, so each run is a fresh process."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import fastewc  # noqa: E402
import zoo  # noqa: E402  (tests/ is on the path: conftest)

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

# One estimate in a fresh process: the tiny Llama of the zoo in bfloat16, padded text, printed
# as JSON (the method of every parameter, the loop and vmap parameters, and the reasons).
SCRIPT = r"""
import json, sys, warnings
import torch
import fastewc, zoo
torch.set_num_threads(1)
torch.manual_seed(0)
model, _ = zoo.llama(True)
model = model.to(torch.bfloat16)
data = zoo.text("lm", True, n=8, batch_size=4)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, info = fastewc.estimate_fisher(model, data, kind="empirical", return_info=True)
print(json.dumps({"methods": dict(sorted(info.methods.items())), "loop": sorted(info.loop_params),
                  "vmap": sorted(info.vmap_params), "reasons": dict(sorted(info.reasons.items()))}))
"""


def _runs(n: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=str(ROOT)) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_bf16_llama_same_plan_in_every_process_and_nothing_on_the_loop():
    runs = _runs(3)
    first = runs[0]
    for r in runs[1:]:
        assert r == first, "the plan differs between processes"
    assert first["loop"] == [], first["reasons"]
    assert first["vmap"] == [], first["reasons"]
    assert len(first["methods"]) > 0


def test_bf16_probe_leaves_the_model_as_it_was():
    """The float32 copy is the probe's own: the model keeps its dtype and its parameter objects,
    and a bf16 Fisher comes back with every parameter by rules."""
    torch.manual_seed(0)
    model, _ = zoo.llama(True)
    model = model.to(torch.bfloat16)
    before = {n: (id(p), p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    data = zoo.text("lm", True, n=4, batch_size=2)
    fastewc.fisher.clear_plan_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisher, info = fastewc.estimate_fisher(model, data, kind="empirical", return_info=True)
    for n, p in model.named_parameters():
        pid, dtype, value = before[n]
        assert id(p) == pid and p.dtype == dtype == torch.bfloat16
        assert torch.equal(p.detach(), value)
    assert not info.loop_params and not info.vmap_params
    # The values: the reference loop on a float32 copy of the same (bf16-rounded) weights. bf16
    # rounding leaves about 1e-2 relative; a wrong rule is off by far more.
    import copy

    from fastewc.reference import estimate_fisher as reference_fisher

    model32 = copy.deepcopy(model).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference_fisher(model32, data, kind="empirical")
    errors = zoo.relative_errors({n: f.float() for n, f in fisher.items()}, want)
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
