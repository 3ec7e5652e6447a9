"""Issue 13: inputs are validated before use. config.json types and values, config against the weights'
shapes, GGUF hyperparameters and tensor extents, ONNX graphs and their external data: each bad input is
one line naming what is wrong, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest

from edgekit import api
from edgekit.errors import CorruptFileError, UnsupportedError
from edgekit.model import HFCheckpoint
from tests.edgekit.test_bad_input import assert_clean_error, copy_model, run_cli


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (a value of ... deletes the key)."""
    m = copy_model(src, dst)
    cfg = json.loads((m / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (m / "config.json").write_text(json.dumps(cfg))
    return m


# ---- config.json: types and values --------------------------------------------------------------

def test_config_that_is_a_list_is_refused(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "config.json").write_text(json.dumps([json.loads((m / "config.json").read_text())]))
    code, out = run_cli("convert", m, "-o", tmp_path / "out")
    assert_clean_error(code, out, "config.json holds a JSON list", "fix config.json")
    assert code == CorruptFileError.exit_code and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value", "says"), [
    ("num_attention_heads", 0, "'num_attention_heads' is 0; it must be between 1"),
    ("num_hidden_layers", -3, "'num_hidden_layers' is -3"),
    ("hidden_size", "256", "'hidden_size' must be a whole number, got '256'"),
    ("vocab_size", 2 ** 40, "'vocab_size' is 1099511627776"),
    ("intermediate_size", 512.5, "'intermediate_size' must be a whole number"),
    ("num_key_value_heads", 3, "'num_key_value_heads' is 3, which does not divide num_attention_heads 4"),
    ("architectures", "LlamaForCausalLM", "'architectures' must be a list of class names"),
    ("architectures", [1, 2], "'architectures' must be a list of class names"),
    ("rms_norm_eps", -1e-5, "'rms_norm_eps' must be a number in (0, 1)"),
    ("rope_theta", 1e308, "'rope_theta' must be a number in (0, 1e+15)"),
    ("tie_word_embeddings", "yes", "'tie_word_embeddings' must be true or false"),
    ("rope_scaling", [1], "'rope_scaling' must be an object or null"),
    ("num_attention_heads", True, "'num_attention_heads' must be a whole number, got True"),
    ("eos_token_id", -1, "'eos_token_id' must be a token id in 0.."),  # found by bench/fuzz.py
    ("bos_token_id", [1, 10**6], "'bos_token_id' must be a token id in 0.."),
])
def test_bad_config_values_name_the_key(tiny_llama, tmp_path, key, value, says):
    m = with_config(tiny_llama, tmp_path / "m", **{key: value})
    code, out = run_cli("convert", m, "-o", tmp_path / "out")
    assert_clean_error(code, out, says)
    assert code == CorruptFileError.exit_code and not (tmp_path / "out").exists()


def test_hidden_size_must_split_into_heads_when_head_dim_is_not_given(tiny_llama, tmp_path):
    m = with_config(tiny_llama, tmp_path / "m", head_dim=..., hidden_size=250)
    with pytest.raises(CorruptFileError, match="'hidden_size' is 250, not a multiple of num_attention_heads 4"):
        HFCheckpoint.open(m)


def test_odd_head_dim_is_refused(tiny_llama, tmp_path):
    m = with_config(tiny_llama, tmp_path / "m", head_dim=63)
    with pytest.raises(CorruptFileError, match="'head_dim' is 63; rotary attention needs an even head size"):
        HFCheckpoint.open(m)


def test_missing_key_is_still_an_unsupported_model(tiny_llama, tmp_path):
    m = with_config(tiny_llama, tmp_path / "m", num_hidden_layers=...)
    with pytest.raises(UnsupportedError, match="lacks 'num_hidden_layers'"):
        HFCheckpoint.open(m)


# ---- config.json against the tensor shapes ---------------------------------------------------------

