"""The GGUF writer on tiny real checkpoints: every type, every architecture, llama.cpp as the judge."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit import api
from edgekit.converters.formats.gguf import mixes
from edgekit.model import HFCheckpoint

PRESETS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
TEXT = "The river city grew around its bridges, and 1,204 people crossed them every day in 1887."


def _convert(model, tmp_path, preset, **kw):
    return api.convert(model, "gguf", output=tmp_path / preset, recipe=api.ConvertRecipe(bits=None, preset=preset), **kw)


def _torch_logits(model_dir, tokens):
    from edgekit.runtime.torch_ref import TorchBackend

    return TorchBackend(model_dir).logits(tokens)


# The types gguf-py's numpy reference quantizers (gguf.quants.quantize) implement; the K-quants they only decode.
GGUF_PY_TYPES = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``: HF's rotate-half Q/K rows into GGML's
    interleaved RoPE order (written out here, independent of edgekit's own)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _source_weights(model) -> dict[str, np.ndarray]:
    """A Llama checkpoint's weights by GGUF name, float32, read with safetensors, Q/K rows permuted as
    llama.cpp's converter does (Qwen2's NEOX RoPE would need no permutation)."""
    from safetensors.numpy import load_file

    ckpt = HFCheckpoint.open(model)
    raw = {}
    for f in model.glob("*.safetensors"):
        raw.update(load_file(f))
    cfg = json.loads((model / "config.json").read_text())
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
    out = {}
    for hf_name, w in raw.items():
        name = ckpt.spec.gguf_name(hf_name)
        kind = name.split(".")[-2]
        w = w.astype(np.float32)
        out[name] = _rope_permute(w, heads[kind]) if kind in heads and name.endswith(".weight") else w
    return out


@pytest.mark.parametrize("preset", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_type_matches_gguf_py_quantizers(tiny_llama, tmp_path, preset):
    """Each tensor's bytes are exactly what gguf-py's numpy reference quantizer writes for the source
    weights, for every type it implements (the preset's own and the mix's others); only K-quant
    tensors (e.g. output.weight in Q4_0's mix) are left to the llama.cpp test below."""
    art = _convert(tiny_llama, tmp_path, preset)
    weights = _source_weights(tiny_llama)
    reader = gguf.GGUFReader(art.model_file)
    assert {t.name for t in reader.tensors} == set(weights) == set(art.manifest["tensors"])
    compared = set()
    for t in reader.tensors:
        qtype = T(t.tensor_type)
        assert qtype.name == art.manifest["tensors"][t.name]["type"]
        if qtype not in GGUF_PY_TYPES:
            assert qtype.name.endswith("_K"), t.name
            continue
        expected = np.asarray(gq.quantize(weights[t.name], qtype)).view(np.uint8).reshape(-1)
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert got.shape == expected.shape and np.array_equal(got, expected), f"{t.name} ({qtype.name})"
        compared.add(qtype.name)
    assert preset in compared
    assert art.manifest["size_bytes"] == art.model_file.stat().st_size


def _llama_quantize(src, dst, preset: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, what llama-quantize runs), its defaults, no imatrix."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{preset}"])
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


# presets llama.cpp writes without an importance matrix (the others are checked with one in test_mixes and
# test_ggml_iquants)
_RTN_PRESETS = [p for p in mixes.PRESETS
                if p != "F32" and (not p.startswith("IQ") or p in ("IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M"))]


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
# TQ1_0/TQ2_0: edgekit's grids take the least-squares ternary scale, not llama.cpp's absmax (which zeroes most
# of a Gaussian block); test_ternary_kernels.py holds the absmax encoder byte-identical with ggml, and
# both rules give the same bytes on genuinely ternary weights (a BitNet checkpoint).
@pytest.mark.parametrize("preset", [p for p in _RTN_PRESETS if not p.startswith("TQ")])
def test_every_preset_is_byte_identical_with_llama_quantize(tiny_models, tmp_path, preset, arch):
    """The README's claim for `rtn` ("llama.cpp's own rounding, byte-identical"), against llama.cpp
    itself: edgekit's file for a preset holds, tensor by tensor, the types and bytes llama.cpp's
    quantizer writes from edgekit's F32 file (which the test above holds to the source weights). Mistral's
    rows of 96 and Qwen2's of 128 fit no 256-weight super-block: those cases cover llama.cpp's fallback
    types, and Qwen2's tied embeddings its choice for token_embd without an output.weight."""
    model = tiny_models[arch]
    f32 = _convert(model, tmp_path, "F32")
    ref_path = tmp_path / "llama-quantize.gguf"
    _llama_quantize(f32.model_file, ref_path, preset)
    ref = {t.name: t for t in gguf.GGUFReader(ref_path).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(_convert(model, tmp_path, preset).model_file).tensors}
    assert ours.keys() == ref.keys()
    types = {n: T(t.tensor_type).name for n, t in ours.items()}
    assert types == {n: T(t.tensor_type).name for n, t in ref.items()}
    differ = {}
    for name, t in ours.items():
        a, b = (np.asarray(x.data).view(np.uint8).reshape(-1) for x in (t, ref[name]))
        if not np.array_equal(a, b):
            differ[f"{name}:{types[name]}"] = round(float(np.mean(a != b)), 4) if a.shape == b.shape else "size"
    assert not differ, f"tensors whose bytes differ from llama.cpp's (fraction of bytes): {differ}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", PRESETS)
