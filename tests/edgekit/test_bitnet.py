"""BitNet b1.58 checkpoints (Hugging Face's ``BitNetForCausalLM``, packed offline for ``BitLinear``): the packed
layout agrees with transformers', and llama.cpp's ``bitnet`` architecture on edgekit's GGUF gives the logits
transformers' BitNet gives on the same weights.

transformers' ``BitLinear`` on CPU (float32 here, the model's dtype) rounds each token's activations to int8
(absmax per token) before the ternary matmul and divides by ``weight_scale`` after it; llama.cpp's bitnet graph
does not round activations itself, but its TQ1_0/TQ2_0 dot products round them to 8 bits per 256 (Q8_K). So:
F32 GGUF == transformers with its activation rounding switched off, to float tolerance (4e-4 of the largest
logit: llama.cpp's f16 KV cache); TQ1_0/TQ2_0 GGUF == transformers as shipped, to within what its own int8
rounding moves the logits (both 8-bit activation roundings are about equally far from exact).
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from edgekit import api
from edgekit.errors import UnsupportedError
from edgekit.model import HFCheckpoint
from edgekit.packing import pack_ternary, unpack_ternary

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOKENS = [1, 17, 42, 99, 5, 63, 120, 7, 33, 250, 11, 64]


@pytest.fixture(autouse=True)
def _eager():
    # BitLinear's helpers are @torch.compile'd: minutes of C++ compilation on CPU for nothing here
    with torch._dynamo.config.patch(disable=True):
        yield


def build_bitnet(folder, hidden_act: str = "silu", seed: int = 0):
    """A 2-block BitNet b1.58 checkpoint: random trits packed as transformers packs them, per-tensor scales."""
    from safetensors.torch import save_file

    from tests.helpers import build_tiny_model

    build_tiny_model(folder, "LlamaForCausalLM", hidden=256, ffn=512, tie=True)  # the tokenizer files
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    cfg = transformers.BitNetConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                    hidden_act=hidden_act)
    rng = np.random.default_rng(seed)
    sd = {}
    for name, p in transformers.BitNetForCausalLM(cfg).state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith("_proj.weight"):
            sd[name] = torch.from_numpy(pack_ternary(rng.choice([-1, 0, 1], p.shape, p=[0.3, 0.4, 0.3])))
            sd[name + "_scale"] = torch.tensor([rng.uniform(8, 24)], dtype=torch.float32)
        elif "norm" in name:
            sd[name] = torch.from_numpy(rng.uniform(0.5, 1.5, p.shape).astype(np.float32))
        else:
            sd[name] = torch.from_numpy(rng.normal(0, 0.5, p.shape).astype(np.float32))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**cfg.to_dict(), "architectures": ["BitNetForCausalLM"],
              "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                      "quantization_mode": "offline"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bitnet(tmp_path_factory):
    return build_bitnet(tmp_path_factory.mktemp("bitnet") / "m")


@pytest.fixture(scope="module")
def hf_logits(bitnet):
    """transformers' logits without and with its activation rounding (computed once for the module)."""
    with torch._dynamo.config.patch(disable=True):
        return {False: _hf_logits(bitnet, False), True: _hf_logits(bitnet, True)}


def _hf_logits(folder, act_quant: bool) -> np.ndarray:
    from transformers.integrations import bitnet as hf_bitnet

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert isinstance(model.model.layers[0].mlp.down_proj, hf_bitnet.BitLinear)
    if not act_quant:
        for m in model.modules():
            if isinstance(m, hf_bitnet.BitLinear):
                m.activation_quant = lambda x: (x, torch.ones_like(x[..., :1]))
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def test_packing_matches_transformers_and_round_trips():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    rng = np.random.default_rng(1)
    t = rng.integers(-1, 2, (64, 24))
    packed = pack_ternary(t)
    assert np.array_equal(packed, pack_weights(torch.from_numpy(t.copy())).numpy())
    assert np.array_equal(unpack_ternary(packed), t)
    assert np.array_equal(unpack_weights(torch.from_numpy(packed), dtype=torch.int8).numpy(), t)


