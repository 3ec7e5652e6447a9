"""AWQ on tiny random decoder layers: scales are exact in float, help where activations have outliers,
clipping never hurts on its sample, and alpha = 0 is round-to-nearest bit for bit."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgekit.arch import ARCHITECTURES, AWQ_LAYOUTS, awq_layout  # noqa: E402
from edgekit.converters.quantize import awq, ggml  # noqa: E402
from edgekit.errors import InputError, UnsupportedError  # noqa: E402

LAYOUT = awq_layout("llama")
GROUP = {g.prev: g for g in LAYOUT.groups}
OUTLIERS = [3, 50, 77, 130, 200]  # hidden channels scaled 20x in the embeddings the layers see


def tiny_model(arch: str, kv_heads: int = 2, seed: int = 0):
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that dividing them is really tested
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else torch.randn_like(p) * 0.1)
    return model


def outlier_embeddings(seed: int = 10, batch: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, 64, 256, generator=gen)
    emb[..., OUTLIERS] *= 20
    return emb


def capture(model, emb: torch.Tensor, layer_idx: int = 0) -> dict[str, torch.Tensor]:
    """The inputs each linear of one layer sees, as (tokens, in)."""
    layer = model.model.layers[layer_idx]
    caps: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda mod, args, out: caps.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in LAYOUT.linears]
    with torch.no_grad():
        model(inputs_embeds=emb)
    for h in handles:
        h.remove()
    return caps


def weights(layer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def group_error(layer, group, inputs, qtype, s=None) -> float:
    """||X W^T - (X/s) Q(W s)^T||^2 / n over the group's linears, computed directly from X."""
    total = 0.0
    for name in group.linears:
        w = layer.get_submodule(name).weight.detach().numpy()
        scale = np.ones(w.shape[1], np.float32) if s is None else s.numpy()
        total += awq.output_error(w, ggml.quantize_roundtrip(w * scale, qtype)[1] / scale, inputs)
    return total


# ---- the table ------------------------------------------------------------------------------


def test_every_architecture_has_an_awq_layout():
    for hf_class, spec in ARCHITECTURES.items():
        if spec.packing is not None:  # ternary checkpoints (BitNet): nothing for AWQ to round
            with pytest.raises(UnsupportedError, match="AWQ does not know"):
                awq_layout(hf_class)
            continue
        assert awq_layout(hf_class) is AWQ_LAYOUTS[spec.gguf_arch]
    with pytest.raises(UnsupportedError, match="AWQ"):
        awq_layout("GPTNeoXForCausalLM")


def test_layout_names_exist_in_every_decoder_layer():
    for arch in (a for a, spec in ARCHITECTURES.items() if spec.packing is None):
        layer = tiny_model(arch).model.layers[0]
        for group in awq_layout(arch).groups:
            for name in (group.prev, *group.linears):
                layer.get_submodule(name)


@pytest.mark.parametrize("kwargs", [dict(n_grid=0), dict(clip_grid=0), dict(clip_min_ratio=0.0),
                                    dict(clip_min_ratio=1.5), dict(n_samples=-1)])
def test_config_validation(kwargs):
    with pytest.raises(InputError):
        awq.AWQConfig(**kwargs)


def test_config_grids():
    cfg = awq.AWQConfig()
    assert cfg.alphas[0] == 0.0 and len(cfg.alphas) == 20 and max(cfg.alphas) < 1
    assert cfg.clip_ratios[0] == 1.0 and cfg.clip_ratios[-1] == pytest.approx(0.5)


# ---- (i) scales are exact in float ----------------------------------------------------------


@pytest.mark.parametrize(("arch", "kv_heads"), [
    ("LlamaForCausalLM", 2), ("MistralForCausalLM", 2), ("Qwen2ForCausalLM", 2),
    ("LlamaForCausalLM", 4), ("Qwen2ForCausalLM", 4),
])
def test_apply_scales_keeps_the_float_model(arch, kv_heads):
    model = tiny_model(arch, kv_heads)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = weights(model.model.layers[0])
    gen = torch.Generator().manual_seed(2)
    applied = []
    for layer in model.model.layers:
        for group in awq_layout(arch).groups:
            width = layer.get_submodule(group.linears[0]).in_features
            s = torch.exp(torch.empty(width).uniform_(-1.5, 1.5, generator=gen))
            if awq._skip_reason(group, layer):
                assert kv_heads < 4 and group.prev == "self_attn.v_proj"
                with pytest.raises(InputError, match="grouped-query"):
                    awq.apply_scales(group, layer, s)
                continue
            awq.apply_scales(group, layer, s)
            applied.append(group.prev)
    assert ("self_attn.v_proj" in applied) == (kv_heads == 4)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5

    after = weights(model.model.layers[0])
    if arch.startswith("Qwen2"):  # input-channel scaling leaves q/k biases alone; v's follows its rows
        for name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias"):
            assert torch.equal(before[name], after[name])
        assert torch.equal(before["self_attn.v_proj.bias"], after["self_attn.v_proj.bias"]) == (kv_heads != 4)


