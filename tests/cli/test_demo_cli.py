"""``fastewc demo`` end to end with tiny settings: it runs, and writes valid JSON and PNG."""

import json

import pytest

pytest.importorskip("sklearn", reason="scikit-learn not installed (extra 'demo')")

from fastewc import cli  # noqa: E402
from fastewc.demo.data import permuted_digits, split_digits  # noqa: E402


def test_demo_tiny_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    code = cli.main(["demo", "--hidden", "16", "--epochs", "1", "--tasks", "3", "--fisher-samples", "8",
                     "--lambdas", "10,1000", "--json", str(js), "--plot", str(png), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "avg forgetting" in out
    data = json.loads(js.read_text())
    assert data["benchmark"] == "permuted-digits"
    assert set(data["methods"]) == {"finetune", "ewc", "online_ewc", "ewc_exact", "ewc_sampled", "ewc_tracked",
                                    "stream_ewc"}
    for r in data["methods"].values():
        assert len(r["matrix"]) == 3 and all(len(row) == 3 for row in r["matrix"])
        assert 0.0 <= r["avg_accuracy"] <= 1.0
    assert data["lambda_sweep"]["best_lambda"] in (10.0, 1000.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_split_demo_runs(tmp_path, scenario, capsys):
    code = cli.main(["demo", "--benchmark", "split", "--scenario", scenario, "--hidden", "16", "--epochs", "1",
                     "--methods", "finetune,ewc", "--fisher-samples", "8", "--json", str(tmp_path / "s.json"), "--quiet"])
    assert code == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["benchmark"] == f"split-digits-{scenario}-incremental" and len(data["tasks"]) == 5


def test_merge_demo_runs_every_method(tmp_path, capsys):
    code = cli.main(["demo", "--merge", "--hidden", "32", "--epochs", "3", "--fisher-samples", "16", "--seeds", "0",
                     "--json", str(tmp_path / "m.json"), "--quiet"])
    assert code == 0 and "Fisher, exact" in capsys.readouterr().out
    data = json.loads((tmp_path / "m.json").read_text())
    assert set(data["methods"]) == {"initialisation", "fine-tuned, own task", "average", "task arithmetic",
                                    "Fisher, exact", "Fisher, sampled", "Fisher, empirical", "Fisher, batch-squared"}
    assert all(0.0 <= a <= 1.0 for r in data["methods"].values() for a in r["accuracy"])
    # each fine-tuned copy learned its own task: better than the shared initialisation there
    assert data["methods"]["fine-tuned, own task"]["mean"] > data["methods"]["initialisation"]["mean"]


def test_task_construction():
    perm = permuted_digits(3, seed=0)
    assert len(perm) == 3 and perm[0].x_train.shape[1] == 64
    assert not (perm[1].x_train == perm[0].x_train).all()  # a real permutation
    assert (perm[1].y_train == perm[0].y_train).all()
    split = split_digits("task")
    assert [t.classes for t in split] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert all(set(t.y_train.tolist()) == {0, 1} for t in split)
    assert all(t.classes == (0, 1) for t in split_digits("domain"))
