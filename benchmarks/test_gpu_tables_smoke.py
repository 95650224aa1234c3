"""Smoke runs of the scripts behind the GPU tables, on the CPU: the zoo's speed and the tracked
steps on any device (tiny sizes, one round), their JSON and the penalty's (a dry run) made into
the README's tables, a clear refusal of a device this torch cannot use, and ``gpu_suite.sh``
refusing to start without a CUDA GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_penalty_gpu  # noqa: E402
import bench_tracker  # noqa: E402
import fisher_zoo_speed  # noqa: E402
import update_readme  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA GPU is seen")


def test_zoo_speed_on_a_named_device(tmp_path):
    out = tmp_path / "zoo.json"
    result = fisher_zoo_speed.main(["--size", "tiny", "--models", "bert,vit", "--samples", "6", "--batch-size", "3",
                                    "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert result["device"] == "cpu" and [r["model"] for r in result["rows"]] == ["bert", "vit"]
    assert all("error" not in r and r["x_floor"] > 0 and r["vmap_params"] == r["loop_params"] == 0
               for r in result["rows"]), result["rows"]
    assert json.loads(out.read_text())["rows"][1]["model"] == "vit"
    table = update_readme.zoo_speed_table(json.loads(out.read_text()), "src")
    assert "| bert " in table and "| vit " in table and "Source: `src`" in table


def test_tracked_steps_on_a_named_device(tmp_path):
    out = tmp_path / "tracker.json"
    result = bench_tracker.main(["--models", "mlp,transformer", "--samples", "64", "--repeats", "1",
                                 "--device", "cpu", "--json", str(out)])
    assert result["device"] == "cpu" and [r["model"] for r in result["rows"]] == ["mlp", "transformer"]
    assert all(r["tracked_over_plain"] > 0 and r["adamw_tracked_0.25_over_plain"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["rows"][0]["model"] == "mlp"
    table = update_readme.tracker_table(json.loads(out.read_text()), "src")
    assert "| mlp | 64 |" in table and "| transformer | 64 |" in table and "plain epoch s (AdamW)" in table and "one step in 4" in table


def test_penalty_gpu_json_makes_the_readme_table(tmp_path):
    out = tmp_path / "penalty.json"
    bench_penalty_gpu.main(["--dry-run", "--storage", "float32", "--json", str(out)])
    table = update_readme.penalty_gpu_table(json.loads(out.read_text()), "src")
    assert "| reference loop |" in table and "copy bandwidth" in table and "Source: `src`" in table


@no_cuda
@pytest.mark.parametrize("script", [fisher_zoo_speed, bench_tracker])
def test_a_device_torch_cannot_use_is_refused_with_the_reason(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--device", "cuda", "--models", "mlp" if script is bench_tracker else "bert"])
    assert e.value.code == 2
    assert "this torch sees no CUDA GPU" in capsys.readouterr().err


@no_cuda
def test_gpu_suite_refuses_to_start_without_a_cuda_gpu(tmp_path):
    got = subprocess.run(["bash", str(HERE / "gpu_suite.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert got.returncode == 2, got.stderr
    assert "sees no CUDA GPU" in got.stderr
