"""edgekit neurons: neuron statistics and the TEAL/CATS quality table through the PyTorch reference."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from edgekit.cli.main import app


def test_neurons_reports_statistics_and_a_quality_cost_that_grows_with_sparsity(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["neurons", str(tiny_llama), "--calib-samples", "4", "--calib-seqlen", "64",
                                 "--chunks", "2", "--sparsity", "0.25,0.6", "-o", str(tmp_path / "n"), "-t", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "n" / "neurons.json").read_text())
    assert (tmp_path / "n" / "neurons.png").stat().st_size > 1000
    assert len(rep["layers"]) == 2 and all(0 <= layer["r2"] <= 1 for layer in rep["layers"])
    for method in ("teal", "cats"):
        rows = {q["sparsity"]: q for q in rep["quality"] if q["method"] == method}
        assert 0 < rows[0.25]["kl_mean"] < rows[0.6]["kl_mean"]  # more sparsity, further from the dense model
        assert rows[0.6]["top1_agreement"] < 1
    assert "TEAL" in r.output and "CATS" in r.output
