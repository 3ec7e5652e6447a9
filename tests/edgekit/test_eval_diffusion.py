"""``edgekit eval`` / ``evaluate_diffusion`` on a diffusion pipeline: the fields it prints and records, and
the one-line errors for what makes no sense (a missing path, a language model, options of the other kind)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from typer.testing import CliRunner

from edgekit.artifact import SCHEMA, write_manifest
from edgekit.cli.main import app
from edgekit.errors import InputError, UnsupportedError
from edgekit.evaluate import evaluate_diffusion, is_diffusion
from tests.converters.diffusion.tiny import tiny_pipeline

if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed (pip install 'edgekit[diffusion]')", allow_module_level=True)

runner = CliRunner()
FIELDS = {"fid", "precision", "recall", "label_agreement", "n", "steps", "sampler", "seconds", "floor"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("dx") / "tiny-pipe", sample_size=16)


def invoke(*args):
    # a wide terminal: the first line names the folder, whose temporary path would otherwise wrap the line
    return runner.invoke(app, ["eval", *map(str, args)], env={"COLUMNS": "400"}, terminal_width=400)


def test_eval_prints_the_metrics_of_a_pipeline(pipe):
    res = invoke(pipe, "--images", 20, "--steps", 2)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    for word in ("digits-FID", "floor", "precision", "recall", "label agreement", "ddim 2 steps", "20 images"):
        assert word in text, res.stdout
    data = json.loads(invoke(pipe, "--images", 20, "--steps", 2, "--json").stdout)
    assert FIELDS <= data.keys() and data["n"] == 20 and data["steps"] == 2 and data["sampler"] == "ddim"
    assert 0 <= data["precision"] <= 1 and 0 <= data["recall"] <= 1 and 0 <= data["label_agreement"] <= 1
    assert data["fid"] > 10 * data["floor"]  # random weights draw noise, far from digits


def test_evaluate_is_a_function_of_its_seed_and_records_into_an_artifact(pipe, tmp_path):
    art = tmp_path / "tiny-art"
    shutil.copytree(pipe, art)
    write_manifest(art, {"schema": SCHEMA, "format": "diffusers", "task": "diffusion",
                         "files": {"model": "unet/diffusion_pytorch_model.safetensors"}})
    assert is_diffusion(art) and is_diffusion(pipe)
    a = evaluate_diffusion(art, n=20, steps=1, seed=3)
    b = evaluate_diffusion(pipe, n=20, steps=1, seed=3)
    c = evaluate_diffusion(pipe, n=20, steps=1, seed=4)
    assert a["fid"] == b["fid"] and a["fid"] != c["fid"]
    evals = json.loads((art / "edgekit.json").read_text())["eval"]
    assert len(evals) == 1 and evals[0]["fid"] == a["fid"] and evals[0]["task"] == "diffusion"
    assert evals[0]["steps"] == 1 and "measured" in evals[0]
    shown = runner.invoke(app, ["show", str(art)])
    assert shown.exit_code == 0 and f"digits-FID {a['fid']:.2f}" in shown.stdout, shown.output
    listed = runner.invoke(app, ["ls", "--dir", str(tmp_path)])
    assert listed.exit_code == 0 and f"FID {a['fid']:.1f} ddim 1" in listed.stdout, listed.output


@pytest.fixture(scope="module")
def llm(tiny_llama, tmp_path_factory):
    from edgekit import api

    out = tmp_path_factory.mktemp("dx-llm") / "tiny-f16"
    api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="F16"))
    return out


def test_bad_inputs_are_one_line_errors(pipe, llm, tmp_path):
    cases = [
        ((tmp_path / "missing",), "does not exist; give an artifact folder, a model file or a diffusers pipeline"),
        ((llm, "--steps", 4), "--steps is for diffusion models"),
        ((pipe, "--text", tmp_path / "t.txt"), "--text is for language models"),
        ((pipe, "--images", 5), "--images must be at least 10"),
        ((pipe, "--sampler", "euler"), "--sampler must be one of ddim, consistency"),
    ]
    for args, msg in cases:
        res = invoke(*args)
        assert res.exit_code != 0, args
        assert msg in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    res = invoke(llm, "--no-record", "--chunks", 2)  # no --text: the sample edgekit ships, and it says so
    assert res.exit_code == 0 and "sample.txt" in res.stdout and "English sample edgekit ships" in res.stderr, res.output
    with pytest.raises(UnsupportedError, match="language model, not a diffusion model"):
        evaluate_diffusion(llm, n=20)
    with pytest.raises(InputError):
        evaluate_diffusion(tmp_path / "missing")
