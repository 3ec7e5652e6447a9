"""MLC artifacts: the group-quant packing, RTN q4f16_1 bytes against a reference written here from MLC's
documented algorithm (and against TVM executing that formula), the tensor cache through TVM's own reader,
the chat config's fields, GGUF input, bad input (the conversation template: test_mlc_chat_template.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.converters.quantize import mlcgroup
from edgekit.converters.quantize.grids import as_grid
from tests.converters.test_mlc_chat_template import CHATML

runner = CliRunner()
GRIDS = ("MLC_INT4_G32_F16", "MLC_INT4_G32_F32", "MLC_INT3_G40_F16")


def _mlc(src: Path, out: Path, *args: str) -> Path:
    r = runner.invoke(app, ["convert", str(src), "--to", "mlc", "-o", str(out), *args])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def q4_rtn(tiny_llama, tmp_path_factory) -> Path:
    return _mlc(tiny_llama, tmp_path_factory.mktemp("mlc") / "tiny-q4f16_1", "--quant", "q4f16_1")


def _one_line(output: str) -> bool:
    """One error line (a busy machine's warning may precede it) and no traceback."""
    lines = [ln for ln in output.strip().splitlines() if not ln.startswith("warning:")]
    return len(lines) == 1 and lines[0].startswith("error:")


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("name", GRIDS)
def test_packing_round_trips(name):
    g = as_grid(name)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << g.bits, size=(50, g.group), dtype=np.uint8)
    scale = rng.random(50).astype(np.float16 if g.dtype == "float16" else np.float32)
    c2, s2 = mlcgroup.unpack(g, mlcgroup.pack(g, codes, scale))
    assert np.array_equal(c2, codes) and np.array_equal(s2, scale)
    words = mlcgroup.pack_words(g, codes)
    # element j of a word sits at bit bits*j; int3 words leave their top two bits zero
    want = sum(codes[:, j::g.per_word].astype(np.uint64) << np.uint64(g.bits * j) for j in range(g.per_word))
    assert np.array_equal(words.astype(np.uint64), want)
    assert words.shape == (50, g.words) and (g.bits == 4 or int(words.max()) < 1 << 30)


@pytest.mark.parametrize("name", GRIDS)
def test_quantized_rows_decode_to_the_values_the_grid_reports(name):
    g = as_grid(name)
    x = np.random.default_rng(1).normal(0, 0.1, (7, 96)).astype(np.float32)  # 96 = 2.4 int3 groups: padded
    for im in (None, np.linspace(0.1, 2, 96).astype(np.float32)):
        raw, values = g.quantize_roundtrip(x, im)
        assert raw.shape == (7, g.row_bytes(96))
        assert np.array_equal(g.dequantize(raw)[:, :96], values)
        assert np.abs(values - x).max() < 0.35 * np.abs(x).max()


# ------------------------------------------------------------------------------ MLC's own quantization


