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
