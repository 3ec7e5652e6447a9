"""Issue 13: a prompt that is not valid UTF-8 (bytes from ``-p`` reach Python as lone surrogates) is refused
once, at every backend's public entry, with the byte and its offset; never a tokenizer's TypeError."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import api
from edgekit.errors import InputError
from edgekit.runtime.base import Backend, SamplingConfig, check_prompt, check_text
from tests.edgekit.test_bad_input import assert_clean_error, run_cli


@pytest.mark.parametrize(("text", "says"), [
    ("\udcff", "byte 0xff at position 0"),
    ("caf\u00e9 \udcfe!", "byte 0xfe at position 6"),  # é is two bytes: the offset counts bytes
    ("ok \ud800", r"lone surrogate U\+D800 at position 3"),
])
def test_invalid_utf8_names_the_byte_and_its_offset(text, says):
    with pytest.raises(InputError, match=f"the prompt is not valid UTF-8 \\({says}\\); give UTF-8 text"):
        check_text(text)


def test_valid_text_and_messages_pass():
    check_text("plain, accents \u00e9\u00e8, emoji \U0001f600, CJK \u4e2d\u6587")
    check_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "\u00e9t\u00e9"}])


@pytest.mark.parametrize(("prompt", "says"), [
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "a\udc80"}],
     r"message 1 \(user\) is not valid UTF-8 \(byte 0x80 at position 1\)"),
    ([{"role": "user\udcc3", "content": "hi"}], "the role of message 0 is not valid UTF-8"),
    ([{"role": "user"}], r"message 0 of the prompt must be a \{'role': ..., 'content': ...\} mapping"),
    ([{"role": "user", "content": b"bytes"}], "the prompt must be text"),
    (b"bytes", "the prompt must be text or a list of"),
])
def test_messages_are_checked_field_by_field(prompt, says):
    with pytest.raises(InputError, match=says):
        check_prompt(prompt)


class _Echo(Backend):
    """A backend that records what reached it: the check must run before its own code."""

    name = "echo-test"
    seen: list = []

    def tokenize(self, text, add_special=True):
        self.seen.append(text)
        return [ord(c) for c in text]

    def generate(self, prompt, sampling, stats=None):
        self.seen.append(prompt)
        yield "x"

    def logits(self, tokens):
        return np.zeros((len(tokens), 4), np.float32)

    @property
    def n_vocab(self):
        return 4


def test_every_backend_subclass_checks_at_its_public_entries():
    b = _Echo()
    with pytest.raises(InputError, match="byte 0xff"):
        b.generate("a\udcff", SamplingConfig())
    with pytest.raises(InputError, match="the text is not valid UTF-8"):
        b.tokenize("\udcff")
    assert b.seen == []
    assert list(b.generate("fine", SamplingConfig())) == ["x"] and b.tokenize("ab") == [97, 98]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prompt-onnx") / "tiny-onnx"
    return api.convert(tiny_llama, "onnx", output=out, recipe=api.ConvertRecipe(bits=4)).path


def test_onnx_run_refuses_bad_utf8(tiny_onnx):
    for extra in ((), ("--raw",)):
        code, out = run_cli("run", tiny_onnx, "-p", "hi \udcff", "-n", "2", *extra)
        assert_clean_error(code, out, "the prompt is not valid UTF-8 (byte 0xff at position 3)")
        assert code == InputError.exit_code


@pytest.mark.llamacpp
def test_gguf_run_refuses_bad_utf8(tiny_gguf):
    code, out = run_cli("run", tiny_gguf, "-p", "\udcc3(", "-n", "2", "--raw")
    assert_clean_error(code, out, "the prompt is not valid UTF-8 (byte 0xc3 at position 0)")
    code, out = run_cli("run", tiny_gguf, "-p", "hello", "--system", "sys\udcff", "-n", "2")
    assert_clean_error(code, out, "message 0 (system) is not valid UTF-8 (byte 0xff at position 3)")


def test_sdk_generate_refuses_bad_utf8(tiny_onnx):
    with pytest.raises(InputError, match="not valid UTF-8"):
        list(api.generate(tiny_onnx, "\udcff", SamplingConfig(max_tokens=2)))


def test_bytes_on_the_real_command_line(tiny_onnx):
    """Not a simulation: argv carries the raw byte 0xff, as a shell passes it."""
    edgekit = Path(sys.executable).parent / "edgekit"
    p = subprocess.run([os.fsencode(edgekit), b"run", os.fsencode(tiny_onnx), b"-p", b"caf\xc3\xa9 \xff", b"-n", b"2"],
                       capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == InputError.exit_code, err
    err = "\n".join(ln for ln in err.splitlines() if "CPUs are busy with other programs" not in ln)  # a loaded host
    assert err.strip() == ("error: the prompt is not valid UTF-8 (byte 0xff at position 6); give UTF-8 text "
                           "(check the terminal's or the file's encoding)")
