"""benchmarks/bench_penalty_gpu.py runs end to end (``--dry-run``: tiny sizes on the CPU, Triton
under the interpreter where available) and writes the JSON the GPU run will commit."""

import importlib.util
import json
from pathlib import Path

import torch

import fastewc.penalty.backends as backends

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_penalty_gpu.py"


def test_dry_run_writes_json_and_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_penalty_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "penalty_gpu.json"
    mod.main(["--dry-run", "--json", str(out)])
    data = json.loads(out.read_text())
    cases = {(r["case"], r["storage"]) for r in data["rows"]}
    want = {("reference loop", "float32"), ("torch._foreach", "float32")}
    labels = ["torch backend"] + (["triton"] if backends.triton_status(torch.device("cpu")) is None else [])
    want |= {(f"{b} {op}", s) for b in labels for op in ("fwd+bwd", "accumulate_grad_")
             for s in ("float32", "bfloat16")}
    assert cases == want
    assert all(r["seconds"] > 0 and r["GB/s"] > 0 for r in data["rows"]), data["rows"]
    assert data["copy_GBps"] > 0 and data["dry_run"] is True
    assert "| triton accumulate_grad_ |" in capsys.readouterr().out or "triton" not in labels