@pytest.mark.parametrize(("changes", "says"), [
    ({"num_attention_heads": 2}, "tensor 'model.layers.0.self_attn.q_proj.weight' has shape [256, 256] but config.json "
                                 "implies [128, 256] (q=128, embd=256)"),
    ({"num_key_value_heads": 4}, "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [128, 256] but config.json "
                                 "implies [256, 256]"),
    ({"intermediate_size": 256}, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [512, 256] but config.json "
                                "implies [256, 256] (ff=256, embd=256)"),
    ({"num_hidden_layers": 3}, "tensor 'model.layers.2.input_layernorm.weight' is missing, but config.json says "
                               "num_hidden_layers 3"),
    ({"num_hidden_layers": 1}, "tensor 'model.layers.1."),
])
def test_config_that_disagrees_with_the_weights_is_refused_before_converting(tiny_llama, tmp_path, changes, says):
    m = with_config(tiny_llama, tmp_path / "m", **changes)
    code, out = run_cli("convert", m, "-o", tmp_path / "out")
    assert_clean_error(code, out, says)
    assert code == CorruptFileError.exit_code and not (tmp_path / "out").exists()


def test_vocab_size_against_the_embedding(tiny_llama, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    m = with_config(tiny_llama, tmp_path / "m", vocab_size=cfg["vocab_size"] + 1)
    with pytest.raises(CorruptFileError, match=r"'model\.embed_tokens\.weight' has shape \[\d+, 256\] but config.json "
                                               r"implies \[\d+, 256\] \(vocab=\d+, embd=256\)"):
        HFCheckpoint.open(m)


def test_real_model_with_heads_or_layers_edited(real_hf, tmp_path):
    """The issue's cases on SmolLM2 (9 heads of 64, 30 layers): weights are symlinked, only config.json changes."""
    for changes, says in (({"num_attention_heads": 8}, "does not divide num_attention_heads 8"),
                          ({"num_attention_heads": 6}, "'model.layers.0.self_attn.q_proj.weight' has shape [576, 576] but "
                                                           "config.json implies [384, 576] (q=384, embd=576)"),
                          ({"num_hidden_layers": 40}, "'model.layers.30.input_layernorm.weight' is missing")):
        m = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        m.mkdir()
        for f in real_hf.iterdir():
            (m / f.name).symlink_to(f)
        (m / "config.json").unlink()
        (m / "config.json").write_text(json.dumps({**json.loads((real_hf / "config.json").read_text()), **changes}))
        assert_clean_error(*run_cli("convert", m, "-o", tmp_path / "out"), says)


# ---- safetensors headers and shard indexes ------------------------------------------------------------

def _rewrite_header(m: Path, edit) -> None:
    f = m / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n:])


@pytest.mark.parametrize("edit", [
    lambda h: h["model.norm.weight"].update(shape=[-256]),
    lambda h: h["model.norm.weight"].update(data_offsets=["0", "1024"]),
])
def test_safetensors_entries_with_bad_numbers(tiny_llama, tmp_path, edit):
    m = copy_model(tiny_llama, tmp_path / "m")
    _rewrite_header(m, edit)
    with pytest.raises(CorruptFileError, match="malformed entry for 'model.norm.weight'"):
        HFCheckpoint.open(m)


def test_shard_index_pointing_outside_the_folder(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CorruptFileError, match="names shard '../../etc/passwd' outside"):
        HFCheckpoint.open(m)
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CorruptFileError, match="is malformed"):
        HFCheckpoint.open(m)


# ---- GGUF headers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harden") / "tiny-q8"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=8)).model_file


def patch_field(src: Path, dst: Path, key: str, value: int) -> Path:
    """Copy ``src`` to ``dst`` with the integer value of metadata ``key`` overwritten in place."""
    import gguf

    f = gguf.GGUFReader(src).fields[key]
    off = f.offset + sum(p.nbytes for p in f.parts[: f.data[0]])
    n = f.parts[f.data[0]].nbytes
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(off)
        fh.write(value.to_bytes(n, "little"))
    return dst


@pytest.mark.parametrize(("key", "value", "says"), [
    ("llama.block_count", 2155872286, "llama.block_count is 2155872286, outside 1..4096"),
    ("llama.block_count", 3, "block_count is 3 but the file holds 2 blocks (blk.2.* is missing)"),
    ("llama.block_count", 1, "tensor blk.1.* is beyond block_count 1"),
    ("llama.attention.head_count", 0, "llama.attention.head_count is 0"),
    ("llama.attention.head_count_kv", 3, "head_count_kv 3 does not divide head_count 4"),
    ("llama.context_length", 0, "llama.context_length is 0, outside 1..268435456"),
    ("llama.embedding_length", 1 << 30, "llama.embedding_length is 1073741824"),
])
def test_gguf_hyperparameters_are_bounded_in_inspect_and_import(tiny_gguf, tmp_path, key, value, says):
    bad = patch_field(tiny_gguf, tmp_path / "bad.gguf", key, value)
    for args in (("inspect", bad), ("import", bad, "-o", tmp_path / "hf")):
        t0 = time.perf_counter()
        code, out = run_cli(*args)
        assert_clean_error(code, out, says, "re-download or re-convert it")
        assert code == CorruptFileError.exit_code and time.perf_counter() - t0 < 10
    assert not (tmp_path / "hf").exists()


