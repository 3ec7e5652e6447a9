"""ONNX artifacts: the graph against PyTorch (float and with the same quantized weights), KV-cache
decoding, every bits / block / grid / head option, calibrated methods, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit import api
from edgekit.artifact import Artifact
from edgekit.converters.formats.base import ConvertRecipe
from edgekit.errors import CorruptFileError, InputError, UnsupportedError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
TOKENS = list(range(5, 45))


@pytest.fixture(scope="module")
def tiny_models(tiny_models, tmp_path_factory):
    """The shared tiny models, with a Mistral whose head size (32) onnxruntime's attention kernel takes."""
    from tests.helpers import build_tiny_model

    mistral = build_tiny_model(tmp_path_factory.mktemp("onnx") / "mistral", "MistralForCausalLM", hidden=96,
                               ffn=256, heads=3, kv_heads=1, tokenizer="spm")
    return {**tiny_models, "MistralForCausalLM": mistral, "head24": tiny_models["MistralForCausalLM"]}


def torch_logits(src, weights: dict[str, np.ndarray] | None, tokens: list[int]) -> np.ndarray:
    """PyTorch's logits for ``src``'s architecture, with ``weights`` (HF names) if given."""
    cfg = transformers.AutoConfig.from_pretrained(src)
    if weights is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    else:
        cfg.tie_word_embeddings = False  # the ONNX head may be encoded apart from the table
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        res = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
                                    strict=False)
        assert not res.unexpected_keys and not [k for k in res.missing_keys if "rotary" not in k], res
    with torch.inference_mode():
        return model.eval()(torch.tensor([tokens])).logits[0].float().numpy()


def convert(src, out, **extra):
    bits = extra.pop("bits", 4)
    method = extra.pop("method", "rtn")
    return api.convert(src, "onnx", output=out, force=True, recipe=ConvertRecipe(bits=bits, method=method, extra=extra))


