"""``edgekit quickstart --diffusion`` end to end on the shipped digits teacher and student: converted to
8-bit ONNX with GPTQ, sampled, timed and scored (a small -n: the full run is bench/diffusion.py's)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from edgekit.cli.main import app  # noqa: E402

runner = CliRunner()


def test_quickstart_diffusion_json(tmp_path):
    res = runner.invoke(app, ["quickstart", "--diffusion", "--json", "--images", "100", "--home", str(tmp_path), "-t", "1"])
    assert res.exit_code == 0, res.output
    fig = json.loads(res.output)
    assert set(fig["fid"]) == {"teacher_50", "teacher_4", "teacher_2", "student_4"}  # a DDIM student: its 4 steps
    # the shipped models draw the digits they are asked for, the distilled student in 4 steps too
    assert all(v > 0.8 for v in fig["label_agreement"].values()), fig
    assert fig["fid"]["student_4"] < fig["fid"]["teacher_2"], fig
    assert fig["latency"]["teacher"]["steps"] == 50 and fig["latency"]["student"]["steps"] == 4
    grid = tmp_path / "digits-quickstart.png"
    assert grid.stat().st_size > 0 and str(grid) == fig["grid"]
    arts = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert arts == ["digits-unet-4step-onnx-w8-gptq", "digits-unet-onnx-w8-gptq"]
    manifest = json.loads((tmp_path / "models" / arts[0] / "edgekit.json").read_text())
    assert manifest["task"] == "diffusion" and manifest["recipe"]["method"] == "gptq"


def test_diffusion_options_need_diffusion():
    res = runner.invoke(app, ["quickstart", "--json"])
    assert res.exit_code != 0 and "--diffusion" in res.output
