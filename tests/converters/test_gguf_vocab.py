"""The GGUF tokenizer block says what transformers does: the chat template it applies, and how llama.cpp's
SentencePiece dummy prefix compares with transformers' (written where it can match, warned where it cannot)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from edgekit import api
from tests.helpers import build_tiny_model

# texts with and without leading whitespace (every WikiText line starts with a space)
TEXTS = ["Hello world", "x", "a  b", " Hello", "  two spaces", " = Valkyria Chronicles = \n", "\u2581marked", ""]


def _tiny(folder: Path, arch: str, tokenizer: str) -> Path:
    return build_tiny_model(folder, arch, hidden=64, ffn=128, layers=1, heads=2, kv_heads=1, tokenizer=tokenizer)


def _convert(src: Path, out: Path) -> api.Artifact:
    return api.convert(src, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="F32"))


def _field(path: Path, key: str):
    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def test_the_chat_template_is_the_one_transformers_applies(tmp_path):
    import transformers

    src = _tiny(tmp_path / "src", "Qwen2ForCausalLM", "bpe")
    stale = json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    jinja = stale.replace("+ '\n'", "+ ' JINJA\n'")
    assert jinja != stale
    (src / "chat_template.jinja").write_text(jinja)
    assert transformers.AutoTokenizer.from_pretrained(src).chat_template == jinja  # the file wins
    art = _convert(src, tmp_path / "gguf")
    assert _field(art.model_file, "tokenizer.chat_template") == jinja


def _llama_cpp_ids(gguf_file: Path, texts: list[str]) -> list[list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts]


def test_sentencepiece_dummy_prefix_matches_transformers_or_is_warned(tmp_path):
    import transformers

    src = _tiny(tmp_path / "src", "LlamaForCausalLM", "spm")  # tokenizer.model only: Metaspace "first"
    art = _convert(src, tmp_path / "first")
    hf = transformers.AutoTokenizer.from_pretrained(src)
    want = [hf(t)["input_ids"] for t in TEXTS]
    got = _llama_cpp_ids(art.model_file, TEXTS)
    differ = [t for t, w, g in zip(TEXTS, want, got, strict=True) if w != g]
    # llama.cpp has no "first": text that starts with a space (or '▁') gets one more '▁'; so it is said
    assert differ == [" Hello", "  two spaces", " = Valkyria Chronicles = \n", "\u2581marked"]
    assert _field(art.model_file, "tokenizer.ggml.add_space_prefix") is None
    notes = [n for n in art.notes if "SentencePiece" in n]
    assert len(notes) == 1 and notes[0].startswith("warning: ") and "ONNX" in notes[0], art.notes

    tc = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tc, "add_prefix_space": False}))  # "never"
    art = _convert(src, tmp_path / "never")
    hf = transformers.AutoTokenizer.from_pretrained(src)
    assert _llama_cpp_ids(art.model_file, TEXTS) == [hf(t)["input_ids"] for t in TEXTS]
    assert _field(art.model_file, "tokenizer.ggml.add_space_prefix") is False
    assert not any("SentencePiece" in n for n in art.notes)


def test_byte_level_vocabularies_get_no_prefix_warning(tmp_path):
    art = _convert(_tiny(tmp_path / "src", "Qwen2ForCausalLM", "bpe"), tmp_path / "gguf")
    assert not any("SentencePiece" in n for n in art.notes)
    assert _field(art.model_file, "tokenizer.ggml.add_space_prefix") is None


def test_special_tokens_are_the_ones_transformers_names(tmp_path):
    """A BOS named only in special_tokens_map.json (gguf's SpecialVocab reads tokenizer_config.json alone and
    fell back to config.json's bos_token_id) and a SentencePiece <s> of the vocabulary proper."""
    import transformers

    src = _tiny(tmp_path / "src", "Qwen2ForCausalLM", "bpe")
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("bos_token", None)
    tc.pop("added_tokens_decoder", None)  # else transformers leaves special_tokens_map.json alone
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_end|>"}))
    hf = transformers.AutoTokenizer.from_pretrained(src)
    assert hf.bos_token == "<|im_end|>"
    assert json.loads((src / "config.json").read_text()).get("bos_token_id") != hf.bos_token_id
    art = _convert(src, tmp_path / "bpe")
    assert _field(art.model_file, "tokenizer.ggml.bos_token_id") == hf.bos_token_id
    assert _field(art.model_file, "tokenizer.ggml.eos_token_id") == hf.eos_token_id

    src = _tiny(tmp_path / "spm", "LlamaForCausalLM", "spm")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 5, "eos_token_id": 6}))  # stale ids
    hf = transformers.AutoTokenizer.from_pretrained(src)
    art = _convert(src, tmp_path / "spm-gguf")
    got = (_field(art.model_file, "tokenizer.ggml.bos_token_id"), _field(art.model_file, "tokenizer.ggml.eos_token_id"))
    assert got == (hf.bos_token_id, hf.eos_token_id) != (5, 6)
