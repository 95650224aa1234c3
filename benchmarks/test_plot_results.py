"""``plot_results.py bench``: the figure of a ``fastewc bench --json`` result, drawn from the JSON
alone (both panels: the penalty and the Fisher). The scale figure is tested in
test_scale_smoke.py, from the JSON its quick run writes."""

import pytest

from fastewc import cli

import plot_results


def test_bench_figure_from_the_commands_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--params", "100k", "--tasks", "1", "--repeats", "1", "--fisher-samples", "4",
                     "--fisher-models", "mlp", "--json", str(js), "--quiet"]) == 0
    assert plot_results.main(["bench", str(js), str(png)]) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out