def test_checkpoint_reads_trits_and_scales(bitnet):
    ckpt = HFCheckpoint.open(bitnet)
    assert ckpt.spec.gguf_arch == "bitnet"
    ref = ckpt.tensors["model.layers.0.mlp.down_proj.weight"]
    assert ref.shape == (256, 512) and ref.dtype == "U8"  # stored (64, 512)
    w = ckpt.load("model.layers.0.mlp.down_proj.weight")
    assert w.shape == (256, 512) and set(np.unique(w)) <= {-1.0, 0.0, 1.0}
    s = ckpt.load("model.layers.0.mlp.down_proj.weight_scale")
    assert s.shape == (1,) and 1 / 24 <= s[0] <= 1 / 8  # the multiplier, 1 / weight_scale
    assert ckpt.spec.gguf_name("model.layers.0.mlp.down_proj.weight_scale") == "blk.0.ffn_down.scale"


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["F32", "TQ2_0", "TQ1_0"])
def test_llamacpp_logits_equal_transformers_bitnet(bitnet, hf_logits, tmp_path, qtype):
    # the token embedding (also the head) stays F32, so only the ternary linears differ between runs
    recipe = api.ConvertRecipe(bits=None, preset=qtype, tensor_types=(("token_embd", "F32"),))
    art = api.convert(bitnet, "gguf", output=tmp_path / qtype, recipe=recipe)
    reader = gguf.GGUFReader(art.path / "model.gguf")
    ckpt = HFCheckpoint.open(bitnet)
    by_name = {t.name: t for t in reader.tensors}
    assert "output.weight" not in by_name and "blk.1.attn_sub_norm.weight" in by_name
    for hf in ckpt.tensors:  # bytes round-trip: the file holds exactly the trits and the scales
        t = by_name[ckpt.spec.gguf_name(hf)]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ckpt.tensors[hf].shape)
        if hf.endswith("_proj.weight"):
            assert t.tensor_type.name == qtype
            np.testing.assert_array_equal(got, ckpt.load(hf), err_msg=hf)
        elif hf.endswith("_scale"):
            np.testing.assert_array_equal(got, ckpt.load(hf), err_msg=hf)
    with api.open_backend(art, n_ctx=64) as be:
        got = be.logits(TOKENS)
    exact = hf_logits[False]
    if qtype == "F32":  # float rounding and llama.cpp's f16 KV cache only
        err = np.abs(got - exact).max() / np.abs(exact).max()
        assert err < 2e-3 and np.array_equal(got.argmax(-1), exact.argmax(-1)), err
        return
    # TQ: transformers' int8-per-token activations against llama.cpp's 8-bit-per-256 (Q8_K) ones; the two
    # differ by no more than transformers' own rounding moves its logits (about 4% of the largest logit on
    # this random model, where every activation is noise)
    shipped = hf_logits[True]
    own = np.abs(shipped - exact).max() / np.abs(exact).max()
    err = np.abs(got - shipped).max() / np.abs(shipped).max()
    print(f"{qtype}: llama.cpp vs transformers {err:.2e}; transformers' activation rounding alone {own:.2e}")
    assert err < 1.5 * own and (got.argmax(-1) == shipped.argmax(-1)).mean() >= 0.9, (err, own)


def test_relu2_checkpoints_are_refused_with_the_reason(tmp_path):
    folder = build_bitnet(tmp_path / "r", hidden_act="relu2")
    with pytest.raises(UnsupportedError, match="computes SiLU"):
        HFCheckpoint.open(folder)


@pytest.mark.parametrize("to", ["onnx", "coreml", "mlc"])
def test_formats_whose_graphs_lack_bitnet_refuse_it_before_any_work(bitnet, tmp_path, to):
    """ONNX's and Core ML's graphs have no sub-norms or weight scales: they wrote a wrong model, exit 0."""
    from tests.edgekit.test_bad_input import assert_clean_error, no_leftovers, run_cli

    code, out = run_cli("convert", bitnet, "--to", to, "-o", tmp_path / "out")
    assert code == 2
    assert_clean_error(code, out, f"--to {to} writes", "this one is BitNetForCausalLM", "convert it with --to gguf")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)
