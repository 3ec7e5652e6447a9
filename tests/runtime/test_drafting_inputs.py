"""What the drafting and KV-window options refuse, and what `run --json` reports of them: a corrupted draft
artifact, a draft of the other format, a window past the trained context, counts that are not numbers (SDK
and CLI), on the tiny GGUF and ONNX artifacts."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from typer.testing import CliRunner

from edgekit import api
from edgekit.cli.main import app
from edgekit.errors import CorruptFileError, InputError

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime missing")
runner = CliRunner()
GREEDY = ["--temp", "0", "-t", "1"]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory):
    from edgekit.converters.formats.base import ConvertRecipe

    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    return api.convert(tiny_llama, "onnx", output=out, recipe=ConvertRecipe(bits=32)).path


def run(*args: object) -> tuple[int, str]:
    """(exit code, the output on one line: rich wraps long lines)."""
    res = runner.invoke(app, ["run", *map(str, args)])
    return res.exit_code, " ".join(res.output.split())


def corrupted(artifact, dest, name):
    """A copy of ``artifact`` with one byte of ``name`` flipped after convert (its manifest unchanged)."""
    broken = shutil.copytree(artifact, dest)
    with open(broken / name, "r+b") as fh:
        fh.seek(-100, 2)
        byte = fh.read(1)
        fh.seek(-100, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return broken


@needs_llama
def test_a_corrupted_gguf_draft_folder_is_refused_naming_the_file(tiny_gguf, tmp_path):
    broken = corrupted(tiny_gguf, tmp_path / "draft", "model.gguf")
    code, out = run(tiny_gguf, "--draft", broken, "-p", "hi", "-n", "2", *GREEDY)
    assert code == CorruptFileError.exit_code and "Traceback" not in out, out
    assert f"{broken / 'model.gguf'} changed since it was converted" in out and "re-run 'edgekit convert'" in out
    with pytest.raises(CorruptFileError, match="model.gguf changed since it was converted"):
        api.open_backend(tiny_gguf, draft=broken, n_threads=1)
    bare = shutil.copy(broken / "model.gguf", tmp_path / "bare.gguf")  # a bare file has nothing to check against
    with api.open_backend(tiny_gguf, draft=bare, n_threads=1) as b:
        assert b.info["speculative"]["draft_path"] == str(tmp_path / "bare.gguf")


@needs_ort
def test_a_corrupted_onnx_draft_folder_is_refused_naming_the_file(tiny_onnx, tmp_path):
    from edgekit.runtime.base import draft_model_file

    broken = corrupted(tiny_onnx, tmp_path / "draft", "model.onnx")
    with pytest.raises(CorruptFileError, match="model.onnx changed since it was converted"):
        draft_model_file(broken, "onnx")
    assert draft_model_file(tiny_onnx, "onnx") == (tiny_onnx / "model.onnx").resolve()


@needs_llama
def test_a_window_past_the_trained_context_is_refused(tiny_gguf):
    # the tiny model is trained for 1024 positions (max_position_embeddings, the GGUF's context_length)
    message = "--kv-window 2048 is longer than the 1024 positions model.gguf was trained for; use at most 1024"
    with pytest.raises(InputError, match=message):
        api.open_backend(tiny_gguf, kv_window=2048, n_threads=1)
    code, out = run(tiny_gguf, "--kv-window", "2048", "-p", "hi", "-n", "2", *GREEDY)
    assert code == InputError.exit_code and out.endswith(message), out
    with api.open_backend(tiny_gguf, kv_window=1024, n_threads=1) as b:
        assert b.info["speculative"]["kv_window"] == 1024


@needs_llama
@pytest.mark.parametrize("draft", ["folder", "file"])
def test_an_onnx_draft_of_a_gguf_target_says_drafts_are_gguf(tiny_gguf, tiny_onnx, draft):
    given = tiny_onnx if draft == "folder" else tiny_onnx / "model.onnx"
    code, out = run(tiny_gguf, "--draft", given, "-p", "hi", "-n", "2", *GREEDY)
    assert code == InputError.exit_code and "Traceback" not in out, out
    assert f"the draft {given} is ONNX, not GGUF; a draft must be GGUF like the target" in out
    assert "edgekit convert MODEL --draft-for MODEL" in out


def test_a_draft_of_the_other_format_or_no_model_says_what_a_draft_must_be(tiny_gguf, tmp_path):
    from edgekit.runtime.base import draft_model_file

    with pytest.raises(InputError, match="is GGUF, not ONNX; a draft must be ONNX like the target.*--to onnx"):
        draft_model_file(tiny_gguf / "model.gguf", "onnx")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(InputError, match="the draft notes.txt is not a GGUF model file; a draft must be GGUF"):
        draft_model_file(notes, "gguf")


@pytest.mark.parametrize("fmt", [pytest.param("gguf", marks=needs_llama), pytest.param("onnx", marks=needs_ort)])
@pytest.mark.parametrize(("option", "value"), [("kv_window", "abc"), ("kv_sinks", "x"), ("n_draft", "x"),
                                               ("kv_window", 64.5), ("n_ctx", "512")])
def test_counting_options_must_be_whole_numbers(tiny_gguf, tiny_onnx, fmt, option, value):
    flag = {"n_ctx": "--ctx"}.get(option, "--" + option.replace("_", "-"))
    with pytest.raises(InputError, match=rf"^{option}= \({flag}\) must be a whole number, got {value!r}, a {type(value).__name__}$"):
        api.open_backend(tiny_gguf if fmt == "gguf" else tiny_onnx, n_threads=1, **{option: value})


@needs_llama
def test_counting_options_are_checked_by_the_llamacpp_backend_itself_and_on_the_cli(tiny_gguf):
    from edgekit.runtime.llamacpp import LlamaCppBackend

    with pytest.raises(InputError, match=r"kv_window= \(--kv-window\) must be a whole number, got 'abc', a str"):
        LlamaCppBackend(tiny_gguf / "model.gguf", kv_window="abc")
    code, out = run(tiny_gguf, "-p", "hi", "-n", "2", "-O", "kv_window=abc", *GREEDY)
    assert code == InputError.exit_code and out.endswith("kv_window= (--kv-window) must be a whole number, got 'abc', a str")


PROMPT = " ".join(["the river runs down to the sea and the sea is wide"] * 8)  # well past a 64-token window


@pytest.mark.parametrize("fmt", [pytest.param("gguf", marks=needs_llama), pytest.param("onnx", marks=needs_ort)])
def test_run_json_reports_the_kv_window_as_the_text_output_does(tiny_gguf, tiny_onnx, fmt):
    art = tiny_gguf if fmt == "gguf" else tiny_onnx
    res = runner.invoke(app, ["run", str(art), "--raw", "-p", PROMPT, "-n", "8", "--kv-window", "64",
                              "--speculative", "ngram", "--json", *GREEDY])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    kv = out["kv_window"]
    assert kv["size"] == 64 and kv["sinks"] == 4 and 0 < kv["held"] <= 64
    assert kv["evicted"] > 0 and kv["held"] + kv["evicted"] >= out["prompt_tokens"]
    assert out["speculative"]["mode"] == "ngram"
    plain = runner.invoke(app, ["run", str(art), "--raw", "-p", "hi", "-n", "2", "--json", *GREEDY])
    assert plain.exit_code == 0 and "kv_window" not in json.loads(plain.stdout), plain.output


@needs_ort
def test_a_corrupted_onnx_draft_is_refused_when_the_target_loads(tiny_onnx, tmp_path):
    broken = corrupted(tiny_onnx, tmp_path / "draft", "model.onnx")
    code, out = run(tiny_onnx, "--draft", broken, "-p", "hi", "-n", "2", *GREEDY)
    assert code == CorruptFileError.exit_code and f"{broken / 'model.onnx'} changed since it was converted" in out, out
