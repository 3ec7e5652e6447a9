"""`edgekit inspect` of a checkpoint folder: what each `convert --bits N` would write, before converting."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgekit import api
from edgekit.cli.main import app
from edgekit.converters.formats.base import ConvertRecipe


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])
@pytest.mark.parametrize("bits", [4, 2])
def test_each_mix_predicts_the_file_convert_writes(tiny_models, tmp_path, arch, bits):
    """The predicted tensor bytes, bits per weight, fallbacks and memory are those of the GGUF that
    `convert --bits N` then writes (hidden 96 makes every K-quant fall back; hidden 256 none)."""
    model = tiny_models[arch]
    info = api.inspect(model, ctx=1024)
    row = next(r for r in info["gguf"] if r["bits"] == bits)
    art = api.convert(model, "gguf", recipe=ConvertRecipe(bits=bits), output=tmp_path / "out")
    got = api.inspect(art.path, ctx=1024)
    assert row["weight_bytes"] == got["weight_bytes"]
    assert row["bpw"] == pytest.approx(got["bpw"], abs=1e-4)
    assert row["fallbacks"] == got["fallbacks"] and row["fallback_summary"] == got["fallback_summary"]
    assert row["memory_total"] == got["memory"]["total"]
    assert row["preset"] == art.manifest["preset"]
    assert (row["fallbacks"] > 0) == (arch == "MistralForCausalLM")


def test_checkpoint_report_shape_and_cli(tiny_models):
    model = tiny_models["LlamaForCausalLM"]
    info = api.inspect(model, ctx=512)
    assert info["format"] == "hf" and info["architecture"] == "llama" and info["hparams"]["block_count"] == 2
    assert info["n_params"] == sum(t["n_elements"] for t in info["tensors"])
    assert [r["preset"] for r in info["gguf"]] == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    sizes = [r["weight_bytes"] for r in info["gguf"]]
    assert sizes == sorted(sizes, reverse=True)  # fewer bits, smaller file
    f16 = info["gguf"][0]
    kv = f16["memory_total"] - f16["weight_bytes"]
    assert kv == info["memory"]["kv_cache_f16"] == 2 * 2 * 512 * 2 * 64 * 2  # K+V, layers, ctx, kv heads, dim
    result = CliRunner().invoke(app, ["inspect", str(model), "--ctx", "512"])
    assert result.exit_code == 0, result.output
    assert "Q4_K_M" in result.stdout and "Q2_K" in result.stdout and "memory @ ctx 512" in result.stdout
    data = json.loads(CliRunner().invoke(app, ["inspect", str(model), "--json"]).stdout)
    assert "tensors" not in data and len(data["gguf"]) == 7


def test_real_model_plan_matches_its_q4_k_m(real_hf, real_q4):
    """On SmolLM2 (576-wide rows) the --bits 4 row is the real artifact's: 180 fallbacks, same bytes."""
    row = next(r for r in api.inspect(real_hf)["gguf"] if r["bits"] == 4)
    got = api.inspect(real_q4)
    assert (row["weight_bytes"], row["fallbacks"]) == (got["weight_bytes"], got["fallbacks"]) and row["fallbacks"] == 180


def test_bad_checkpoint_and_ctx_say_the_fix(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text("{not json")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code != 0 and "config.json is not valid JSON" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["inspect", str(tiny_models["LlamaForCausalLM"]), "--ctx", "0"])
    assert result.exit_code != 0 and "--ctx 0 is out of range" in result.output


def test_a_checkpoint_gguf_cannot_plan_still_gets_its_report(tiny_models, monkeypatch):
    import edgekit.converters.formats.gguf.writer as writer
    from edgekit.errors import UnsupportedError

    def refuse(*a, **k):
        raise UnsupportedError("per-block FFN widths run in llama.cpp's deci architecture")

    monkeypatch.setattr(writer, "plan_tensors", refuse)
    info = api.inspect(tiny_models["LlamaForCausalLM"])
    assert info["gguf"] == [] and "deci" in info["gguf_error"] and info["n_params"] > 0
    result = CliRunner().invoke(app, ["inspect", str(tiny_models["LlamaForCausalLM"])])
    assert result.exit_code == 0 and "convert --to gguf: per-block FFN widths" in result.stdout


def test_memory_is_counted_at_the_trained_context_unless_asked(tiny_models, tmp_path):
    """A model trained for fewer than 4096 tokens gets its memory at its own context by default (it used to
    say 'memory @ ctx 4096' for a 1024-token model); a longer --ctx is honoured and marked."""
    model = tiny_models["LlamaForCausalLM"]
    trained = api.inspect(model, ctx=512)["hparams"]["context_length"]
    assert trained < 4096
    art = api.convert(model, "gguf", recipe=ConvertRecipe(bits=8), output=tmp_path / "q8")
    for target in (model, art.path):
        info = api.inspect(target)
        assert info["memory"]["ctx"] == trained and "beyond_trained" not in info["memory"]
        asked = api.inspect(target, ctx=4 * trained)
        assert asked["memory"]["ctx"] == 4 * trained and asked["memory"]["beyond_trained"] == trained
    result = CliRunner().invoke(app, ["inspect", str(art.path), "--ctx", str(4 * trained)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and f"beyond the trained context of {trained}" in result.stdout
