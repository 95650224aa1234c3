"""The ``fastewc`` command: argument parsing, one-line errors with exit status 2, a tiny ``bench``
run that writes valid JSON, the options that moved to scripts under ``benchmarks/``, and
``fastewc bench`` kept on fastewc's public API. (The ``demo`` smoke test is in test_demo_cli.py;
the scale curves, the figures and the anchors are tested beside them in ``benchmarks/``.)"""

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastewc
from fastewc import cli, estimate_fisher
from fastewc._utils import MissingDependencyError, require
from fastewc.bench import fisher_benchmark


@pytest.mark.parametrize("text,value", [("25M", 25e6), ("1.5e6", 1.5e6), ("1B", 1e9), ("512k", 512e3), ("300", 300)])
def test_parse_count(text, value):
    assert cli.parse_count(text) == value


@pytest.mark.parametrize("text", ["", "M", "25X", "-3M", "1e"])
def test_parse_count_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="count like"):
        cli.parse_count(text)


def _err(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_unknown_device(capsys):
    code, err = _err(capsys, ["bench", "--device", "tpu"])
    assert code == 2 and "unknown device 'tpu'" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(capsys):
    code, err = _err(capsys, ["bench", "--device", "cuda"])
    assert code == 2 and "no CUDA GPU" in err


def test_size_that_does_not_fit_is_refused_before_allocating(capsys):
    code, err = _err(capsys, ["bench", "--params", "100000B"])
    assert code == 2 and "GiB" in err and "smaller size" in err


def test_bad_demo_method(capsys):
    code, err = _err(capsys, ["demo", "--methods", "finetune,magic"])
    assert code == 2 and "unknown method" in err and "magic" in err


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    with pytest.raises(MissingDependencyError, match=r"fastewc\[demo\]"):
        require("definitely_not_a_module_fastewc", extra="demo")


def test_missing_matplotlib_exits_2_before_training(capsys, monkeypatch):
    import fastewc._utils as opt

    real = opt.importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real(name, *a, **k)

    monkeypatch.setattr(opt.importlib, "import_module", fake)
    code, err = _err(capsys, ["demo", "--plot", "x.png", "--epochs", "1"])
    assert code == 2 and "fastewc[demo]" in err


def test_bench_tiny_writes_json(tmp_path, capsys):
    js = tmp_path / "b.json"
    code = cli.main(["bench", "--params", "1M", "--tasks", "2", "--repeats", "2", "--fisher-samples", "0",
                     "--json", str(js), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "reference loop fwd+bwd" in out and "accumulate_grad_" in out
    data = json.loads(js.read_text())
    rows = {r["method"]: r for r in data["penalty"]["rows"]}
    assert rows["reference loop fwd+bwd"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert all(r["median_ms"] > 0 and r["GBps"] > 0 for r in rows.values())
    assert data["machine"]["torch"] == torch.__version__
    # The same state on the PyTorch backend is timed beside the backend "auto" chose, where that is another.
    auto = next(m for m in rows if m.startswith("fastewc fwd+bwd ["))[len("fastewc fwd+bwd ["):-1]
    assert {"fastewc fwd+bwd [torch]", "fastewc accumulate_grad_ [torch]"} <= set(rows)
    assert len(rows) == (4 if auto == "torch" else 6), sorted(rows)


@pytest.mark.parametrize("argv,where", [
    (["--scale"], "benchmarks/bench_scale.py"), (["--scale", "--quick"], "benchmarks/bench_scale.py"),
    (["--max-params", "1B"], "benchmarks/bench_scale.py"), (["--plot", "b.png"], "benchmarks/plot_results.py"),
])
def test_options_that_moved_to_benchmarks_say_where(capsys, argv, where):
    with pytest.raises(SystemExit, match="^2$"):
        cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert f"{argv[0]} is no longer part of `fastewc bench`" in err and where in err


def test_bench_help_lists_no_moved_option(capsys):
    with pytest.raises(SystemExit, match="^0$"):
        cli.main(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert "--json" in help_text and "benchmarks/bench_scale.py" in help_text
    assert not any(flag in help_text for flag in ("--scale", "--quick", "--max-params", "--plot"))


def test_fisher_benchmark_times_extra_cases_and_lists_the_skipped_ones():
    def extra(model, data, kind):
        return [("mine", lambda: estimate_fisher(model, data, kind=kind), None), ("theirs", None, "not installed")]

    result = fisher_benchmark(samples=4, repeats=1, models=("mlp",), methods=("auto",), floor=False,
                              extra_cases=extra)
    assert [r["method"] for r in result["rows"]] == ["reference loop", "fastewc auto", "mine"]
    assert result["skipped"] == [{"model": "mlp", "kind": "empirical", "method": "theirs", "reason": "not installed"}]


def test_bench_uses_no_private_attribute_of_fastewc():
    # `fastewc bench` measures what users call: a `._name` on any object (a regularizer's
    # binding, a backend's state) would time something users cannot reach.
    found = []
    for path in sorted((Path(fastewc.__file__).parent / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and ast.unparse(node.value) != "torch"):  # torch._foreach_* is the baseline's subject
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if (isinstance(node, ast.ImportFrom) and node.level >= 2
                    and (node.module or "").startswith(("penalty", "fisher."))):
                found.append(f"{path.name}:{node.lineno} from ..{node.module}")
    assert not found, found


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastewc", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "bench" in r.stdout and "demo" in r.stdout


def test_bench_fisher_rows_with_a_hugging_face_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    js = tmp_path / "f.json"
    code = cli.main(["bench", "--params", "1M", "--tasks", "1", "--repeats", "1", "--fisher-samples", "8",
                     "--hf-samples", "4", "--fisher-models", "mlp,gpt2", "--json", str(js), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "x floor" in out
    rows = json.loads(js.read_text())["fisher"]["rows"]
    got = {(r["model"], r["method"]) for r in rows}
    assert {("gpt2", "reference loop"), ("gpt2", "fastewc auto"), ("gpt2", "floor: fwd+bwd, no Fisher"),
            ("mlp", "fastewc auto")} <= got
    auto = next(r for r in rows if r["model"] == "gpt2" and r["method"] == "fastewc auto")
    assert auto["per_sample_params"] == 0 and auto["samples"] == 4 and auto["vs_floor"] > 0
    assert "embedding+linear" in auto["coverage"] and auto["probe_seconds"] > 0


def test_bench_unknown_fisher_model(capsys):
    code, err = _err(capsys, ["bench", "--params", "1M", "--fisher-models", "resnet", "--repeats", "1"])
    assert code == 2 and "unknown ['resnet']" in err


def test_info_names_the_backend_per_device(capsys, monkeypatch):
    import fastewc.penalty.backends as backends
    from fastewc.penalty.backends import cpu_backend
    from fastewc.native.library import Library, ProcessCopy
    from fastewc.penalty.native import quadratic

    monkeypatch.delenv("FASTEWC_BACKEND", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastewc ") and f"torch {torch.__version__}" in out
    why = backends.cpu_backend_status(torch.device("cpu"))
    if why is None:
        assert f"backend 'cpu' (fused C kernel) available: {cpu_backend.library_path()}" in out
    assert "FASTEWC_BACKEND: (unset)" in out and f"kernel cache: {cpu_backend.cache_dir()}" in out
    from fastewc.fisher.rules import outer_cpu
    outer = outer_cpu.kernel()
    if outer.why is None:
        assert "Fisher on CPU: fused C kernel for Linear layers over sequences available" in out
        assert str(outer.library.path) in out
    else:
        assert f"Fisher on CPU: fused C kernel not available: {outer.why}; batched products instead" in out
    # Where the kernel cannot be built, the reason is printed and what 'auto' takes instead.
    missing = Library(None, "no C compiler found (set CC, or install cc, gcc or clang)", None)
    monkeypatch.setattr(quadratic, "_process", ProcessCopy(lambda force: missing, lambda k: False))  # no compiler here
    monkeypatch.setenv("FASTEWC_BACKEND", "torch")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "not available: no C compiler found (set CC, or install cc, gcc or clang); 'auto' takes 'torch'" in out
    assert "FASTEWC_BACKEND: torch" in out


def test_side_by_side_rounds_run_every_case_once_in_orders_that_vary():
    from fastewc.bench.timing import time_side_by_side

    def runs(repeats):
        calls = []
        cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
        times = time_side_by_side(cases, repeats=repeats, warmup=0)
        assert {k: len(v) for k, v in times.items()} == {"a": repeats, "b": repeats, "c": repeats}
        return [tuple(calls[i:i + 3]) for i in range(0, len(calls), 3)]

    rounds = runs(12)
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    # no case always follows the same one: each is run right after each other case at least once
    follows = {(prev[-1] if k else None, r[0]) for k, (prev, r) in enumerate(zip([()] + rounds, rounds))}
    follows |= {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert {(x, y) for x in "abc" for y in "abc" if x != y} <= follows
    assert runs(12) == rounds  # seeded: a rerun times the same orders
