"""The numpy reference evaluator of saved Core ML programs against PyTorch, and the Core ML backend."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

# Qwen3: per-head q/k RMSNorms (random weights) before rotary, heads of 48 x 4 = 192 wider than the hidden 128
ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
PROMPT = [3, 17, 5, 60, 11, 42, 8, 99, 23, 7, 31, 2]
DECODE = [14, 77, 5, 90, 33, 12, 64, 3, 28, 50]


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """The tiny models with norms and biases moved off their initial 1 and 0 (which a program could get
    wrong, or coremltools fold away, without any logit showing it)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("coreml-src")
    rng = np.random.default_rng(0)
    out = {}
    for arch, path in tiny_models.items():
        dst = root / arch
        shutil.copytree(path, dst)
        f = dst / "model.safetensors"
        t = load_file(f)
        for name, v in t.items():
            if v.ndim == 1:
                base = 1.0 if "norm" in name else 0.0
                t[name] = (base + 0.2 * rng.standard_normal(v.shape)).astype(v.dtype)
        save_file(t, f, metadata={"format": "pt"})
        out[arch] = dst
    return out


@pytest.fixture(scope="module")
def fp16_programs(checkpoints, tmp_path_factory):
    from edgekit import api

    root = tmp_path_factory.mktemp("coreml-fp16")
    return {arch: api.convert(path, "coreml", output=root / arch, recipe=api.ConvertRecipe(bits=16))
            for arch, path in checkpoints.items()}