def test_apply_scales_rejects_bad_scales():
    layer = tiny_model("LlamaForCausalLM").model.layers[0]
    for s in (torch.zeros(256), -torch.ones(256), torch.full((256,), float("nan"))):
        with pytest.raises(InputError):
            awq.apply_scales(GROUP["input_layernorm"], layer, s)


# ---- (ii) AWQ helps where activations have outliers -----------------------------------------

# Reductions of the group's output error against s = 1 measured on this model (seed 0), on the search
# sample / on held-out tokens: Q4_0 input_layernorm 0.68/0.70, post_attention_layernorm 0.66/0.67,
# up_proj 0.09/0.07; Q4_K 0.71/0.72, 0.70/0.72, 0.07/0.06.
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_scales_reduce_error_with_outlier_channels(qtype):
    model = tiny_model("LlamaForCausalLM")
    emb = outlier_embeddings(batch=8)
    caps, held = capture(model, emb[:4]), capture(model, emb[4:])
    layer = model.model.layers[0]
    margin = {"input_layernorm": 0.5, "post_attention_layernorm": 0.5, "mlp.up_proj": 0.03}
    for prev, want in margin.items():
        group = GROUP[prev]
        before = weights(layer)
        result = awq.search_scales(group, layer, caps[group.linears[0]], lambda name, q=qtype: q)
        after = weights(layer)
        assert all(torch.equal(v, after[k]) for k, v in before.items())  # the search changes nothing
        assert result.alpha > 0 and result.scales is not None
        assert result.reduction > want, (prev, result.reduction)
        # the search's Gram-matrix errors are the direct ones (Q(W s) / s divided in float32 here)
        x = caps[group.linears[0]]
        assert result.error_rtn == pytest.approx(group_error(layer, group, x, qtype), rel=1e-9)
        assert result.error == pytest.approx(group_error(layer, group, x, qtype, result.scales), rel=1e-6)
        # and the gain is not an artefact of the sample
        x = held[group.linears[0]]
        held_gain = 1 - group_error(layer, group, x, qtype, result.scales) / group_error(layer, group, x, qtype)
        assert held_gain > want * 0.8, (prev, held_gain)
        # the outlier channels get the largest scales
        assert set(torch.topk(result.scales, len(OUTLIERS)).indices.tolist()) == set(OUTLIERS) or prev == "mlp.up_proj"


def test_gqa_skips_v_to_o():
    model = tiny_model("Qwen2ForCausalLM", kv_heads=2)
    caps = capture(model, outlier_embeddings())
    result = awq.search_scales(GROUP["self_attn.v_proj"], model.model.layers[0], caps["self_attn.o_proj"],
                               lambda name: "Q4_0")
    assert result.alpha is None and result.scales is None and "grouped-query" in result.skipped
    assert result.error == result.error_rtn > 0


# ---- (iii) clipping never hurts on its sample ------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
def test_clip_never_increases_error(qtype):
    model = tiny_model("LlamaForCausalLM")
    caps = capture(model, outlier_embeddings())
    layer = model.model.layers[0]
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # 256 and 512 wide
        lin = layer.get_submodule(name)
        w0 = lin.weight.detach().numpy().copy()
        result = awq.search_clip(lin, caps[name], qtype)
        w1 = lin.weight.detach().numpy()
        assert result.error_after <= result.error_before
        assert result.error_before == pytest.approx(
            awq.output_error(w0, ggml.quantize_roundtrip(w0, qtype)[1], caps[name]), rel=1e-9)
        assert result.error_after == pytest.approx(
            awq.output_error(w0, ggml.quantize_roundtrip(w1, qtype)[1], caps[name]), rel=1e-9)
        # clipping only shrinks magnitudes, block by block, within the ratio grid
        assert np.all(np.abs(w1) <= np.abs(w0)) and np.all(np.sign(w1) * np.sign(w0) >= 0)
        assert result.ratios.min() >= 0.5 - 1e-9
        assert np.array_equal(w0[result.ratios.min(1) == 1.0], w1[result.ratios.min(1) == 1.0])


