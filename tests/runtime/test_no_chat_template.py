"""A model without a chat template: every runtime refuses chat messages with the same one line (pass --raw),
as ONNX always did; none guesses a format (llama.cpp's ChatML fallback) or sends the message as raw text
(MLC's plain ``LM`` conversation), and the checkpoint runtime reports no "internal error"."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from edgekit import api
from edgekit.chat_template import NO_CHAT_TEMPLATE
from edgekit.errors import InputError
from edgekit.runtime.base import SamplingConfig
from tests.edgekit.test_bad_input import assert_clean_error, run_cli

FORMATS = ["hf", pytest.param("gguf", marks=pytest.mark.llamacpp), "onnx", "mlc"]
MESSAGES = [{"role": "user", "content": "hi"}]


def _without_template(src: Path, dst: Path, keep_config: bool) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = dst / "tokenizer_config.json"
    if keep_config:
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("chat_template", None)
        cfg_file.write_text(json.dumps(cfg))
    else:  # only tokenizer.json: no special tokens' names, no template
        cfg_file.unlink()
    return dst


RECIPES = {"gguf": api.ConvertRecipe(preset="Q8_0"), "onnx": api.ConvertRecipe(bits=32),
           "mlc": api.ConvertRecipe(extra={"quant": "q0f32"})}


@pytest.fixture(scope="module")
def no_template(tiny_llama, tmp_path_factory):
    """The tiny Llama without its chat template: ``no_template(fmt)`` is the checkpoint ("hf") or its
    artifact in ``fmt``, converted on first use."""
    root = tmp_path_factory.mktemp("no-template")
    arts = {"hf": _without_template(tiny_llama, root / "ckpt", keep_config=True)}

    def get(fmt: str) -> Path:
        if fmt not in arts:
            arts[fmt] = api.convert(arts["hf"], fmt, output=root / f"art-{fmt}", recipe=RECIPES[fmt]).path
        return arts[fmt]

    return get


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_refuses_chat_without_a_template_in_one_line(no_template, fmt):
    code, out = run_cli("run", no_template(fmt), "-p", "hi", "-n", "2", "-t", "1")
    assert_clean_error(code, out, NO_CHAT_TEMPLATE)
    assert code == InputError.exit_code
    assert "internal error" not in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_text_still_runs_without_a_template(no_template, fmt):
    code, out = run_cli("run", no_template(fmt), "-p", "hi", "--raw", "-n", "2", "-t", "1", "--temp", "0", "--json")
    assert code == 0, out
    assert json.loads(out)["prompt_tokens"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_sdk_generate_refuses_messages_without_a_template(no_template, fmt):
    with api.open_backend(no_template(fmt), n_ctx=64, n_threads=1) as be, \
            pytest.raises(InputError, match=r"no chat template; pass raw text \(--raw\)"):
        list(be.generate(MESSAGES, SamplingConfig(max_tokens=2, temperature=0)))


def test_a_checkpoint_with_only_tokenizer_json_is_refused_the_same_way(tiny_llama, tmp_path):
    ckpt = _without_template(tiny_llama, tmp_path / "tokonly", keep_config=False)
    code, out = run_cli("run", ckpt, "-p", "hi", "-n", "2", "-t", "1")
    assert_clean_error(code, out, NO_CHAT_TEMPLATE)
    assert code == InputError.exit_code


def test_chat_repl_says_pass_raw_and_goes_on(no_template, monkeypatch):
    from edgekit.cli import repl

    lines = iter(["hello"])

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    said: list[str] = []
    monkeypatch.setattr(repl, "say", lambda _file, text, *a, **k: said.append(str(text)))
    messages = repl.chat_repl(lambda: api.open_backend(no_template("hf"), n_ctx=64, n_threads=1),
                              SamplingConfig(max_tokens=2), read=read, out=io.StringIO())
    assert messages == []  # the refused turn is not kept
    assert any(NO_CHAT_TEMPLATE in s for s in said), said
