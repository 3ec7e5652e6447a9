"""The MLC reference backend: an artifact's shards decoded (TVM's reader or numpy) equal PyTorch on the same
quantized weights; eval, run and chat prompts through the artifact's conversation template; push to Android
lands where MLCChat reads models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()
CALIB = {"samples": 4, "seqlen": 32}


class _Recording:
    """Wraps a quantizer and keeps what it hands the writer, by GGUF name."""

    def __init__(self, inner) -> None:
        self.inner, self.seen, self.config = inner, {}, inner.config

    def prepare(self, *a, **k):
        return self.inner.prepare(*a, **k)

    def quantize(self, name, weight, qtype):
        raw = self.inner.quantize(name, weight, qtype)
        self.seen[name] = (qtype, np.array(raw, copy=True), weight.shape)
        return raw


def _reference_model(src, seen):
    """transformers' model of ``src`` with each quantized matrix replaced by the values its records decode
    to (the grid's own dequantizer, independent of the MLC writer and reader)."""
    import torch
    import transformers

    from edgekit.converters.quantize.grids import as_grid
    from edgekit.model import HFCheckpoint

    ck = HFCheckpoint.open(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    by_gguf = {ck.spec.gguf_name(n): n for n in ck.tensors}
    state = model.state_dict()
    with torch.no_grad():
        for g, (qtype, raw, shape) in seen.items():
            grid = as_grid(qtype)
            if grid.is_float:
                continue
            w = grid.dequantize(raw.reshape(shape[0], -1))[:, : shape[1]]
            state[by_gguf[g]].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return model, ck


@pytest.mark.parametrize("quant", ["q4f16_1", "q4f16_0", "q3f16_1", "q0f16"])
def test_artifact_decodes_to_pytorch_on_the_same_quantized_weights(quant, tiny_llama, tmp_path, monkeypatch):
    _decodes_to_pytorch(tiny_llama, quant, tmp_path)


@pytest.mark.parametrize("quant", ["q4f16_1", "q4f16_0", "q3f16_1", "q0f16", "q0f32"])
def test_qwen3_artifact_decodes_to_pytorch_on_the_same_quantized_weights(quant, tiny_models, tmp_path):
    """Qwen3 (heads of 48 x 4 wider than the hidden 128, random q/k norms, tied head): the q/k norms travel
    as MLC's self_attn.q_norm / k_norm and the reference backend applies them, as PyTorch does."""
    _decodes_to_pytorch(tiny_models["Qwen3ForCausalLM"], quant, tmp_path)


def _decodes_to_pytorch(src, quant, tmp_path):
    """``src`` as an MLC ``quant`` artifact, read back by the reference backend (each reader): its state dict
    equals PyTorch's on the quantized weights the quantizer chose, tensor for tensor, and so do its logits."""
    import torch

    from edgekit import api
    from edgekit.converters.formats.mlc.format import MLCFormat
    from edgekit.converters.quantize.grids import as_grid
    from edgekit.converters.quantize.rtn import RTNQuantizer
    from edgekit.model import HFCheckpoint

    rec = _Recording(RTNQuantizer())
    out = tmp_path / "art"
    out.mkdir()
    fields = MLCFormat().convert(HFCheckpoint.open(src), out, api.ConvertRecipe(extra={"quant": quant}), rec)
    (out / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "mlc", **fields}))
    ref, ck = _reference_model(src, rec.seen)
    # what is not quantized (q0: everything, else the norms) is stored in the model dtype: fp16, or float32 as
    # bfloat16 (the tensor cache's f32-to-bf16 encoding)
    stored = torch.float16 if "f16" in quant else torch.bfloat16
    quantized = {n for n in ck.tensors if not as_grid(rec.seen[ck.spec.gguf_name(n)][0]).is_float}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name not in quantized:
                p.copy_(p.to(stored).float())
    readers = ["numpy", "tvm"] if _have_tvm() else ["numpy"]
    tokens = [1, 5, 9, 33, 77, 120, 3, 250, 17]
    with torch.inference_mode():
        want = ref(torch.tensor([tokens])).logits[0].numpy()
    for reader in readers:
        with api.open_backend(out, "mlc", reader=reader) as be:
            assert be.reader == reader
            got = be.logits(tokens)
            ours = be.model.state_dict()
            for name, t in ref.state_dict().items():
                assert torch.equal(ours[name], t), (reader, name)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_gptq_artifact_holds_the_weights_gptq_chose(tiny_llama, tmp_path):
    import torch

    from edgekit import api
    from edgekit.calibration import CalibConfig
    from edgekit.converters.formats.mlc.format import MLCFormat
    from edgekit.model import HFCheckpoint

    q = _Recording(api.make_quantizer("gptq", CalibConfig(**CALIB)))
    out = tmp_path / "art"
    out.mkdir()
    fields = MLCFormat().convert(HFCheckpoint.open(tiny_llama), out,
                                 api.ConvertRecipe(method="gptq", extra={"quant": "q4f16_1"}), q)
    (out / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "mlc", **fields}))
    ref, _ = _reference_model(tiny_llama, q.seen)
    gptq_model = q.inner.model.state_dict()
    with api.open_backend(out, "mlc") as be:
        ours = be.model.state_dict()
        for name, t in ref.state_dict().items():
            assert torch.equal(ours[name], t), name
        # the layers' linears are exactly the PyTorch model GPTQ carried through calibration
        linears = [n for n in gptq_model if ".layers." in n and n.endswith("proj.weight")]
        assert linears and all(torch.equal(ours[n], gptq_model[n].float()) for n in linears)


