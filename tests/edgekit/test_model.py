"""edgekit/model.py: a config.json without ``architectures`` is refused with the line to add, and gguf's
warning about sequence-pair separators (a template edgekit never uses) stays off the terminal."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from edgekit.errors import CorruptFileError, UnsupportedError
from edgekit.model import check_architectures
from tests.edgekit.test_bad_input import assert_clean_error, run_cli


@pytest.mark.parametrize(("model_type", "error", "says"), [
    ("llama", CorruptFileError, """has no 'architectures'; its model_type 'llama' is LlamaForCausalLM: add """
                                """"architectures": ["LlamaForCausalLM"] to it"""),
    ("qwen2", CorruptFileError, '"architectures": ["Qwen2ForCausalLM"]'),
    ("mistral", CorruptFileError, '"architectures": ["MistralForCausalLM"]'),
    ("gemma", UnsupportedError, "its model_type 'gemma' is not a family edgekit converts (LlamaForCausalLM, "),
    (None, CorruptFileError, """names no model class (no 'architectures', no 'model_type'); add "architectures": """),
])
def test_a_config_without_architectures_names_the_class_to_add(model_type, error, says):
    cfg = {"model_type": model_type} if model_type else {}
    for config in (cfg, {**cfg, "architectures": []}):
        with pytest.raises(error) as info:
            check_architectures(config, "config.json")
        assert says in str(info.value)
    check_architectures({"architectures": ["LlamaForCausalLM"]}, "config.json")  # a list is spec_for's to judge


def test_cli_says_which_architectures_line_to_add(tiny_llama, tmp_path):
    ckpt = shutil.copytree(tiny_llama, tmp_path / "noarch")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["architectures"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for cmd in (("inspect", ckpt), ("convert", ckpt, "-o", tmp_path / "out"), ("run", ckpt, "-p", "hi")):
        code, out = run_cli(*cmd)
        assert_clean_error(code, out, '"architectures": ["LlamaForCausalLM"]')
        assert code == CorruptFileError.exit_code
    assert not (tmp_path / "out").exists()


def test_gguf_pair_separator_warning_is_dropped_and_others_kept(caplog):
    import edgekit.model  # noqa: F401 - installs the filter

    log = logging.getLogger("gguf.vocab")
    with caplog.at_level(logging.WARNING, logger="gguf.vocab"):
        log.warning("Unknown separator token %r in TemplateProcessing<pair>", "<s>")
        log.warning("Unknown second separator token '</s>' in TemplateProcessing<pair>")
        log.warning("Overriding EOS token '</s>' with '<s>' without EOT/EOM fallback!")
        log.warning("Unknown separator token '<s>' somewhere else")
    assert [r.getMessage() for r in caplog.records] == [
        "Overriding EOS token '</s>' with '<s>' without EOT/EOM fallback!",
        "Unknown separator token '<s>' somewhere else"]