def _reference_q4f16_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLC's q4f16_1 as its documentation states it, one group at a time: the weight in fp16, scale =
    max|w| / 7 in fp16, code = clip(round_half_even(w / scale + 7), 0, 14) with each operation in fp16,
    eight codes to a little-endian uint32 along K (the first in the lowest bits)."""
    n, k = w.shape
    h = np.float16
    q_weight = np.zeros((n, k // 8), np.uint32)
    q_scale = np.zeros((n, k // 32), h)
    for r in range(n):
        for g in range(k // 32):
            grp = w[r, 32 * g: 32 * g + 32].astype(h)
            s = h(np.float32(np.abs(grp).max()) / np.float32(7))
            q_scale[r, g] = s
            for j in range(32):
                v = h(np.float32(grp[j]) / np.float32(s)) if s else h(np.nan)
                v = h(np.float32(v) + np.float32(7))
                c = 0 if np.isnan(v) else int(min(max(np.rint(np.float32(v)), 0), 14))
                q_weight[r, (32 * g + j) // 8] |= np.uint32(c) << np.uint32(4 * (j % 8))
    return q_weight, q_scale


def test_rtn_q4f16_1_bytes_equal_mlcs_algorithm(q4_rtn, tiny_llama):
    from edgekit.converters.formats.mlc.cache import load_cache
    from edgekit.model import HFCheckpoint

    ck = HFCheckpoint.open(tiny_llama)
    cache = load_cache(q4_rtn, check_md5=True)
    qkv = np.concatenate([ck.load(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"])
    for mlc_name, w in (("model.layers.1.self_attn.qkv_proj", qkv),
                        ("model.layers.0.mlp.down_proj", ck.load("model.layers.0.mlp.down_proj.weight")),
                        ("model.embed_tokens", ck.load("model.embed_tokens.weight")[:40])):
        want_w, want_s = _reference_q4f16_1(w)
        got_w, got_s = cache[f"{mlc_name}.q_weight"], cache[f"{mlc_name}.q_scale"]
        assert got_w.dtype == np.uint32 and got_s.dtype == np.float16
        assert np.array_equal(got_w[: len(want_w)], want_w) and np.array_equal(got_s[: len(want_s)], want_s)


def test_rtn_codes_equal_tvm_running_the_formula():
    """TVM itself computes round(w / scale + 7) clipped to [0, 14] in fp16 (ties, zero groups and all)."""
    tvm = pytest.importorskip("tvm")
    from tvm import te, tirx

    g = as_grid("MLC_INT4_G32_F16")
    rng = np.random.default_rng(2)
    w = (rng.normal(0, 0.05, (64, 32)) * rng.integers(0, 2, (64, 1))).astype(np.float16)
    w[5, :] = 0  # a group of zeros
    w[6, :4] = [0.7, -0.7, 0.05, 0.15]  # ties: scale 0.1 -> 0.5 / 1.5 steps
    w[6, 4:] = 0
    codes, scale = mlcgroup.mlc_rtn(g, w.astype(np.float32))
    x = te.placeholder((64, 32), "float16", name="x")
    s = te.placeholder((64,), "float16", name="s")
    seven = tirx.const(7, "float16")
    y = te.compute((64, 32), lambda i, j: tirx.min(tirx.max(tirx.round(x[i, j] / s[i] + seven),
                                                            tirx.const(0, "float16")), seven * 2).astype("uint32"))
    fn = tvm.compile(te.create_prim_func([x, s, y]), target="llvm")
    out = tvm.runtime.empty((64, 32), "uint32", tvm.cpu())
    fn(tvm.runtime.tensor(w, tvm.cpu()), tvm.runtime.tensor(scale, tvm.cpu()), out)
    assert np.array_equal(out.numpy(), codes.astype(np.uint32))


def test_tensor_cache_loads_with_tvms_reader(q4_rtn):
    pytest.importorskip("tvm")
    from edgekit.converters.formats.mlc.cache import load_cache, load_cache_tvm, md5_file

    ours, theirs = load_cache(q4_rtn), load_cache_tvm(q4_rtn)
    assert set(ours) == set(theirs) and len(ours) > 10
    assert all(ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]) for k in ours)
    listing = json.loads((q4_rtn / "tensor-cache.json").read_text())
    assert listing == json.loads((q4_rtn / "ndarray-cache.json").read_text())
    for shard in listing["records"]:
        assert shard["md5sum"] == md5_file(q4_rtn / shard["dataPath"]) and shard["format"] == "raw-shard"
        assert all(r["format"] == "f32-to-bf16" for r in shard["records"])
    assert listing["metadata"]["ParamSize"] == len(ours)


def test_shards_follow_tvms_rule(tmp_path):
    from edgekit.converters.formats.mlc.cache import TensorCacheWriter, load_cache

    w = TensorCacheWriter(tmp_path, shard_cap_bytes=1000)
    arrays = {"a": np.arange(100, dtype=np.uint32), "big": np.ones(130, np.float32),  # 400 B; 520 B as bf16...
              "b": np.arange(150, dtype=np.uint32), "c": np.ones(10, np.float16)}  # ...is bf16 260 B
    for k, v in arrays.items():
        w.add(k, v)
    cache = w.finish(n_params=390)
    # a(400) | big(260) -> 660 | b(600): 1260 >= 1000 and 600*2 >= 1000 -> b alone, pending stays | c
    assert [[r["name"] for r in s["records"]] for s in cache["records"]] == [["b"], ["a", "big", "c"]]
    back = load_cache(tmp_path, check_md5=True)
    assert np.array_equal(back["a"], arrays["a"]) and np.array_equal(back["big"], arrays["big"])
    assert (tmp_path / "tensor-cache-b16.json").exists()
    with pytest.raises(RuntimeError):
        w.add("d", arrays["c"])


def test_tokenizer_info_follows_mlc_llms_rules(tmp_path):
    from edgekit.converters.formats.mlc.chat_config import _tokenizer_info

    def info(normalizer, decoder):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"normalizer": normalizer, "decoder": decoder}))
        return tuple(_tokenizer_info(tmp_path).values())

    llama2_norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    llama2_dec = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                   {"type": "ByteFallback"}, {"type": "Fuse"},
                                                   {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    assert info(llama2_norm, llama2_dec) == ("byte_fallback", True, True)
    assert info({"type": "Prepend", "prepend": "\u2581"}, {"type": "ByteLevel"}) == ("byte_level", True, False)
    assert info({"type": "Prepend", "prepend": "_"}, {"type": "Strip", "content": " ", "start": 0, "stop": 1}) == \
        ("byte_fallback", False, False)
    assert info(None, {"type": "Metaspace"}) == ("byte_fallback", False, False)
    (tmp_path / "tokenizer.json").unlink()
    assert tuple(_tokenizer_info(tmp_path).values()) == ("byte_fallback", False, False)


def test_special_tokens_map_bos_and_unquantized_bits_reach_the_artifact(tmp_path):
    """bos_token declared only in special_tokens_map.json (transformers reads it there), a chat_template.jinja
    beside tokenizer_config.json's template, and a q0f16 recipe's bits."""
    from edgekit import api
    from tests.helpers import build_tiny_model

    src = build_tiny_model(tmp_path / "src", "Qwen2ForCausalLM", hidden=64, ffn=128, layers=1, heads=2, kv_heads=1)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("bos_token")
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))
    (src / "chat_template.jinja").write_text("{{ bos_token }}" + CHATML)
    art = api.convert(src, "mlc", output=tmp_path / "mlc", recipe=api.ConvertRecipe(preset="q0f16"))
    conv = json.loads((art.path / "mlc-chat-config.json").read_text())["conv_template"]
    assert conv["system_template"].startswith("<|endoftext|><|im_start|>system\n")
    assert art.manifest["recipe"]["bits"] == 16 and not art.notes
    r = runner.invoke(app, ["inspect", str(art.path)])
    assert r.exit_code == 0 and "(--bits 16)" in r.output and "--bits 4" not in r.output, r.output


def test_chat_config_fields_are_present_and_typed(q4_rtn, tiny_llama):
    cfg = json.loads((q4_rtn / "mlc-chat-config.json").read_text())
    types = {"version": str, "model_type": str, "quantization": str, "model_config": dict, "vocab_size": int,
             "context_window_size": int, "sliding_window_size": int, "prefill_chunk_size": int,
             "attention_sink_size": int, "tensor_parallel_shards": int, "pipeline_parallel_stages": int,
             "active_vocab_size": int, "temperature": float, "presence_penalty": float, "frequency_penalty": float,
             "repetition_penalty": float, "top_p": float, "tokenizer_files": list, "tokenizer_info": dict,
             "conv_template": dict, "pad_token_id": int, "bos_token_id": int, "eos_token_id": int, "model_task": str}
    for key, t in types.items():
        assert isinstance(cfg[key], t), (key, cfg.get(key))
    assert (cfg["model_type"], cfg["quantization"], cfg["model_task"]) == ("llama", "q4f16_1", "chat")
    src = json.loads((tiny_llama / "config.json").read_text())
    mc = cfg["model_config"]
    assert mc["hidden_size"] == src["hidden_size"] and mc["num_key_value_heads"] == src["num_key_value_heads"]
    assert cfg["context_window_size"] == src["max_position_embeddings"] == mc["context_window_size"]
    assert cfg["prefill_chunk_size"] == min(cfg["context_window_size"], 8192)
    assert "tokenizer.json" in cfg["tokenizer_files"]
    assert all((q4_rtn / f).is_file() for f in cfg["tokenizer_files"])
    conv = cfg["conv_template"]
    for key, t in {"system_template": str, "roles": dict, "seps": list, "role_content_sep": str,
                   "role_empty_sep": str, "stop_str": list, "stop_token_ids": list}.items():
        assert isinstance(conv[key], t), key
    assert conv["stop_token_ids"] == [src["eos_token_id"]]


def test_qwen3_writes_the_parameters_and_config_mlc_llms_qwen3_reads(tiny_models, tmp_path):
    """mlc-llm's model/qwen3: Q/K/V fused as ``c_attn`` without a bias, the per-head RMSNorms as
    ``self_attn.q_norm`` / ``k_norm`` (declared after ``o_proj``) in the model dtype, no ``lm_head`` when tied;
    Qwen3Config needs ``attention_bias`` (no default) and ``head_dim`` (not derived, and here 48 x 4 heads are
    wider than the hidden 128)."""
    src = tiny_models["Qwen3ForCausalLM"]
    art = _mlc(src, tmp_path / "q3", "--quant", "q4f16_1")
    hf = json.loads((src / "config.json").read_text())
    cfg = json.loads((art / "mlc-chat-config.json").read_text())
    assert cfg["model_type"] == "qwen3"
    mc = cfg["model_config"]
    assert (mc["head_dim"], mc["num_attention_heads"], mc["hidden_size"]) == (48, 4, 128) == (
        hf["head_dim"], hf["num_attention_heads"], hf["hidden_size"])
    assert mc["attention_bias"] is False and mc["tie_word_embeddings"] is True and mc["weight_block_size"] is None
    assert mc["rope_theta"] == (hf.get("rope_parameters") or hf)["rope_theta"] and mc["hidden_act"] == "silu" and mc["dtype"] == "float32"
    assert "attention_bias" not in mc["kwargs"] and "head_dim" not in mc["kwargs"]
    shards = json.loads((art / "tensor-cache.json").read_text())["records"]
    recs = {r["name"]: r for s in shards for r in s["records"]}
    names = [r["name"] for s in shards for r in s["records"]]
    layer = [n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")]
    assert layer == ["self_attn.c_attn.q_weight", "self_attn.c_attn.q_scale", "self_attn.o_proj.q_weight",
                     "self_attn.o_proj.q_scale", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                     "mlp.gate_up_proj.q_weight", "mlp.gate_up_proj.q_scale", "mlp.down_proj.q_weight",
                     "mlp.down_proj.q_scale", "input_layernorm.weight", "post_attention_layernorm.weight"]
    assert recs["model.layers.0.self_attn.c_attn.q_weight"]["shape"][0] == (4 + 2 * 2) * 48
    assert recs["model.layers.0.self_attn.o_proj.q_weight"]["shape"] == [128, 4 * 48 // 8]
    for n in ("q_norm", "k_norm"):
        r = recs[f"model.layers.1.self_attn.{n}.weight"]
        assert (r["shape"], r["dtype"]) == ([48], "float16")
    assert not any(n.startswith("lm_head") for n in names)
    r = runner.invoke(app, ["inspect", str(art)])
    assert r.exit_code == 0 and "Qwen3ForCausalLM" in r.output, r.output


def test_manifest_inspect_and_plan_know_the_format(q4_rtn):
    m = json.loads((q4_rtn / "edgekit.json").read_text())
    assert m["format"] == "mlc" and m["files"]["model"] == "mlc-chat-config.json" and m["preset"] == "q4f16_1"
    r = runner.invoke(app, ["inspect", str(q4_rtn), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format"] == "mlc" and info["type_counts"]["MLC_INT4_G32_F16"] > 0
    assert 4.4 < info["bpw"] < 5.5 and info["memory"]["kv_cache"] > 0
    r = runner.invoke(app, ["plan", str(q4_rtn), "--ram", "1GiB", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["fits"] is True and plan["runtime"] == "mlc" and plan["parts"]["weights"] == info["file_bytes"]


# --------------------------------------------------------------------------------------- GGUF and errors


def test_a_gguf_converts_to_mlc_in_one_command(tiny_llama, tmp_path):
    from edgekit import api
    from edgekit.hashing import sha256_files

    gguf_art = api.convert(tiny_llama, "gguf", output=tmp_path / "g", recipe=api.ConvertRecipe(preset="Q8_0"))
    gguf_file = tmp_path / "tiny.Q8_0.gguf"
    gguf_art.model_file.rename(gguf_file)
    out = _mlc(gguf_file, tmp_path / "from-gguf")
    m = json.loads((out / "edgekit.json").read_text())
    assert m["source"]["imported_from"] == "gguf" and m["source"]["path"] == str(gguf_file.resolve())
    assert m["source"]["sha256"] == sha256_files([gguf_file])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-gguf", "g", "tiny.Q8_0.gguf"]  # scratch gone
    assert (out / "tensor-cache.json").exists() and (out / "mlc-chat-config.json").exists()
    # the default output name comes from the GGUF's
    r = runner.invoke(app, ["convert", str(gguf_file), "--to", "mlc", "--quant", "q0f16"])
    assert r.exit_code == 0, r.output
    from edgekit import library

    assert (library.store_dir() / "tiny.q8_0-mlc-q0f16" / "tensor-cache.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--quant", "q5f16_1"], "is not an MLC mode"),
    (["--bpw", "4.5"], "one quantization mode"),
    (["--quant", "q0f16", "--method", "gptq"], "stores them unquantized"),
    (["--compile", "nintendo"], "give one of"),
    (["-O", "shard_mb=zero"], "whole number"),
    (["-O", "colour=blue"], "unknown MLC option"),
])
def test_bad_options_are_one_line_errors(args, message, tiny_llama, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny_llama), "--to", "mlc", "-o", str(tmp_path / "o"), *args])
    assert r.exit_code != 0 and message in r.output and _one_line(r.output), r.output
    assert not (tmp_path / "o").exists()


def test_compile_without_mlc_llm_says_how_to_get_it(tiny_llama, tmp_path):
    from edgekit.converters.formats.mlc.options import mlc_llm_available

    if mlc_llm_available():
        pytest.skip("mlc_llm is installed here")
    r = runner.invoke(app, ["convert", str(tiny_llama), "--to", "mlc", "--compile", "android", "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "mlc_llm is not installed" in r.output and "pip install" in r.output
    assert _one_line(r.output) and not (tmp_path / "o").exists()


def test_bad_inputs_are_one_line_errors(tiny_models, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny_models["MistralForCausalLM"]), "--to", "mlc", "-o", str(tmp_path / "m")])
    assert r.exit_code != 0 and "--to mlc writes LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM checkpoints" in r.output and _one_line(r.output)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    r = runner.invoke(app, ["convert", str(fake), "--to", "mlc"])
    assert r.exit_code != 0 and _one_line(r.output), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]


def test_a_damaged_cache_is_named(q4_rtn, tmp_path):
    import shutil

    from edgekit.converters.formats.mlc.cache import load_cache
    from edgekit.errors import CorruptFileError

    art = tmp_path / "art"
    shutil.copytree(q4_rtn, art)
    shard = art / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="params_shard_0.bin has"):
        load_cache(art)
    r = runner.invoke(app, ["eval", str(art), "--text", str(art / "tokenizer.json"), "--chunks", "1"])
    assert r.exit_code != 0 and "changed since it was converted" in r.output


def test_sentencepiece_only_checkpoint_gets_the_tokenizer_json_mlc_reads(tmp_path):
    """A checkpoint with only tokenizer.model: the artifact gets transformers' tokenizer.json (as mlc_llm's
    gen_config makes it), listed in tokenizer_files and read for tokenizer_info. Without it MLC's runtime
    encodes with the bare SentencePiece model: a leading '▁' and '\\n' as '▁' on this vocabulary."""
    import tokenizers
    import transformers

    from tests.helpers import build_tiny_model

    src = build_tiny_model(tmp_path / "spm", "LlamaForCausalLM", hidden=128, ffn=256, layers=1, tokenizer="spm")
    assert not (src / "tokenizer.json").exists() and (src / "tokenizer.model").exists()
    out = _mlc(src, tmp_path / "mlc", "--quant", "q0f16")
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert cfg["tokenizer_files"][:2] == ["tokenizer.model", "tokenizer.json"]
    assert all((out / f).is_file() for f in cfg["tokenizer_files"]) and not list(out.glob("*.part"))
    text = "<|im_start|>user\nHi there<|im_end|>\n"
    want = transformers.AutoTokenizer.from_pretrained(str(src))(text, add_special_tokens=False)["input_ids"]
    assert tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")).encode(text, add_special_tokens=False).ids == want
    assert cfg["tokenizer_info"]["token_postproc_method"] == "byte_fallback"


def test_gptq_and_awq_clip_onto_a_padded_group():
    """Rows that are not a multiple of the group (int3's 40: SmolLM2's 576, 256, 4096 are not) are padded as
    MLC pads them: GPTQ and AWQ's clipping work on the real weights, the padding stored as code 0, and both
    beat MLC's own round-to-nearest on the sample they were fitted to."""
    import torch

    from edgekit.converters.quantize import awq, gptq_kernel

    g = as_grid("MLC_INT3_G40_F16")
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (512, 96)).astype(np.float32) @ rng.normal(0, 1, (96, 96)).astype(np.float32)
    w = rng.normal(0, 0.1, (24, 96)).astype(np.float32)
    H = x.T.astype(np.float64) @ x / len(x)

    def err(q: np.ndarray) -> float:
        d = (w - q).astype(np.float64)
        return float(np.trace(d @ H @ d.T))

    raw, rtn = g.quantize_roundtrip(w)
    res = gptq_kernel.gptq(w, H, g)
    assert res.data.shape == raw.shape == (24, g.row_bytes(96)) and res.weight.shape == (24, 96)
    codes, _ = mlcgroup.unpack(g, res.data.reshape(-1, g.record))
    assert not codes.reshape(24, -1)[:, 96:].any()  # the padding, as MLC stores it
    np.testing.assert_array_equal(g.dequantize(res.data)[:, :96], res.weight)
    assert err(res.weight) < 0.8 * err(rtn)

    lin = torch.nn.Linear(96, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    clip = awq.search_clip(lin, torch.from_numpy(x), g)
    w1 = lin.weight.detach().numpy()
    assert clip.error_after <= clip.error_before and np.all(np.abs(w1) <= np.abs(w))
    assert clip.error_before == pytest.approx(awq.output_error(w, rtn, torch.from_numpy(x)), rel=1e-9)