def test_q4f32_1_scales_are_stored_as_mlc_stores_float32(tiny_llama, tmp_path):
    """MLC's tensor cache keeps float32 tensors as bfloat16 (its f32-to-bf16 encoding); the record says
    float32 and TVM's reader returns the bf16-rounded values."""
    from edgekit import api
    from edgekit.converters.formats.mlc.cache import load_cache

    art = api.convert(tiny_llama, "mlc", output=tmp_path / "f32", recipe=api.ConvertRecipe(extra={"quant": "q4f32_1"}))
    cache = load_cache(art.path)
    s = cache["model.layers.0.self_attn.qkv_proj.q_scale"]
    assert s.dtype == np.float32 and np.all((s.view(np.uint32) & 0xFFFF) == 0)
    assert json.loads((art.path / "tensor-cache-b16.json").read_text())["records"][0]["records"][0]["dtype"] == "uint32"
    with api.open_backend(art.path, "mlc") as be:
        assert np.isfinite(be.logits([1, 2, 3])).all()


def _have_tvm() -> bool:
    import importlib.util

    return importlib.util.find_spec("tvm") is not None


@pytest.fixture(scope="module")
def chat_artifact(tiny_llama, tmp_path_factory):
    """The tiny Llama with a ChatML template, as an MLC artifact."""
    from edgekit import api

    src = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_llama, src)
    (src / "chat_template.jinja").write_text(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return src, api.convert(src, "mlc", output=src.parent / "tiny-chat-mlc").path


def test_chat_prompts_follow_the_conversation_template(chat_artifact):
    from edgekit import api
    from edgekit.runtime.torch_ref import hf_chat_ids

    _, art = chat_artifact
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello <|im_end|> there"}]
    with api.open_backend(art, "mlc") as be:
        assert be._prompt_ids(msgs) == hf_chat_ids(be.tokenizer, msgs)


def test_eval_and_run_work_on_an_mlc_artifact(chat_artifact, tmp_path):
    src, art = chat_artifact
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    r = runner.invoke(app, ["eval", str(art), "--text", str(text), "--ctx", "64", "--chunks", "2", "--ref", str(src),
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["ppl"] > 1 and 0 <= res["kl_mean"] < 0.5
    r = runner.invoke(app, ["run", str(art), "-p", "hello", "-n", "5", "--temp", "0"])
    assert r.exit_code == 0, r.output


def test_the_mlc_engine_without_mlc_llm_says_how_to_get_it(chat_artifact):
    from edgekit import api
    from edgekit.converters.formats.mlc.options import mlc_llm_available
    from edgekit.errors import UnsupportedError

    if mlc_llm_available():
        pytest.skip("mlc_llm is installed here")
    with pytest.raises(UnsupportedError, match="mlc_llm is not installed"):
        api.open_backend(chat_artifact[1], "mlc", engine="mlc")


def test_awq_artifact_carries_the_norms_awq_changed(tiny_llama, tmp_path):
    """AWQ folds 1/s into the norms before the linears: the artifact must hold the changed norms, so the
    reference backend's model equals the PyTorch model AWQ+GPTQ produced, tensor for tensor."""
    import torch

    from edgekit import api
    from edgekit.calibration import CalibConfig
    from edgekit.converters.formats.mlc.format import MLCFormat
    from edgekit.model import HFCheckpoint

    q = _Recording(api.make_quantizer("awq+gptq", CalibConfig(**CALIB)))
    out = tmp_path / "art"
    out.mkdir()
    fields = MLCFormat().convert(HFCheckpoint.open(tiny_llama), out,
                                 api.ConvertRecipe(method="awq+gptq", extra={"quant": "q4f16_1"}), q)
    (out / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "mlc", **fields}))
    carried = q.inner.model.state_dict()
    with api.open_backend(out, "mlc") as be:
        ours = be.model.state_dict()
        norms = [n for n in carried if "layernorm" in n]
        ck = HFCheckpoint.open(tiny_llama)
        assert norms and any(not torch.allclose(carried[n].float(), torch.from_numpy(ck.load(n))) for n in norms)
        for n in norms:
            assert torch.equal(ours[n], carried[n].float().half().float()), n
        linears = [n for n in carried if ".layers." in n and n.endswith("proj.weight")]
        assert all(torch.equal(ours[n], carried[n].float()) for n in linears)