def test_clip_lowers_q4_0_error():
    # Measured: 45-48% on o_proj, about 20% on the MLP linears of this layer.
    model = tiny_model("LlamaForCausalLM")
    caps = capture(model, outlier_embeddings())
    result = awq.search_clip(model.model.layers[0].mlp.gate_proj, caps["mlp.gate_proj"], "Q4_0")
    assert result.error_after < 0.9 * result.error_before and 0 < result.clipped_fraction < 1


# ---- (iv) alpha = 0 is round-to-nearest ---------------------------------------------------------


MIXED = {"self_attn.q_proj": "Q4_0", "self_attn.k_proj": "Q4_1", "self_attn.v_proj": "Q6_K",
         "self_attn.o_proj": "Q4_K", "mlp.gate_proj": "Q3_K", "mlp.up_proj": "Q5_0", "mlp.down_proj": "Q8_0"}


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_alpha_zero_reproduces_rtn(arch):
    model = tiny_model(arch, kv_heads=4)
    caps = capture(model, outlier_embeddings())
    layer = model.model.layers[0]
    before = weights(layer)
    rtn_bytes = {n: ggml.quantize(before[n + ".weight"].numpy(), MIXED[n]) for n in LAYOUT.linears}
    report = awq.awq_layer(layer, caps, MIXED.__getitem__, awq.AWQConfig(n_grid=1, clip=False), arch)
    assert all(torch.equal(v, weights(layer)[k]) for k, v in before.items())  # bit for bit
    for n in LAYOUT.linears:
        assert np.array_equal(ggml.quantize(layer.get_submodule(n).weight.detach().numpy(), MIXED[n]), rtn_bytes[n])
    assert report.input_scales == {} and report.clips == []
    for result in report.groups:
        assert result.alpha == 0.0 and result.scales is None
        assert result.error == result.error_rtn
        group = GROUP[result.prev]
        direct = sum(awq.output_error(before[n + ".weight"].numpy(),
                                      ggml.quantize_roundtrip(before[n + ".weight"].numpy(), MIXED[n])[1], caps[n])
                     for n in group.linears)
        assert result.error_rtn == pytest.approx(direct, rel=1e-9)


# ---- the whole layer --------------------------------------------------------------------------


def test_awq_layer_keeps_float_layer_and_reports_rescaled_inputs():
    model = tiny_model("Qwen2ForCausalLM", kv_heads=4)
    emb = outlier_embeddings()
    with torch.no_grad():
        ref = model(inputs_embeds=emb).logits
    caps = capture(model, emb)
    report = awq.awq_layer(model.model.layers[0], caps, lambda name: "Q4_0",
                           awq.AWQConfig(clip=False), "Qwen2ForCausalLM")
    assert [g.prev for g in report.groups] == [g.prev for g in LAYOUT.groups]
    assert all(g.error <= g.error_rtn for g in report.groups)
    assert set(report.input_scales) >= {"self_attn.q_proj", "mlp.gate_proj"}
    with torch.no_grad():
        out = model(inputs_embeds=emb).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    recaptured, rescaled = capture(model, emb), report.rescale_inputs(caps)
    for name in LAYOUT.linears:
        scale = rescaled[name].abs().max()
        assert float((recaptured[name] - rescaled[name]).abs().max() / scale) < 1e-5, name


def test_awq_layer_clips_all_but_q_and_k():
    model = tiny_model("LlamaForCausalLM")
    caps = capture(model, outlier_embeddings())
    layer = copy.deepcopy(model.model.layers[0])
    with torch.inference_mode():  # as the calibration driver runs it
        report = awq.awq_layer(layer, caps, lambda name: "Q4_0", awq.AWQConfig(n_grid=4), "llama")
    assert [c.linear for c in report.clips] == [n for n in LAYOUT.linears if n not in LAYOUT.no_clip]
    assert all(c.error_after <= c.error_before for c in report.clips)
    assert report.groups[1].skipped  # GQA: v_proj -> o_proj
    summary = json.loads(json.dumps(report.to_json()))
    assert [g["alpha"] for g in summary["groups"]] == [g.alpha for g in report.groups]
    assert "skipped" in summary["groups"][1] and len(summary["clip"]) == len(report.clips)
    with pytest.raises(InputError, match="captured inputs"):
        awq.awq_layer(layer, {"mlp.down_proj": caps["mlp.down_proj"]}, lambda name: "Q4_0")
