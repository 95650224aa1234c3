"""``fastewc merge`` over files gives what ``fisher_merge`` gives in memory; bad input exits 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastewc import cli, fisher_merge, save_fisher

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def test_merge_command(tmp_path, capsys):
    models, fishers, mpaths, fpaths = [], [], [], []
    for i in range(2):
        torch.manual_seed(i)
        m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        f = {n: torch.rand_like(p) for n, p in m.named_parameters()}
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / f"m{i}.safetensors"))
        save_fisher(f, tmp_path / f"f{i}")
        models.append(m)
        fishers.append(f)
        mpaths.append(str(tmp_path / f"m{i}.safetensors"))
        fpaths.append(str(tmp_path / f"f{i}"))
    code = cli.main(["merge", "--models", *mpaths, "--fishers", *fpaths, "--out", str(tmp_path / "out"),
                     "--weights", "1,3"])
    assert code == 0 and "Fisher-merged 4 tensors" in capsys.readouterr().out
    want, _ = fisher_merge(models, fishers, weights=[1, 3])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as h:
        assert all(torch.equal(h.get_tensor(n), want[n]) for n in want)
    code = cli.main(["merge", "--models", *mpaths, "--fishers", fpaths[0], "--out", str(tmp_path / "o2")])
    assert code == 2 and "one Fisher file per model" in capsys.readouterr().err
    code = cli.main(["merge", "--models", *mpaths, "--fishers", *fpaths, "--out", str(tmp_path / "o3"),
                     "--weights", "1,x"])
    assert code == 2 and "error" in capsys.readouterr().err