def test_llamacpp_runs_every_type_like_pytorch(tiny_llama, tmp_path, preset):
    """llama.cpp on the quantized file agrees with PyTorch carrying the same (dequantized) weights."""
    from edgekit.runtime.llamacpp import LlamaCppBackend

    art = _convert(tiny_llama, tmp_path, preset)
    with LlamaCppBackend(art.model_file, n_ctx=64) as b:
        tokens = b.tokenize(TEXT)
        logits = b.logits(tokens)
    same_weights = api.import_gguf(art.model_file, tmp_path / "dequantized")
    ref = _torch_logits(same_weights, tokens)
    # llama.cpp keeps the KV cache in f16 and quantizes activations to 8 bits for quantized matmuls.
    rel = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
    assert rel < (2e-3 if preset == "F32" else 0.06), rel  # a wrong tensor gives ~1


def _reference_tokens(model) -> list[int]:
    """The source tokenizer's ids, from the library that defines each file: sentencepiece for
    tokenizer.model, tokenizers for tokenizer.json. (transformers rebuilds some tokenizers by model
    type, e.g. drops SentencePiece's dummy prefix, so it is not the reference here.)"""
    if (model / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
        return [sp.bos_id(), *sp.encode(TEXT)]
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model / "tokenizer.json")).encode(TEXT).ids


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_llamacpp_f32_logits_match_pytorch(tiny_models, tmp_path, arch):
    """Names, Q/K permutation, hyperparameters and tokenizer all have to be right for this to hold."""
    from edgekit.runtime.llamacpp import LlamaCppBackend
    from edgekit.runtime.torch_ref import TorchBackend

    model = tiny_models[arch]
    art = _convert(model, tmp_path, "F32")
    ref = TorchBackend(model)
    with LlamaCppBackend(art.model_file, n_ctx=128) as b:
        tokens = b.tokenize(TEXT)
        assert tokens == _reference_tokens(model), "llama.cpp tokenizes differently from the source tokenizer"
        logits = b.logits(tokens)
        meta = b.metadata()
    expected = ref.logits(tokens)
    # f16 KV cache in llama.cpp: small absolute differences, tiny relative error overall.
    np.testing.assert_allclose(logits, expected, atol=1e-2)
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 2e-3
    assert "tokenizer.chat_template" in meta


def test_fallbacks_recorded_for_narrow_rows(tiny_models, tmp_path):
    """Rows of 96 cannot hold 256-weight super-blocks: llama.cpp's fallbacks apply and are recorded."""
    art = _convert(tiny_models["MistralForCausalLM"], tmp_path, "Q4_K_M")
    tensors = art.manifest["tensors"]
    q = tensors["blk.0.attn_q.weight"]
    assert (q["wanted"], q["type"]) == ("Q4_K", "Q5_0")
    assert "256" in q["fallback_reason"]
    info = api.inspect(art.path)
    assert info["fallbacks"] == sum(1 for t in tensors.values() if "wanted" in t) > 0


def test_tensor_type_override(tiny_llama, tmp_path):
    recipe = api.ConvertRecipe(bits=4, tensor_types=((r"ffn_down", "Q8_0"), (r"attn_v", "F16")))
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "o", recipe=recipe)
    types = {n: t["type"] for n, t in art.manifest["tensors"].items()}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.1.attn_v.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q4_K"


def test_manifest_records_source_and_recipe(tiny_llama, tmp_path):
    art = _convert(tiny_llama, tmp_path, "Q4_0")
    m = json.loads((art.path / "edgekit.json").read_text())
    assert m["schema"] == "edgekit.artifact/1" and m["format"] == "gguf"
    assert len(m["source"]["sha256"]) == 64 and m["source"]["architecture"] == "LlamaForCausalLM"
    assert m["recipe"]["preset"] == "Q4_0" and m["recipe"]["method"] == "rtn"
    assert {"edgekit", "gguf", "numpy"} <= set(m["tools"])
    assert 4.5 <= m["bpw"] < 6.0


