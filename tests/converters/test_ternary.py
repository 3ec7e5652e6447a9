"""``--method ternary``: post-hoc ternary linears stored exactly (TQ2_0 where rows allow, Q4_0 elsewhere) and
run by llama.cpp like the ternarized PyTorch model; ternary distillation lowers KL within a few steps and
resumes after Ctrl-C; the manifest and inspect report the ternary share."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.converters.quantize.ternary import TernaryConfig, TernaryQuantizer, encode
from edgekit.errors import InputError
from edgekit.model import HFCheckpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOKENS = [1, 17, 42, 99, 5, 63, 120, 7, 33, 250, 11, 64]


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """Rows of 192 (not a multiple of 256, like SmolLM2's 576) and an FFN of 512 (ffn_down fits TQ2_0)."""
    from tests.helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tern") / "m", "LlamaForCausalLM", hidden=192, ffn=512)


def _ternarized_torch_logits(src, group: int, rule: str) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ckpt = HFCheckpoint.open(src)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.endswith("." + s) for s in ckpt.spec.linear_suffixes):
                w = p.numpy()
                g = 256 if w.shape[1] % 256 == 0 else group
                qt = gguf.GGMLQuantizationType.TQ2_0 if g == 256 else gguf.GGMLQuantizationType.Q4_0
                p.copy_(torch.from_numpy(encode(w, qt, g, rule)[1]))
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.mark.llamacpp
def test_posthoc_ternary_is_exact_in_the_file_and_runs_in_llamacpp(narrow, tmp_path):
    # embedding and head in F32, so the comparison sees the ternary linears alone
    recipe = api.ConvertRecipe(bits=None, preset="TQ2_0", method="ternary",
                               tensor_types=(("token_embd", "F32"), ("^output", "F32")))
    art = api.convert(narrow, "gguf", output=tmp_path / "t", recipe=recipe)
    t = art.manifest["ternary"]
    assert t["stored_as"] == {"Q4_0": 12, "TQ2_0": 2} and t["scale"] == "best" and 0.8 < t["share"] < 0.9
    assert art.manifest["recipe"]["quantizer"]["group"] == 64
    reader = gguf.GGUFReader(art.path / "model.gguf")
    for tensor in reader.tensors:
        if not tensor.name.startswith("blk.") or "norm" in tensor.name:
            continue
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        g = 256 if tensor.tensor_type == gguf.GGMLQuantizationType.TQ2_0 else 64
        groups = values.reshape(-1, g)
        scale = np.abs(groups).max(axis=1, keepdims=True)
        assert np.all((groups == 0) | (np.abs(groups) == scale)), tensor.name  # -s, 0, +s per group
    ref = _ternarized_torch_logits(narrow, 64, "best")
    with api.open_backend(art, n_ctx=64) as be:
        got = be.logits(TOKENS)
    # llama.cpp rounds activations to 8 bits for its TQ2_0 and Q4_0 dot products (Q8_K, Q8_0)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    info = api.inspect(art.path)
    assert info["ternary"]["linears"] == 14


def test_config_validation():
    with pytest.raises(InputError, match="multiple of 32"):
        TernaryConfig(group=48)
    with pytest.raises(InputError, match="absmean"):
        TernaryConfig(scale="best", distill=object())
    with pytest.raises(InputError, match="--method ternary"):
        api.distill_config(api.method_config("gptq"), object())


def test_distillation_lowers_kl_and_resumes_after_ctrl_c(narrow, tmp_path, monkeypatch):
    from edgekit.converters.formats.gguf.writer import plan_tensors
    from edgekit.converters.structure.heal import HealConfig

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    ckpt = HFCheckpoint.open(narrow)
    plan = {t.name: t.qtype for t in plan_tensors(ckpt, api.ConvertRecipe(bits=None, preset="TQ2_0"))}
    cfg = TernaryConfig(distill=HealConfig(minutes=5, max_steps=16, lr=2e-3, batch=4, checkpoint_s=0),
                        calib=CalibConfig(samples=10, seqlen=32))
    seen: list[str] = []

    def stop_at_4(desc, done, total):
        if desc.startswith("ternary distillation: step"):
            seen.append(desc)
            if len(seen) == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TernaryQuantizer(cfg).prepare(ckpt, plan, stop_at_4)
    state = json.loads(next((tmp_path / "home" / "heal").glob("*/state.json")).read_text())
    assert state["step"] == 4 and not state["done"]
    seen.clear()
    q = TernaryQuantizer(cfg)
    q.prepare(ckpt, plan, lambda d, a, b: seen.append(d))
    assert seen[0].startswith("note: ternary distillation resumes from step 4,")  # said once, then continued
    assert seen[1].startswith("ternary distillation: step 5") and sum(d.startswith("note:") for d in seen) == 1
    report = q.report["ternary"]["distill"]
    assert report["steps"] == 16
    losses = json.loads(next((tmp_path / "home" / "heal").glob("*/state.json")).read_text())["losses"]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    # the encoded linears are the student's, ternarized by the rule it trained with
    name = "blk.0.ffn_up.weight"
    from safetensors.numpy import load_file

    student = load_file(str(q._weights))["model.layers.0.mlp.up_proj.weight"]
    raw = q.quantize(name, ckpt.load("model.layers.0.mlp.up_proj.weight"), plan[name])
    assert np.array_equal(raw, encode(student, plan[name], 64, "absmean")[0])


def test_cli_distill_belongs_to_ternary_and_inspect_shows_the_share(narrow, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    run = CliRunner()
    r = run.invoke(app, ["convert", str(narrow), "--method", "gptq", "--distill", "5m", "-o", str(tmp_path / "a")])
    assert r.exit_code != 0 and "--method ternary" in r.output and not (tmp_path / "a").exists()
    r = run.invoke(app, ["convert", str(narrow), "--method", "ternary", "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    r = run.invoke(app, ["inspect", str(tmp_path / "t")])
    assert r.exit_code == 0 and "-1/0/+1" in r.output and "TQ2_0 x2" in r.output, r.output