@pytest.mark.parametrize("arch", ARCHS)
def test_float_graph_equals_pytorch(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    ref = torch_logits(src, None, TOKENS)
    art = convert(src, tmp_path / "f32", bits=32)
    with api.open_backend(art) as be:
        got = be.logits(TOKENS)
        assert np.abs(got - ref).max() < 1e-4
        # KV-cache decoding: a prefix, then a chunk, then single tokens, equals one full pass
        be.reset()
        be.decode(TOKENS[:30])
        tail = np.concatenate([be._run(TOKENS[30:37], last_only=False), be._run(TOKENS[37:], last_only=False)])
        assert np.abs(tail - got[30:]).max() < 1e-4
    m = art.manifest
    assert m["format"] == "onnx" and m["onnx"]["opset"] == {"ai.onnx": 21, "com.microsoft": 1}
    assert "com.microsoft::GroupQueryAttention" in m["onnx"]["ops"]
    assert (art.path / "model.onnx.data").exists() and (art.path / "tokenizer_config.json").exists()
    onnx.checker.check_model(str(art.model_file))
    fp16 = convert(src, tmp_path / "f16", bits=16)
    with api.open_backend(fp16) as be:
        assert np.abs(be.logits(TOKENS) - ref).max() < 0.05 * np.abs(ref).max()
    assert fp16.manifest["size_bytes"] < 0.6 * art.manifest["size_bytes"]


OPTIONS = [
    dict(bits=4),                                               # UINT4_B32, int8 embedding and head
    dict(bits=4, symmetric=True, lm_head="int4"),
    dict(bits=4, block_size=128 // 4, embed="float", lm_head="tied"),
    dict(bits=8),
    dict(bits=8, symmetric=False, block_size=16, lm_head="float"),
    dict(bits=4, block_size=128),                               # Llama only (hidden 256; Qwen3's heads 192)
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_quantized_graph_equals_pytorch_with_the_same_weights(tiny_models, tmp_path, arch, opts):
    from edgekit.converters.formats.onnx import read_weights

    src = tiny_models[arch]
    cfg = json.loads((src / "config.json").read_text())
    heads = cfg["num_attention_heads"] * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    if cfg["hidden_size"] % opts.get("block_size", 32) or heads % opts.get("block_size", 32):
        with pytest.raises(InputError, match="--block-size"):
            convert(src, tmp_path / "q", **opts)
        assert not (tmp_path / "q").exists()
        return
    if opts.get("lm_head") == "tied" and not cfg.get("tie_word_embeddings"):
        with pytest.raises(InputError, match="lm_head weights of its own; drop lm_head=tied"):
            convert(src, tmp_path / "q", **opts)  # it used to run the embedding as the head: another model
        return
    art = convert(src, tmp_path / "q", accuracy_level=0, **opts)
    weights = read_weights(art.model_file)
    ref = torch_logits(src, weights, TOKENS)
    with api.open_backend(art) as be:
        got = be.logits(TOKENS)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # and the quantized weights are close to the source (a sane grid, not garbage that agrees with itself)
    src_w = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    w = weights["model.layers.0.mlp.down_proj.weight"]
    s = src_w["model.layers.0.mlp.down_proj.weight"].numpy()
    bits = opts["bits"]
    assert np.abs(w - s).mean() < np.abs(s).mean() * (0.2 if bits == 4 else 0.02)
    info = art.manifest["onnx"]
    assert info["block_size"] == opts.get("block_size", 32) and info["accuracy_level"] == 0
    assert "com.microsoft::MatMulNBits" in info["ops"]


def test_qwen3_per_head_q_k_norms(tiny_models, tmp_path):
    """Qwen3 normalises each head's queries and keys (one head_dim weight shared by the heads) before the
    rotary embedding: the graph carries both norms per layer, reads them back under their HF names, and
    leaving them out (all-ones weights) would change the logits (the fixture's weights are random). Heads of
    48 x 4 = 192 are wider than the hidden 128: a block size that does not divide them is refused in one line."""
    from edgekit.converters.formats.onnx import read_weights

    src = tiny_models["Qwen3ForCausalLM"]
    art = convert(src, tmp_path / "f32", bits=32)
    graph = onnx.load(str(art.model_file), load_external_data=False).graph
    norms = {t.name: list(t.dims) for t in graph.initializer if t.name.endswith(("q_norm.weight", "k_norm.weight"))}
    assert norms == {f"layers.{i}.self_attn.{w}_norm.weight": [48] for i in range(2) for w in "qk"}
    w = read_weights(art.model_file)
    src_w = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    for name in ("model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        np.testing.assert_array_equal(w[name], src_w[name].numpy())
    with api.open_backend(art) as be:
        got = be.logits(TOKENS)
    ref = torch_logits(src, w, TOKENS)
    assert np.abs(got - ref).max() < 1e-4
    plain = {k: (np.ones_like(v) if k.endswith(("q_norm.weight", "k_norm.weight")) else v) for k, v in w.items()}
    assert np.abs(got - torch_logits(src, plain, TOKENS)).max() > 100 * np.abs(got - ref).max()
    with pytest.raises(InputError, match=r"attention width 192 \(4 heads of 48\).*--block-size 64"):
        convert(src, tmp_path / "b128", bits=4, block_size=128)
    assert not (tmp_path / "b128").exists()


def test_shared_embedding_for_tied_checkpoints(tiny_models, tmp_path):
    """A tied checkpoint gets one quantized tensor read by both the lm_head (MatMulNBits) and the
    embedding (GatherBlockQuantized through a Reshape): smaller, and the same logits as two copies."""
    from edgekit.converters.formats.onnx import read_weights

    src = tiny_models["Qwen2ForCausalLM"]
    shared = convert(src, tmp_path / "shared", bits=4, accuracy_level=0)
    assert shared.manifest["onnx"]["embed"] == "shared"
    two = convert(src, tmp_path / "two", bits=4, accuracy_level=0, embed="int8")
    assert shared.manifest["size_bytes"] < two.manifest["size_bytes"] - 0.9 * 128 * 384
    w = read_weights(shared.model_file)
    np.testing.assert_array_equal(w["model.embed_tokens.weight"], w["lm_head.weight"])
    with api.open_backend(shared) as be:
        got = be.logits(TOKENS)
    assert np.abs(got - torch_logits(src, w, TOKENS)).max() < 1e-4 * max(1.0, np.abs(got).max())
    with pytest.raises(InputError, match="tied embeddings"):
        convert(tiny_models["LlamaForCausalLM"], tmp_path / "x", embed="shared")


@pytest.mark.parametrize("bits", [16, 32])
def test_float_graph_of_a_tied_checkpoint_stores_the_table_once(tiny_models, tmp_path, bits):
    """A tied checkpoint's float graph reads its head from the embedding table (lm_head=tied), the table
    stored once; a second copy (lm_head=float) costs its bytes and changes no logit (onnxruntime folds the
    head's Transpose at load into the weight the copy stores), and inspect counts both tables of the copy."""
    from edgekit.converters.formats.onnx import read_weights

    src = tiny_models["Qwen2ForCausalLM"]  # tied, hidden 128, vocab 384
    one = convert(src, tmp_path / "one", bits=bits)
    two = convert(src, tmp_path / "two", bits=bits, lm_head="float")
    assert one.manifest["onnx"]["lm_head"] == "tied" and two.manifest["onnx"]["lm_head"] == "float"
    table = 384 * 128 * bits // 8
    graph = onnx.load(str(one.model_file), load_external_data=False).graph
    assert [list(t.dims) for t in graph.initializer if 384 in t.dims] == [[384, 128]]
    assert two.manifest["size_bytes"] - one.manifest["size_bytes"] > 0.95 * table  # the graphs differ a little too
    w = read_weights(one.model_file)
    np.testing.assert_array_equal(w["lm_head.weight"], w["model.embed_tokens.weight"])
    logits = []
    for art in (one, two):
        with api.open_backend(art) as be:
            logits.append(be.logits(TOKENS))
    np.testing.assert_array_equal(logits[0], logits[1])  # so greedy decoding is the same
    kind = "FP16" if bits == 16 else "FP32"
    a, b = api.inspect(one.path), api.inspect(two.path)
    assert b["type_bytes"][kind] - a["type_bytes"][kind] == table and b["type_counts"][kind] == a["type_counts"][kind] + 1
    assert one.manifest["n_params"] == two.manifest["n_params"]
    # inspect counts every parameter, norms and biases too (as GGUF's): the source checkpoint's count
    assert a["n_params"] == b["n_params"] == one.manifest["source"]["n_params"]
    # an artifact of an earlier version did not list the copy in its manifest: inspect finds it in the graph
    manifest = json.loads((two.path / "edgekit.json").read_text())
    del manifest["tensors"]["lm_head.weight"]
    (two.path / "edgekit.json").write_text(json.dumps(manifest))
    old = api.inspect(two.path)
    assert old["type_bytes"] == b["type_bytes"] and old["n_params"] == b["n_params"]


def test_int8_activation_kernels_stay_close(tiny_models, tmp_path):
    """The default accuracy_level 4 (int8 activations, the fast CPU path) stays near the exact product."""
    from edgekit.converters.formats.onnx import read_weights

    src = tiny_models["LlamaForCausalLM"]
    art = convert(src, tmp_path / "q", bits=4)
    ref = torch_logits(src, read_weights(art.model_file), TOKENS)
    with api.open_backend(art) as be:
        got = be.logits(TOKENS)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_calibrated_methods_carry_into_onnx(tiny_llama, tmp_path, method):
    """GPTQ / AWQ fit the MatMulNBits grid: the graph holds exactly the weights the calibrated PyTorch
    model carries (AWQ's rescaled norms included), and GPTQ's weights differ from RTN's."""
    from edgekit.calibration import CalibConfig
    from edgekit.converters.formats.onnx import OnnxFormat, read_weights

    q = api.make_quantizer(method, CalibConfig(samples=4, seqlen=64))
    from edgekit.model import HFCheckpoint

    out = tmp_path / "out"
    out.mkdir()
    OnnxFormat().convert(HFCheckpoint.open(tiny_llama), out, ConvertRecipe(bits=4, method=method,
                                                                         extra={"accuracy_level": 0}), q)
    got = read_weights(out / "model.onnx")
    carried = {k: v.detach().float().numpy() for k, v in q.model.state_dict().items()}
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.1.input_layernorm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(got[name], carried[name], err_msg=name)
    rtn = read_weights(convert(tiny_llama, tmp_path / "rtn", bits=4, accuracy_level=0).model_file)
    assert not np.array_equal(rtn["model.layers.0.mlp.down_proj.weight"], got["model.layers.0.mlp.down_proj.weight"])


def test_single_file_and_protobuf_limit(tiny_llama, tmp_path, monkeypatch):
    art = convert(tiny_llama, tmp_path / "one", bits=4, external_data=False)
    assert sorted(p.name for p in art.path.glob("model.onnx*")) == ["model.onnx"]
    with api.open_backend(art) as be:
        assert be.logits(TOKENS[:4]).shape == (4, be.n_vocab)
    from edgekit.converters.formats.onnx import format as fmt

    monkeypatch.setattr(fmt, "PROTOBUF_LIMIT", 1 << 20)
    with pytest.raises(InputError, match="2 GiB"):
        convert(tiny_llama, tmp_path / "big", bits=32, external_data=False)
    assert not (tmp_path / "big").exists()


def test_bad_options(tiny_llama, tiny_models, tmp_path):
    with pytest.raises(UnsupportedError, match="head size 24"):
        convert(tiny_models["head24"], tmp_path / "a")
    with pytest.raises(UnsupportedError, match="opset"):
        convert(tiny_llama, tmp_path / "a", opset=11)
    with pytest.raises(InputError, match="bits 3"):
        convert(tiny_llama, tmp_path / "a", bits=3)
    with pytest.raises(InputError, match="unknown ONNX option"):
        convert(tiny_llama, tmp_path / "a", colour="red")
    with pytest.raises(InputError, match="tied"):
        convert(tiny_llama, tmp_path / "a", embed="int8", lm_head="tied")
    with pytest.raises(InputError, match="below the smallest file"):
        api.convert(tiny_llama, "onnx", output=tmp_path / "a", recipe=ConvertRecipe(bits=None, bpw=3.0))
    with pytest.raises(InputError, match="not a MatMulNBits grid"):
        api.convert(tiny_llama, "onnx", output=tmp_path / "a",
                    recipe=ConvertRecipe(bits=4, tensor_types=(("ffn_down", "Q6_K"),)))
    with pytest.raises(InputError, match="quantized ONNX model"):
        api.convert(tiny_llama, "onnx", output=tmp_path / "a", recipe=ConvertRecipe(bits=16, bpw=8.0))
    with pytest.raises(InputError, match="--bits 4 or 8"):
        convert(tiny_llama, tmp_path / "a", bits=32, method="gptq")
    assert not (tmp_path / "a").exists()


def test_corrupt_graph_and_missing_data_fail_clearly(tiny_llama, tmp_path):
    art = convert(tiny_llama, tmp_path / "q", bits=4)
    data = art.path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="re-run 'edgekit convert'"):
        api.open_backend(art.path)
    art.model_file.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(CorruptFileError, match="re-run 'edgekit convert'"):
        api.open_backend(art.path)
    assert Artifact.open(art.path).format == "onnx"


def test_inspect_reports_graph_and_memory(tiny_llama, tmp_path):
    art = convert(tiny_llama, tmp_path / "q", bits=4)
    info = api.inspect(art.path, ctx=1024)
    assert info["format"] == "onnx" and info["type_counts"]["UINT4_B32"] == 2 * 7 + 1  # linears and the lm_head
    # fp32 KV cache: 2 (K, V) x layers x ctx x kv heads x head dim x 4 bytes
    assert info["memory"]["kv_cache"] == 2 * 2 * 1024 * 2 * 64 * 4
    assert info["onnx"]["ops"]["com.microsoft::MatMulNBits"] == 2 * 4 + 1
    # the manifest (ls's bpw column) counts as inspect does: the weights' stored bytes over every parameter
    assert art.manifest["bpw"] == info["bpw"] and art.manifest["n_params"] == info["n_params"]
    assert info["bpw"] < 8 * art.manifest["size_bytes"] / info["n_params"]  # the files hold the graph too


def test_sdk_takes_typed_format_options(tiny_llama, tmp_path):
    from edgekit.converters.formats.onnx import OnnxOptions

    art = api.convert(tiny_llama, "onnx", output=tmp_path / "o",
                      options=OnnxOptions(bits=4, block_size=64, lm_head="int8", symmetric=True))
    types = {t["type"] for t in art.manifest["tensors"].values()}
    assert "INT4_B64" in types and "INT8_B64" in types
    with pytest.raises(InputError, match="options for gguf|gguf format takes no options"):
        api.convert(tiny_llama, "gguf", output=tmp_path / "g", options=OnnxOptions())


CAL = api.CalibConfig(samples=4, seqlen=32)


def test_bpw_budget_allocates_grids_by_sensitivity(tiny_models, tmp_path):
    """--bpw for ONNX: the file lands at or under the budget, fused projections share one grid, a
    larger budget buys lower measured error, and the graph is exactly PyTorch with the same weights."""
    from edgekit.converters.formats.onnx import read_weights

    src = tiny_models["Qwen2ForCausalLM"]  # tied: the shared head/embedding is budgeted too
    arts = {bpw: api.convert(src, "onnx", output=tmp_path / str(bpw), recipe=ConvertRecipe(
        bits=None, bpw=bpw, calib=CAL, extra={"accuracy_level": 0})) for bpw in (6.0, 8.5)}
    err = {}
    for bpw, art in arts.items():
        m = art.manifest
        assert m["bpw"] <= bpw and m["budget"]["bpw_planned"] <= bpw and m["preset"] == f"{bpw:g} bpw"
        assert m["bpw"] == api.inspect(art.path)["bpw"] == pytest.approx(m["budget"]["bpw_planned"], abs=0.02), m["budget"]["bpw_planned"]
        assert m["budget"]["sensitivity"] == "fisher"
        grids, errors = m["budget"]["grids"], m["budget"]["errors"]
        assert "blk.0.attn_qkv" in grids and "token_embd.weight" in grids
        t = m["tensors"]
        assert len({t[f"model.layers.0.self_attn.{p}_proj.weight"]["type"] for p in "qkv"}) == 1
        assert t["model.layers.1.mlp.gate_proj.weight"]["type"] == t["model.layers.1.mlp.up_proj.weight"]["type"]
        err[bpw] = sum(errors[u][g] for u, g in grids.items())
        w = read_weights(art.model_file)
        with api.open_backend(art) as be:
            got = be.logits(TOKENS)
        assert np.abs(got - torch_logits(src, w, TOKENS)).max() < 1e-4 * max(1.0, np.abs(got).max())
    assert err[8.5] < 0.5 * err[6.0]
    assert arts[8.5].manifest["size_bytes"] > arts[6.0].manifest["size_bytes"]


def test_output_fisher_is_the_loss_gradient_per_channel(tiny_models):
    """What the budget weights each row's error with: for the tied head it is E[(softmax - onehot)^2] per
    vocabulary row from the same logits; every linear gets one non-negative value per output channel; the
    lookup term sums each token's squared embedding gradients."""
    import torch

    from edgekit.converters.quantize.pipeline import LayerPipeline
    from edgekit.model import HFCheckpoint

    ckpt = HFCheckpoint.open(tiny_models["Qwen2ForCausalLM"])
    pipe = LayerPipeline(CAL)
    fisher, (ids, g2) = pipe.output_fisher(ckpt)
    model, tokens = pipe.load(ckpt, None)
    with torch.no_grad():
        p = model(tokens, use_cache=False).logits[:, :-1].double().softmax(-1)
    onehot = torch.nn.functional.one_hot(tokens[:, 1:], p.shape[-1])
    want = ((p - onehot) ** 2).reshape(-1, p.shape[-1]).mean(0).numpy()
    np.testing.assert_allclose(fisher["token_embd.weight"], want, rtol=1e-4, atol=1e-12)
    hp = ckpt.hparams
    assert len(fisher) == 7 * hp.n_layer + 1 and all((v >= 0).all() and v.any() for v in fisher.values())
    assert fisher["blk.1.attn_k.weight"].shape == (ckpt.tensors["model.layers.1.self_attn.k_proj.weight"].shape[0],)
    assert set(ids.tolist()) == set(tokens.unique().tolist()) and g2.shape == (len(ids), model.config.hidden_size)
    assert (g2 >= 0).all() and g2.sum() > 0


def test_tensor_type_overrides_pick_grids(tiny_llama, tmp_path):
    art = api.convert(tiny_llama, "onnx", output=tmp_path / "o", recipe=ConvertRecipe(
        bits=4, tensor_types=(("ffn_down", "INT8_B64"), ("attn_k", "UINT4_B128"))))
    t = art.manifest["tensors"]
    assert t["model.layers.0.mlp.down_proj.weight"]["type"] == "INT8_B64"
    # k shares its MatMulNBits with q and v: the whole fused group follows
    assert {t[f"model.layers.1.self_attn.{p}_proj.weight"]["type"] for p in "qkv"} == {"UINT4_B128"}
    assert t["model.layers.0.mlp.up_proj.weight"]["type"] == "UINT4_B32"
    with api.open_backend(art) as be:
        assert np.isfinite(be.logits(TOKENS)).all()
    with pytest.raises(InputError, match="matches no quantized tensor"):
        api.convert(tiny_llama, "onnx", output=tmp_path / "x", recipe=ConvertRecipe(
            bits=4, tensor_types=(("nothing_here", "INT8_B64"),)))
    assert not (tmp_path / "x").exists()


def test_cli_bpw_for_onnx(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "onnx", "--bpw", "9", "--calib-samples", "2",
                                 "--calib-seqlen", "32", "--bpw-types", "UINT4_B32,INT8_B32", "-O", "sensitivity=hessian",
                                 "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "edgekit.json").read_text())
    assert set(m["budget"]["grids"].values()) <= {"UINT4_B32", "INT8_B32"} and m["bpw"] <= 9.0
    assert m["budget"]["sensitivity"] == "hessian"
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "onnx", "--bpw", "9", "-O", "sensitivity=kl",
                                 "-o", str(tmp_path / "d")])
    assert r.exit_code != 0 and "use fisher or hessian" in r.output and not (tmp_path / "d").exists()


def _with_config(src, dst, **changes):
    """A copy of checkpoint ``src`` whose config.json has ``changes`` (None removes a key)."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


# (arch, config changes, each layer's window as transformers builds it)
WINDOWS = {
    "qwen2-window-off": ("Qwen2ForCausalLM", dict(sliding_window=8, use_sliding_window=False), [0, 0]),
    "qwen2-last-layer": ("Qwen2ForCausalLM", dict(sliding_window=8, use_sliding_window=True, max_window_layers=1,
                                                  layer_types=None), [0, 8]),
    "qwen2-layer-types": ("Qwen2ForCausalLM", dict(sliding_window=8, use_sliding_window=True, max_window_layers=5,
                                                   layer_types=["sliding_attention", "full_attention"]), [8, 0]),
    "mistral-every-layer": ("MistralForCausalLM", dict(sliding_window=8), [8, 8]),
}


@pytest.fixture(scope="module")
def window_models(tmp_path_factory):
    from tests.helpers import build_tiny_model

    root = tmp_path_factory.mktemp("windows")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("Qwen2ForCausalLM", "MistralForCausalLM")}


@pytest.mark.parametrize("case", list(WINDOWS))
def test_sliding_windows_follow_transformers_per_layer(window_models, tmp_path, case):
    from edgekit.attention import layer_windows

    arch, changes, want = WINDOWS[case]
    src = _with_config(window_models[arch], tmp_path / "src", **changes)
    cfg = transformers.AutoConfig.from_pretrained(src)
    got = layer_windows(json.loads((src / "config.json").read_text()), 2)
    assert got == want
    if arch == "Qwen2ForCausalLM":  # what transformers' own config says
        assert [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types] == \
            [w or None for w in want]
    ref = torch_logits(src, None, TOKENS)  # 40 tokens: well past the window of 8
    art = convert(src, tmp_path / "f32", bits=32)
    gqa = [n for n in onnx.load(str(art.model_file), load_external_data=False).graph.node
           if n.op_type == "GroupQueryAttention"]
    assert [next(a.i for a in n.attribute if a.name == "local_window_size") for n in gqa] == [w or -1 for w in want]
    with api.open_backend(art) as be:
        assert np.abs(be.logits(TOKENS) - ref).max() < 1e-4


def test_block_size_error_names_a_fix_that_exists(tmp_path):
    from tests.helpers import build_tiny_model

    src = build_tiny_model(tmp_path / "h200", "LlamaForCausalLM", hidden=200, ffn=400, heads=4, kv_heads=2)
    with pytest.raises(InputError, match=r"no block size .* divides 200 and 400: export it in float \(--bits 16 or 32\)"):
        convert(src, tmp_path / "a", bits=4)
    wide = build_tiny_model(tmp_path / "h192", "LlamaForCausalLM", hidden=192, ffn=384, heads=4, kv_heads=2)
    with pytest.raises(InputError, match="use --block-size 64, which divides both"):
        convert(wide, tmp_path / "a", bits=4, block_size=128)
