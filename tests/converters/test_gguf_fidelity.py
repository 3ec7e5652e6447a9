"""GGUF files compute what transformers computes: config features llama.cpp needs written explicitly
(Llama 3 rope scaling, extra end-of-generation ids, added tokens) and the ones it cannot run (sliding windows)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgekit import api
from tests.helpers import build_tiny_model

TEXT = ("The river city grew around its bridges, and 1,204 people crossed them every day in 1887. Ferries ran at "
        "night, and the old toll houses still stand at both ends of the stone bridge.")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return folder


def _convert(model: Path, out: Path, preset: str = "F32"):
    return api.convert(model, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset=preset))


def _logits_gap(model: Path, gguf_file: Path) -> float:
    """Relative L2 distance of llama.cpp's logits from transformers' over TEXT."""
    from edgekit.runtime.llamacpp import LlamaCppBackend
    from edgekit.runtime.torch_ref import TorchBackend

    with LlamaCppBackend(gguf_file, n_ctx=128) as b:
        tokens = b.tokenize(TEXT)
        got = b.logits(tokens)
    want = TorchBackend(model).logits(tokens)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory) -> Path:
    folder = build_tiny_model(tmp_path_factory.mktemp("llama3") / "m", "LlamaForCausalLM", hidden=256, ffn=512)
    return _edit_config(folder, rope_parameters=LLAMA3)


def test_llama3_rope_factors_match_transformers(llama3_model):
    """base_inv_freq / factors is transformers' llama3 inverse frequency, pair for pair."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgekit.arch import HParams

    cfg = transformers.AutoConfig.from_pretrained(llama3_model)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    hp = HParams.from_config(json.loads((llama3_model / "config.json").read_text()))
    factors = hp.rope_freq_factors()
    head_dim = hp.head_dim
    inv = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    assert factors.shape == (head_dim // 2,) and factors.dtype == np.float32
    assert factors.min() == 1.0 and factors.max() == 8.0  # short wavelengths kept, long ones divided by factor
    np.testing.assert_allclose(inv / factors, want.numpy(), rtol=1e-6)


@pytest.mark.llamacpp
def test_llama3_rope_scaling_runs_like_transformers(llama3_model, tmp_path):
    """Llama 3.1/3.2's rope scaling converts (it was refused) and llama.cpp's logits match transformers'."""
    art = _convert(llama3_model, tmp_path / "f32")
    reader = gguf.GGUFReader(art.model_file)
    freqs = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32 and freqs.n_elements == 32
    assert _logits_gap(llama3_model, art.model_file) < 2e-3


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_rope_scalings_gguf_cannot_express_are_refused(tmp_path, kind):
    from edgekit.arch import HParams
    from edgekit.errors import UnsupportedError

    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "vocab_size": 100, "rope_scaling": {"rope_type": kind, "factor": 4.0}}
    with pytest.raises(UnsupportedError, match=f"rope scaling '{kind}'"):
        HParams.from_config(cfg).gguf_kv("llama")


def test_sliding_window_is_read_as_transformers_reads_it():
    from edgekit.arch import HParams

    base = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 1024}
    window = lambda **kw: HParams.from_config({**base, **kw}).sliding_window  # noqa: E731
    assert window(model_type="mistral", sliding_window=16) == 16  # every Mistral layer slides
    assert window(model_type="mistral", sliding_window=None) is None
    assert window(model_type="qwen2", sliding_window=16) is None  # Qwen2's use_sliding_window defaults to off
    assert window(model_type="qwen2", sliding_window=16, use_sliding_window=False) is None  # Qwen2.5's shipped configs
    assert window(model_type="qwen2", sliding_window=16, use_sliding_window=True, max_window_layers=1) == 16
    assert window(model_type="qwen2", sliding_window=16, use_sliding_window=True, max_window_layers=2) is None
    assert window(model_type="qwen2", sliding_window=16, use_sliding_window=True,
                  layer_types=["full_attention"] * 2) is None
    assert window(model_type="llama", sliding_window=16) is None  # Llama has no window
    mistral = {**base, "model_type": "mistral"}
    assert HParams.from_config({**mistral, "sliding_window": 16}).gguf_kv("llama")["llama.context_length"] == 16
    assert HParams.from_config({**mistral, "sliding_window": 4096}).gguf_kv("llama")["llama.context_length"] == 1024


