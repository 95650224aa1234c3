"""The README's quick start runs as written (its python blocks, executed in order)."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "import" in b]  # signature listings are not programs
    assert runnable, "README has no runnable python block"
    monkeypatch.chdir(tmp_path)  # the quick start writes ewc.pt
    for code in runnable:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert os.path.exists("ewc.pt")


def test_quickstart_example_runs(capsys):
    import runpy

    runpy.run_path(str(README.parent / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    acc = [float(x) for x in re.findall(r"accuracy on A (\d\.\d+)", out)]
    assert len(acc) == 3
    assert acc[2] > acc[1], f"EWC should keep more of task A than plain fine-tuning:\n{out}"


def test_readme_quick_start_on_a_model_with_a_frozen_layer(tmp_path, monkeypatch):
    # The quick start as written, with the first layer frozen right after the model is built: the
    # Fisher then covers the trainable parameters only, while the anchor snapshot names them all.
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                 if "ewc.register_task" in b)
    lines = block.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("model = "))
    lines.insert(at + 1, "model[0].requires_grad_(False)")
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__readme__"}
    exec(compile("\n".join(lines), str(README), "exec"), scope)
    fisher, ewc, model = scope["fisher"], scope["ewc"], scope["model"]
    assert "0.weight" not in fisher and "2.weight" in fisher
    assert set(ewc.protected_names) == set(fisher)
    assert model[0].weight.grad is None  # the frozen layer got no penalty gradient