def test_import_then_convert_round_trip(tiny_llama, tmp_path, capfd):
    """GGUF -> safetensors (edgekit import) -> GGUF F32 gives back exactly the dequantized weights."""
    import tqdm  # noqa: F401 - imported before, as the CLI has: TQDM_DISABLE alone no longer silences it

    q8 = _convert(tiny_llama, tmp_path, "Q8_0")
    capfd.readouterr()
    hf = api.import_gguf(q8.model_file, tmp_path / "imported")
    assert "de-quantizing" not in capfd.readouterr().err  # edgekit draws the progress; transformers' bar stays off
    assert (hf / "model.safetensors").exists() and not list(hf.glob("*.bin"))
    cfg = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 2
    # the artifact folder imports as its model file does (QA s49: "is a folder; give a .gguf file")
    by_folder = api.import_gguf(q8.path, tmp_path / "imported-folder")
    assert (by_folder / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    back = _convert(hf, tmp_path, "F32")
    src = {t.name: t for t in gguf.GGUFReader(q8.model_file).tensors}
    for t in gguf.GGUFReader(back.model_file).tensors:
        s = src[t.name]
        expected = gguf.quants.dequantize(np.asarray(s.data), s.tensor_type)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(expected.shape), expected, err_msg=t.name)


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen2ForCausalLM"])
def test_import_keeps_wide_heads_and_tied_embeddings(tiny_models, tmp_path, arch):
    """transformers' GGUF reader takes head_dim as hidden / heads and an untied head whatever the file says:
    Qwen3's wider heads did not load at all, and a tied file got a head of its own. The import reads both from
    the GGUF and gives back the source model's logits."""
    from edgekit.runtime.torch_ref import TorchBackend

    src = tiny_models[arch]
    f32 = _convert(src, tmp_path, "F32")
    hf = api.import_gguf(f32.model_file, tmp_path / "imported")
    cfg = json.loads((hf / "config.json").read_text())
    want = json.loads((src / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg.get("head_dim", 32) == want.get("head_dim", 32)
    tokens = [5, 9, 17, 33, 2, 64]
    np.testing.assert_allclose(TorchBackend(hf).logits(tokens), TorchBackend(src).logits(tokens), atol=1e-5)


def test_sharded_checkpoint_gives_the_same_file(tiny_llama, tmp_path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="300KB")
    for f in tiny_llama.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    a = _convert(tiny_llama, tmp_path / "a", "Q4_K_M")
    b = _convert(sharded, tmp_path / "b", "Q4_K_M")
    ta = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(a.model_file).tensors}
    tb = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(b.model_file).tensors}
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])  # tied and untied heads
def test_gguf_options_choose_types_as_llama_quantize_does(tiny_models, tmp_path, arch):
    """-O output_type / embed_type give every tensor the type llama-quantize gives it with
    --output-tensor-type / --token-embedding-type, for a tied and an untied checkpoint."""
    import ctypes

    import llama_cpp

    from edgekit.converters.formats.gguf import GGUFOptions

    src = tiny_models[arch]
    f32 = api.convert(src, "gguf", output=tmp_path / "f32", recipe=api.ConvertRecipe(bits=None, preset="F32"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # Q4_K_M
    params.output_tensor_type = int(gguf.GGMLQuantizationType.Q8_0)
    params.token_embedding_type = int(gguf.GGMLQuantizationType.Q5_0)
    ref_path = tmp_path / "ref.gguf"
    assert llama_cpp.llama_model_quantize(str(f32.model_file).encode(), str(ref_path).encode(),
                                          ctypes.byref(params)) == 0
    ref = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(ref_path).tensors}
    art = api.convert(src, "gguf", output=tmp_path / "ours", recipe=api.ConvertRecipe(bits=None, preset="Q4_K_M"),
                      options=GGUFOptions(output_type="Q8_0", embed_type="q5_0", name="my-model"))
    ours = {n: t["type"] for n, t in art.manifest["tensors"].items()}
    assert ours == ref
    assert "Q8_0" in ours.values()
    reader = gguf.GGUFReader(art.model_file)
    assert bytes(reader.fields["general.name"].parts[-1]).decode() == "my-model"


def test_gguf_options_are_checked(tiny_llama, tmp_path):
    from edgekit.converters.formats.gguf import GGUFOptions
    from edgekit.errors import InputError, UnsupportedError

    with pytest.raises(UnsupportedError, match="unknown tensor type 'Q9_X'"):
        GGUFOptions(output_type="Q9_X")
    with pytest.raises(InputError, match="unknown GGUF option.*known: embed_type, name, output_type"):
        api.convert(tiny_llama, "gguf", output=tmp_path / "a", recipe=api.ConvertRecipe(extra={"colour": "red"}))
    assert not (tmp_path / "a").exists()


def test_a_preset_is_recorded_as_llama_quantize_names_it(tiny_llama, tmp_path):
    """--type bf16 / q4_k were recorded as typed, so `ls` showed 'bf16' beside 'Q4_K_M' (QA s49)."""
    assert _convert(tiny_llama, tmp_path, "bf16").manifest["preset"] == "BF16"
    assert _convert(tiny_llama, tmp_path, "q4_k").manifest["preset"] == "Q4_K_M"  # llama-quantize's alias
