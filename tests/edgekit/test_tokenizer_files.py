"""A corrupt tokenizer file in a model folder: convert fails with a one-line corrupt-file error (exit 3) that
names the file and the fix, before any work and leaving nothing behind; never an internal error."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.errors import CorruptFileError
from edgekit.model import HFCheckpoint


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    dest = tmp_path / "badtok"
    shutil.copytree(tiny_llama, dest)
    return dest


def _convert(folder, out, *extra):
    return CliRunner().invoke(app, ["convert", str(folder), "-t", "1", "-o", str(out), *extra])


def _assert_one_line(r, needle):
    assert r.exit_code == CorruptFileError.exit_code, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.output
    assert "re-download the tokenizer files" in errors[0]


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("extra", [(), ("--to", "onnx"), ("--method", "gptq", "--calib-samples", "2",
                                                           "--calib-seqlen", "16")],
                         ids=["gguf", "onnx", "gguf-gptq"])
def test_corrupt_tokenizer_json_is_a_one_line_corrupt_file_error(model_copy, tmp_path, name, extra):
    (model_copy / name).write_text('{"version": ')
    r = _convert(model_copy, tmp_path / "out", *extra)
    _assert_one_line(r, f"{model_copy / name} is not valid JSON (line")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badtok"]  # no scratch folder either


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]"], ids=["not-utf8", "not-an-object"])
def test_tokenizer_json_that_is_not_a_json_object(model_copy, tmp_path, content):
    (model_copy / "tokenizer.json").write_bytes(content)
    r = _convert(model_copy, tmp_path / "out")
    _assert_one_line(r, str(model_copy / "tokenizer.json"))


def test_tokenizer_json_without_a_vocabulary(model_copy, tmp_path):
    tj = json.loads((model_copy / "tokenizer.json").read_text())
    del tj["model"]["vocab"]
    (model_copy / "tokenizer.json").write_text(json.dumps(tj))
    r = _convert(model_copy, tmp_path / "out")
    _assert_one_line(r, "tokenizer.json is not a tokenizer the tokenizers library can read (Missing vocab")
    assert not (tmp_path / "out").exists()


def test_sdk_require_tokenizer_and_tokenizer_config(model_copy):
    (model_copy / "tokenizer_config.json").write_text("{oops")
    ckpt = HFCheckpoint.open(model_copy)
    with pytest.raises(CorruptFileError, match=r"tokenizer_config.json is not valid JSON \(line 1"):
        ckpt.require_tokenizer()
    with pytest.raises(CorruptFileError, match="re-download the tokenizer files"):
        _ = ckpt.tokenizer_config


@pytest.mark.parametrize("extra", [(), ("--to", "onnx")], ids=["gguf", "onnx"])
def test_tokenizer_json_that_is_json_but_not_a_tokenizer(model_copy, tmp_path, extra):
    # an onnx convert copied it beside the model, and run then failed inside the tokenizers library
    (model_copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    r = _convert(model_copy, tmp_path / "out", *extra)
    _assert_one_line(r, f"{model_copy / 'tokenizer.json'} is not a tokenizer the tokenizers library can read")
    assert not (tmp_path / "out").exists()


def test_a_folder_tokenizer_that_the_library_refuses_is_a_corrupt_file_error(tiny_llama, tmp_path):
    # what an artifact converted before convert checked its tokenizer holds (its sha256 matches)
    from edgekit.runtime.tokenizer import FolderTokenizer

    folder = tmp_path / "art"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece"}}')
    with pytest.raises(CorruptFileError, match=r"tokenizer.json is not a tokenizer the tokenizers library can read "
                                               r"\(.*\); re-run 'edgekit convert'"):
        FolderTokenizer(folder)