@pytest.mark.llamacpp
def test_sliding_window_is_warned_and_exact_within_it(tmp_path):
    """llama.cpp's llama graph attends to every past token: the GGUF records the window as its context
    length, warns, and matches transformers on sequences that fit in the window."""
    model = _edit_config(build_tiny_model(tmp_path / "m", "MistralForCausalLM", hidden=128, ffn=256),
                         sliding_window=512)
    art = _convert(model, tmp_path / "f32")
    assert any("attends to the last 512 tokens" in n for n in art.notes)
    reader = gguf.GGUFReader(art.model_file)
    assert int(reader.fields["llama.context_length"].parts[-1][0]) == 512
    assert _logits_gap(model, art.model_file) < 2e-3  # TEXT is far under 512 tokens


def _greedy_emits(folder: Path, token: int, eos: list[int]) -> Path:
    """A model whose greedy choice is always ``token``, with generation_config eos_token_id ``eos``."""
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.weight[token] = 1.0
        m.model.norm.weight.fill_(1.0)
        m.model.embed_tokens.weight.fill_(1.0)
    m.save_pretrained(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    return folder


@pytest.mark.llamacpp
def test_every_eos_in_generation_config_stops_generation(tmp_path):
    model = _greedy_emits(build_tiny_model(tmp_path / "m", "LlamaForCausalLM"), 100, [2, 100])
    art = _convert(model, tmp_path / "f16", "F16")
    reader = gguf.GGUFReader(art.model_file)
    stops = {k: int(reader.fields[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]) for k in ("eos", "eot")}
    assert stops == {"eos": 2, "eot": 100}
    stats = api.GenerationStats()
    text = "".join(api.generate(art, "hi", api.SamplingConfig(temperature=0.0, max_tokens=8), stats, raw=True,
                                n_ctx=64))
    assert (text, stats.stop_reason, stats.generated_tokens) == ("", "eos", 0)  # id 100 ends it, as in transformers


def test_spm_added_and_user_defined_tokens_keep_text_and_type(tmp_path):
    """A SentencePiece vocabulary with tokens added in tokenizer.json (ChatML fine-tunes): they are written
    with their text (not [PADn]) and type, and SentencePiece's user-defined symbols are USER_DEFINED."""
    import transformers

    from edgekit.converters.formats.gguf.vocab import read_vocab

    folder = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", tokenizer="spm")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    n = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|sys|>"]})
    tok.add_tokens(["<|plain|>"])
    tok.save_pretrained(folder)
    vocab = read_vocab(folder, n + 8)
    assert vocab.tokens[n] == b"<|sys|>" and vocab.types[n] == gguf.TokenType.CONTROL
    assert vocab.tokens[n + 1] == b"<|plain|>" and vocab.types[n + 1] == gguf.TokenType.USER_DEFINED
    assert vocab.types[n + 2] == gguf.TokenType.UNUSED
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert vocab.types[im_start] == gguf.TokenType.USER_DEFINED  # a user_defined_symbol of tokenizer.model


def test_a_file_with_no_quantized_tensor_is_labelled_f16(tmp_path):
    """Rows of 200 weights hold no block type: --bits 8 writes F16 everywhere, and says so (it said Q8_0)."""
    model = build_tiny_model(tmp_path / "m", "LlamaForCausalLM", hidden=200, ffn=400)
    art = api.convert(model, "gguf", output=tmp_path / "q8", recipe=api.ConvertRecipe(bits=8))
    assert art.manifest["preset"] == "F16"
    assert int(gguf.GGUFReader(art.model_file).fields["general.file_type"].parts[-1][0]) == 1  # MOSTLY_F16