def test_gguf_memory_model_refuses_the_same_files(tiny_gguf, tmp_path):
    from edgekit.runtime.memory import read_shape

    bad = patch_field(tiny_gguf, tmp_path / "bad.gguf", "llama.block_count", 2155872286)
    with pytest.raises(CorruptFileError, match="block_count"):
        read_shape(bad)
    assert_clean_error(*run_cli("plan", bad), "block_count is 2155872286")


def test_gguf_tensor_past_the_end_of_the_file(tiny_gguf, tmp_path):
    import gguf

    reader = gguf.GGUFReader(tiny_gguf)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[: int(last.data_offset) + int(last.n_bytes) // 2])
    code, out = run_cli("inspect", bad)
    assert_clean_error(code, out, "re-download or re-convert it")
    assert code == CorruptFileError.exit_code


def test_real_gguf_with_a_two_byte_block_count_change(real_gguf, tmp_path):
    """The issue's report: block_count 30 -> 2,155,872,286 ran import for minutes and inspect said 6.8 PB."""
    bad = patch_field(real_gguf, tmp_path / "smol.gguf", "llama.block_count", 2155872286)
    for args in (("inspect", bad), ("import", bad, "-o", tmp_path / "hf")):
        t0 = time.perf_counter()
        assert_clean_error(*run_cli(*args), "llama.block_count is 2155872286, outside 1..4096")
        assert time.perf_counter() - t0 < 15


# ---- ONNX graphs and external data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harden-onnx") / "tiny-onnx"
    return api.convert(tiny_llama, "onnx", output=out, recipe=api.ConvertRecipe(bits=4)).path


def _onnx_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_onnx_corrupt_graph(tiny_onnx, tmp_path):
    art = _onnx_copy(tiny_onnx, tmp_path / "a")
    raw = bytearray((art / "model.onnx").read_bytes())
    raw[40:80] = b"\xff" * 40
    (art / "model.onnx").write_bytes(bytes(raw))
    code, out = run_cli("inspect", art)
    assert_clean_error(code, out, "model.onnx is not a readable ONNX graph (DecodeError)", "re-run 'edgekit convert'")
    assert code == CorruptFileError.exit_code
    (art / "model.onnx").write_bytes(b"")  # an empty file parses as an empty graph: inspect described it
    code, out = run_cli("inspect", art)
    assert_clean_error(code, out, "model.onnx holds no ONNX graph (empty or truncated)")
    assert code == CorruptFileError.exit_code


def test_onnx_missing_or_short_external_data(tiny_onnx, tmp_path):
    from edgekit.runtime.memory_onnx import estimate_onnx_memory

    art = _onnx_copy(tiny_onnx, tmp_path / "a")
    data = art / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_clean_error(*run_cli("inspect", art), "model.onnx.data is truncated: tensor", "needs bytes up to")
    data.unlink()
    code, out = run_cli("inspect", art)
    assert_clean_error(code, out, "external data model.onnx.data is missing; copy it next to model.onnx")
    assert code == CorruptFileError.exit_code
    with pytest.raises(CorruptFileError, match="model.onnx.data is missing"):
        estimate_onnx_memory(art / "model.onnx", 512)


def test_onnx_external_data_outside_the_folder_is_refused(tiny_onnx, tmp_path):
    import onnx

    art = _onnx_copy(tiny_onnx, tmp_path / "a")
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = "../../secret.bin"
    (art / "model.onnx").write_bytes(model.SerializeToString())
    assert_clean_error(*run_cli("inspect", art), f"tensor {t.name!r} points outside the model folder")


def test_onnx_external_data_location_that_is_not_utf8(tiny_onnx, tmp_path):
    """A flipped byte in the location string: protobuf hands invalid UTF-8 over as bytes (found by bench/fuzz.py)."""
    import onnx

    art = _onnx_copy(tiny_onnx, tmp_path / "a")
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = "model.onnx.dat\u00e9"
    raw = model.SerializeToString().replace("model.onnx.dat\u00e9".encode(), b"model.onnx.dat\xff\xfe")
    (art / "model.onnx").write_bytes(raw)
    code, out = run_cli("inspect", art)
    assert_clean_error(code, out, f"tensor {t.name!r} has a malformed external data entry")
    assert code == CorruptFileError.exit_code


def test_onnx_inspect_still_reports_a_good_artifact(tiny_onnx):
    info = api.inspect(tiny_onnx, ctx=1024)
    data = (tiny_onnx / "model.onnx.data").stat().st_size + (tiny_onnx / "model.onnx").stat().st_size
    # the file holds the graph and rotary tables too: weights are the weight tensors' bytes (as GGUF's)
    assert info["file_bytes"] == data and info["weight_bytes"] < data and 3.5 < info["bpw"] < 8


# ---- manifests as inspect reports them -----------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "says"), [
    ("recipe", [1, 2], "edgekit.json: recipe should be of type dict/NoneType"),
    ("eval", [{"ppl": "low", "ctx": 512, "chunks": 4}], "edgekit.json: eval[0].ppl should be of type Real"),
    ("pruned", {"kind": "depth", "n_layer_source": 4}, "edgekit.json: pruned.dropped_layers should be present"),
    ("tensors", {"blk.0.attn_q.weight": 0}, "edgekit.json: tensors.blk.0.attn_q.weight should be of type dict"),
])
def test_manifest_fields_inspect_reports_are_checked(tiny_gguf, tmp_path, field, value, says):
    art = _onnx_copy(tiny_gguf.parent, tmp_path / "a")
    manifest = json.loads((art / "edgekit.json").read_text())
    (art / "edgekit.json").write_text(json.dumps({**manifest, field: value}))
    code, out = run_cli("inspect", art)
    assert_clean_error(code, out, says)
    assert code == CorruptFileError.exit_code


