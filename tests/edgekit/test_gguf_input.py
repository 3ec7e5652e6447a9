"""A GGUF is an input for every format: ``edgekit convert model.gguf --to X`` imports it into a scratch
folder beside the output (removed afterwards, whatever happens) and converts that; the manifest names
the GGUF as the source."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.converters.formats.base import FORMATS
from edgekit.hashing import sha256_files

runner = CliRunner()
ARGS = {"gguf": ["--type", "Q8_0"], "onnx": ["--bits", "8"], "coreml": ["--bits", "16"], "mlc": ["--quant", "q4f16_1"],
        "aqlm": ["-O", "scheme=2x4", "--calib-samples", "4", "--calib-seqlen", "32"]}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    from edgekit import api

    d = tmp_path_factory.mktemp("gguf-in")
    art = api.convert(tiny_llama, "gguf", output=d / "art", recipe=api.ConvertRecipe(preset="F16"))
    return art.model_file.rename(d / "tiny.F16.gguf")


@pytest.mark.parametrize("fmt", FORMATS.names())
def test_every_format_takes_a_gguf(fmt, tiny_gguf, tmp_path):
    if fmt == "coreml":
        pytest.importorskip("coremltools")
    if fmt == "aqlm":
        pytest.importorskip("torch")
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(tiny_gguf), "--to", fmt, "-o", str(out), *ARGS[fmt]])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "edgekit.json").read_text())
    assert m["format"] == fmt and m["source"]["imported_from"] == "gguf"
    assert m["source"]["path"] == str(tiny_gguf.resolve()) and m["source"]["sha256"] == sha256_files([tiny_gguf])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch import left beside it
    if fmt == "gguf":  # the model keeps a name: the file's, not the scratch folder's ("model")
        from edgekit import api

        assert api.inspect(out)["name"] == "tiny.F16"


def test_a_refused_option_stops_before_the_import(tiny_gguf, tmp_path, monkeypatch):
    import edgekit.api as api_mod

    def no_import(*a, **k):
        raise AssertionError("imported before the options were checked")

    monkeypatch.setattr(api_mod, "import_gguf", no_import)
    r = runner.invoke(app, ["convert", str(tiny_gguf), "--to", "mlc", "--quant", "q9", "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "is not an MLC mode" in r.output
    existing = tmp_path / "there"
    existing.mkdir()
    r = runner.invoke(app, ["convert", str(tiny_gguf), "--to", "mlc", "-o", str(existing)])
    assert r.exit_code != 0 and "not an edgekit artifact" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]
