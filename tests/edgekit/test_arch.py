"""The architecture table: names, the rope permutation llama.cpp expects, hyperparameter keys."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.arch import ARCHITECTURES, HParams, permute_for_rope, spec_for, unpermute_for_rope
from edgekit.errors import UnsupportedError


def test_spec_lookup_and_unsupported_names():
    assert spec_for(["MistralForCausalLM"]).gguf_arch == "llama"
    assert spec_for(["Foo", "Qwen2ForCausalLM"]).gguf_arch == "qwen2"
    with pytest.raises(UnsupportedError, match="architecture GPT2LMHeadModel is not supported; edgekit converts: "
                                               "LlamaForCausalLM"):
        spec_for(["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedError, match=r"\(none given\)"):
        spec_for(None)


@pytest.mark.parametrize("cls", sorted(ARCHITECTURES))
def test_tensor_names(cls: str):
    spec = ARCHITECTURES[cls]
    assert spec.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert spec.gguf_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert spec.gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert spec.gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(UnsupportedError, match="not part of the"):
        spec.gguf_name("model.layers.0.mlp.experts.0.weight")
    if cls == "Qwen2ForCausalLM":  # Qwen2 has Q/K/V biases; llama-family layouts have none
        assert spec.gguf_name("model.layers.1.self_attn.k_proj.bias") == "blk.1.attn_k.bias"
    else:
        with pytest.raises(UnsupportedError):
            spec.gguf_name("model.layers.1.self_attn.k_proj.bias")


def test_rope_permutation_interleaves_halves_and_inverts():
    n_head, head_dim = 3, 8
    w = np.arange(n_head * head_dim * 2, dtype=np.float32).reshape(n_head * head_dim, 2)
    p = permute_for_rope(w, n_head)
    # per head: rows (0, 4, 1, 5, 2, 6, 3, 7) -- each rotate-half pair becomes adjacent
    assert np.array_equal(p[:head_dim, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])
    assert np.array_equal(unpermute_for_rope(p, n_head), w)
    rows = np.arange(n_head * head_dim, dtype=np.uint8)  # bytes permute the same way (whole rows)
    assert np.array_equal(permute_for_rope(rows, n_head)[:head_dim], [0, 4, 1, 5, 2, 6, 3, 7])


def test_hparams_from_config_and_gguf_keys():
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "tie_word_embeddings": True}
    hp = HParams.from_config(cfg)
    assert (hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_vocab, hp.tie_embeddings) == (30, 9, 3, 49152, True)
    kv = hp.gguf_kv("llama")
    assert kv["llama.block_count"] == 30 and kv["llama.attention.head_count_kv"] == 3
    assert kv["llama.embedding_length"] == 576 and kv["llama.rope.freq_base"] == 100000.0


@pytest.mark.parametrize("tensor, field", [("self_attn.q_proj.bias", "attention_bias"),
                                           ("self_attn.o_proj.bias", "attention_bias"),
                                           ("mlp.down_proj.bias", "mlp_bias")])
def test_llama_biases_name_the_config_switch(tensor, field):
    """QA s50: the refusal named a tensor but not the config field that put it there, nor a way on."""
    from edgekit.arch import ARCHITECTURES

    with pytest.raises(UnsupportedError, match=f"config.json sets {field}: true .*edgekit run FOLDER"):
        ARCHITECTURES["LlamaForCausalLM"].gguf_name(f"model.layers.3.{tensor}")