def test_onnx_manifest_tensor_entries(tiny_onnx, tmp_path):
    art = _onnx_copy(tiny_onnx, tmp_path / "a")
    manifest = json.loads((art / "edgekit.json").read_text())
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["shape"] = "big"
    (art / "edgekit.json").write_text(json.dumps(manifest))
    assert_clean_error(*run_cli("inspect", art), f"tensor {name!r} needs a shape (whole numbers) and a type name")



# ---- arch.py error paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("archs", "error", "says"), [
    ("LlamaForCausalLM", CorruptFileError, r"'architectures' must be a list of class names .*got 'LlamaForCausalLM'"),
    (["LlamaForCausalLM", 7], CorruptFileError, "'architectures' must be a list of class names"),
    ({"a": 1}, CorruptFileError, "'architectures' must be a list"),
    ([], UnsupportedError, r"architecture \(none given\) is not supported"),
    (["GPTNeoXForCausalLM"], UnsupportedError, "architecture GPTNeoXForCausalLM is not supported; edgekit converts: "
                                                "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
])
def test_spec_for_error_paths(archs, error, says):
    from edgekit.arch import spec_for

    with pytest.raises(error, match=says):
        spec_for(archs)


def test_hparams_error_paths():
    from edgekit.arch import HParams, awq_layout

    base = {"num_attention_heads": 4, "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
            "vocab_size": 384}
    assert HParams.from_config({**base, "rope_theta": None, "rms_norm_eps": None}).rope_theta == 10000.0
    with pytest.raises(CorruptFileError, match="'num_hidden_layers' must be a whole number, got None"):
        HParams.from_config({**base, "num_hidden_layers": None})
    with pytest.raises(CorruptFileError, match="config.json holds a JSON str"):
        HParams.from_config("LlamaForCausalLM")
    hp = HParams.from_config({**base, "rope_scaling": {"rope_type": "linear"}})
    with pytest.raises(CorruptFileError, match="linear rope scaling has no 'factor'"):
        hp.gguf_kv("llama")
    hp = HParams.from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedError, match="rope scaling 'yarn' has no exact form in GGUF"):
        hp.gguf_kv("llama")
    with pytest.raises(UnsupportedError, match="AWQ does not know the decoder layer of 'gpt2'"):
        awq_layout("gpt2")


@pytest.mark.parametrize("ctx", ["0", "-5", str(1 << 40)])
def test_inspect_context_length_is_bounded(tiny_gguf, ctx):
    code, out = run_cli("inspect", tiny_gguf, "--ctx", ctx)
    assert_clean_error(code, out, f"--ctx {ctx} is out of range; give a context length between 1 and 268435456")
    assert code == 2