def _reference(path, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluator_matches_pytorch_over_prefill_and_ten_decode_steps(arch, fp16_programs, checkpoints):
    from edgekit.runtime.coreml import causal_mask
    from edgekit.runtime.coreml_mil import MILEvaluator

    ev = MILEvaluator(fp16_programs[arch].model_file)
    ref = _reference(checkpoints[arch], PROMPT + DECODE)  # rows: the prompt's, then one per decode step
    state = ev.new_state()
    got = [ev.run({"input_ids": np.array([PROMPT], np.int32), "causal_mask": causal_mask(0, len(PROMPT))},
                  state)["logits"][0]]
    for i, tok in enumerate(DECODE):
        pos = len(PROMPT) + i
        got.append(ev.run({"input_ids": np.array([[tok]], np.int32), "causal_mask": causal_mask(pos, 1)},
                          state)["logits"][0])
    logits = np.concatenate(got)
    want = ref
    assert logits.shape[0] == len(PROMPT) + 10
    err = np.abs(logits - want).max()
    # fp16 storage between ops: a few units in the last place of fp16 at the logits' scale
    assert err < 4e-3 * np.abs(want).max() + 2e-3, err
    assert (logits.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_the_state_carries_the_cache_between_calls(fp16_programs, checkpoints):
    from edgekit.runtime.coreml import causal_mask
    from edgekit.runtime.coreml_mil import MILEvaluator

    arch = "LlamaForCausalLM"
    ev = MILEvaluator(fp16_programs[arch].model_file)
    ref = _reference(checkpoints[arch], PROMPT + DECODE[:1])
    state = ev.new_state()
    ev.run({"input_ids": np.array([PROMPT], np.int32), "causal_mask": causal_mask(0, len(PROMPT))}, state)
    assert np.any(state["k_cache_0"][0, :, : len(PROMPT)]) and not np.any(state["k_cache_0"][0, :, len(PROMPT):])
    step = {"input_ids": np.array([DECODE[:1]], np.int32), "causal_mask": causal_mask(len(PROMPT), 1)}
    with_cache = ev.run(step, state)["logits"][0, 0]
    without = ev.run(step, ev.new_state())["logits"][0, 0]  # same mask, empty cache: zero keys and values
    scale = np.abs(ref[-1]).max()
    assert np.abs(with_cache - ref[-1]).max() < 4e-3 * scale + 2e-3
    assert np.abs(without - ref[-1]).max() > 0.05 * scale


def test_backend_eval_and_generation(fp16_programs, checkpoints, tmp_path):
    from edgekit import api
    from edgekit.runtime.base import BACKENDS, capabilities, open_backend

    art = fp16_programs["Qwen2ForCausalLM"]
    assert "coreml" in BACKENDS.get("coreml").formats
    assert {"memory-model", "streams-long-text", "incremental-decode"} <= set(capabilities(BACKENDS.get("coreml")))
    with open_backend(art.path, engine="numpy", n_batch=5) as be:
        ids = be.tokenize("the cat sat on the mat and then it")
        chunked = be.logits(ids)  # prompts go through in chunks of n_batch, the state carrying the rest
        assert np.abs(chunked - _reference(checkpoints["Qwen2ForCausalLM"], ids)).max() < 0.05
        text = "".join(api.generate(art, "hi", api.SamplingConfig(temperature=0, max_tokens=5), engine="numpy"))
        assert isinstance(text, str)
    text_file = tmp_path / "t.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    res = api.evaluate(art, text_file, api.EvalConfig(ctx=64, chunks=2), ref=checkpoints["Qwen2ForCausalLM"],
                       record=False)
    assert abs(res.ppl / res.ref_ppl - 1) < 0.01


def test_memory_model(fp16_programs):
    from edgekit.runtime.coreml import CoreMLBackend

    f = fp16_programs["LlamaForCausalLM"].model_file
    est = CoreMLBackend.memory_estimate(f, 512)
    # 2 layers x (k, v) x 2 KV heads x 2048 positions x 64 x fp16: allocated whole, whatever n_ctx
    assert est.parts["kv_state"] == 2 * 2 * 2 * 2048 * 64 * 2
    assert CoreMLBackend.decode_bytes_per_token(f, 100, 512) > CoreMLBackend.decode_bytes_per_token(f, 10, 512)


def test_engine_coreml_needs_macos(fp16_programs):
    import sys

    from edgekit.errors import InputError
    from edgekit.runtime.base import open_backend

    if sys.platform == "darwin":
        pytest.skip("Core ML is there")
    with pytest.raises(InputError, match="macOS"):
        open_backend(fp16_programs["LlamaForCausalLM"].path, engine="coreml")


@pytest.mark.parametrize(("arch", "extra"), [
    ("LlamaForCausalLM", {"bits": 4}), ("LlamaForCausalLM", {"bits": 8, "symmetric": True}),
    ("LlamaForCausalLM", {"palettize": 3}), ("LlamaForCausalLM", {"palettize": 3, "outliers": 1.5}),
    ("Qwen3ForCausalLM", {"bits": 4}), ("Qwen3ForCausalLM", {"palettize": 3, "outliers": 1.5}),
])
def test_evaluator_decodes_constexpr_weights_as_the_quantizer_reports(arch, extra, checkpoints, tmp_path):
    """The program's blockwise and palette weights, run by the evaluator, give the logits of PyTorch holding
    the values the quantizer said it stored (RTN: the grid's own round trip of each matrix)."""
    import transformers

    from edgekit import api
    from edgekit.converters.formats.coreml import CoreMLOptions
    from edgekit.runtime.coreml import causal_mask
    from edgekit.runtime.coreml_mil import MILEvaluator

    src = checkpoints[arch]
    extra = dict(extra)
    bits = extra.pop("bits", 16)
    art = api.convert(src, "coreml", output=tmp_path / "q", recipe=api.ConvertRecipe(bits=bits, extra=extra))
    grid = CoreMLOptions(bits=bits, **extra).grid
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(grid.quantize_roundtrip(p.numpy())[1]))
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    ev = MILEvaluator(art.model_file)
    got = ev.run({"input_ids": np.array([PROMPT], np.int32), "causal_mask": causal_mask(0, len(PROMPT))},
                 ev.new_state())["logits"][0]
    assert np.abs(got - ref).max() < 4e-3 * np.abs(ref).max() + 2e-3


def test_an_op_without_a_numpy_kernel_is_named(tmp_path):
    from edgekit.converters.formats.coreml.package import coremltools
    from edgekit.errors import UnsupportedError
    from edgekit.runtime.coreml_mil import MILEvaluator

    ct = coremltools()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((1, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.sin(x=x, name="y")

    ct.convert(prog, minimum_deployment_target=ct.target.iOS18, skip_model_load=True).save(str(tmp_path / "m.mlpackage"))
    with pytest.raises(UnsupportedError, match="no numpy kernel for op.* sin"):
        MILEvaluator(tmp_path / "m.mlpackage")
