"""Combinations a format cannot honour are refused up front, naming the flags the user gave (QA s48), and
the default names and `show` tell pruned and fine-tuned artifacts from plain ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit import api
from edgekit.cli.main import app
from edgekit.errors import InputError


@pytest.mark.parametrize(("args", "says"), [
    (["--to", "coreml", "--bits", "8", "--palettize", "4"], "--palettize 4 sets the bits"),
    (["--to", "mlc", "--method", "squeezellm"], "fits palettes, which only Core ML stores"),
    (["--to", "gguf", "--method", "squeezellm"], "fits palettes, which only Core ML stores"),
    (["--to", "mlc", "--size", "1MB"], "not --size or --fit"),
    (["--to", "mlc", "--type", "Q4_0"], "--type Q4_0 is not an MLC mode"),
    (["--to", "onnx", "--method", "ternary"], "--method ternary writes GGUF's TQ2_0; use --to gguf"),
    (["--to", "aqlm", "--method", "ternary"], "--method ternary writes GGUF's TQ2_0; use --to gguf"),
    (["--method", "ternary", "--bpw", "3"], "choose with --type, not --bpw or --size"),
    (["--to", "aqlm", "--distill", "abc"], "--distill 'abc': give a duration"),
    (["--to", "aqlm", "--distill", "0m"], "--distill '0m': give a positive duration"),
    (["--to", "mlc", "--distill", "1m"], "--distill trains the student of --method ternary or of --to aqlm"),
    # a budget no run will reach: the learning rate decays over it, so it would train at full rate to the end
    (["--to", "aqlm", "--distill", "99999h"], "--distill 99999h is more than the 7 days a training may take"),
    (["--prune", "depth:1", "--heal", "8d"], "--heal 8d is more than the 7 days a training may take"),
    # 0 skips nothing: every cluster runs and the router learns nothing
    (["--sparse-ffn", "0"], "--sparse-ffn 0 would skip no FFN neuron"),
    (["-O", "sparse_ffn=0"], "-O sparse_ffn=0 would skip no FFN neuron"),
    (["--sparse-ffn", "-0.5"], "--sparse-ffn -0.5: give the share of FFN neurons to skip per token, 0 < S < 1"),
    # flags another flag overrode were dropped without a word (QA s49)
    (["--bits", "2", "--type", "Q8_0"], "--bits 2 and --type Q8_0 both choose the types; give one of them"),
    (["--bpw", "4", "--bits", "2"], "--bits 2 and --bpw 4 both choose the types"),
    (["--bits", "4", "--bpw-types", "Q4_0"], "--bpw-types lists the types a --bpw or --size budget may choose from"),
    (["--bits", "4", "--ctx", "100"], "--ctx is the context --fit sizes the model for"),
    (["--size", "1MB", "--bpw", "4"], "--size is a budget of its own: drop --bpw"),
])
def test_refused_up_front_naming_the_flags_given(tiny_llama, tmp_path, args, says):
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "-o", str(tmp_path / "out"), "-t", "1", *args])
    assert r.exit_code == InputError.exit_code, r.output
    assert says in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_default_names_carry_the_pruning(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_MODELS", str(tmp_path))
    model = Path("SmolLM2-135M")
    names = {api.default_output(model, "gguf", api.ConvertRecipe(bits=4, method=m, prune=p),
                                api.method_config(m, api.CalibConfig(), prune=w) if w else None).name
             for m, p, w in [("gptq", None, None), ("gptq", None, "sparsegpt:2:4"), ("imatrix", None, "wanda:0.5"),
                             ("imatrix", None, "magnitude:0.5"), ("rtn", "width:ffn=256", None),
                             ("rtn", "width:ffn=128", None), ("rtn", "depth:layers=0", None),
                             ("rtn", "depth:layers=1", None), ("rtn", "depth:4", None)]}
    assert len(names) == 9, names
    assert "smollm2-135m-gguf-q4_k_m-gptq-sparsegpt2_4" in names and "smollm2-135m-d4-gguf-q4_k_m" in names
    assert "smollm2-135m-gguf-q4_k_m-imatrix-wanda50" in names and "smollm2-135m-widthffn256-gguf-q4_k_m" in names


def test_show_says_what_training_and_pruning_did():
    from edgekit.cli.render import training_notes

    m = {"sparsity": {"mean": 0.5, "linears": 14, "steps": ["sparsegpt:2:4"]},
         "aqlm": {"scheme": "2x8", "distill": {"steps": 189, "minutes": 0.2, "kl_before": 0.3753, "kl_after": 0.3753,
                                               "kl_trained": 0.3944, "kept": False}}}
    assert training_notes(m) == ["pruned sparsegpt:2:4 (50% zeros)",
                                 "distilled 189 steps (KL 0.3753 -> 0.3944, worse: not kept)"]
    assert training_notes({"aqlm": {"distill": "x"}, "sparsity": [1]}) == []  # a hand-edited manifest


def test_durations_take_days_up_to_a_week():
    from edgekit.converters.structure.heal import MAX_MINUTES, HealConfig

    assert HealConfig.parse_minutes("1d") == 1440 and HealConfig.parse_minutes("7d") == MAX_MINUTES == 7 * 1440
    with pytest.raises(InputError, match=r"^--distill 169h is more than the 7 days a training may take: the learning "
                                         r"rate decays over the whole budget"):
        HealConfig.parse_minutes("169h", "--distill")
    with pytest.raises(InputError, match="a time budget of 1e\\+06 minutes is more than the 7 days"):
        HealConfig(minutes=1e6)  # the SDK's config, not only the flag


@pytest.mark.parametrize(("args", "scheme", "suffix"), [
    ([], "2x8", "aqlm-2x8"),  # AQLM's own default: 2 bits, as the README's commands
    (["--bits", "4"], "4x8", "aqlm-4x8"),  # given: as given
])
def test_aqlm_defaults_to_2_bits_and_other_formats_keep_4(tiny_llama, tmp_path, monkeypatch, args, scheme, suffix):
    from edgekit.converters.formats.aqlm.options import AQLMOptions

    seen = []

    def convert(model, to, *, recipe, **kw):
        seen.append((to, recipe))
        raise InputError("stopped before converting")

    monkeypatch.setattr(api, "convert", convert)
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "aqlm", *args])
    assert r.exit_code == InputError.exit_code and "stopped before converting" in r.output, r.output
    (to, recipe), = seen
    assert AQLMOptions.from_recipe(recipe).scheme == scheme and api.default_output_suffix(to, recipe) == suffix
    seen.clear()
    r = CliRunner().invoke(app, ["convert", str(tiny_llama)])
    assert seen[0][1].bits == 4 and api.default_output_suffix("gguf", seen[0][1]) == "gguf-q4_k_m"


def test_calibration_flags_a_method_does_not_use_are_noted(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "-o", str(tmp_path / "q8"), "--type", "Q8_0",
                                 "--calib-samples", "4"])
    assert r.exit_code == 0, r.output
    assert "--calib-samples: --method rtn rounds without calibration data: no effect" in " ".join(r.stderr.split())


def test_a_default_name_another_model_holds_is_named_before_it_is_replaced(tiny_models, tmp_path, monkeypatch):
    """Two models in folders of one name share a default name; --force replaced the other model's artifact
    and its evaluations without a word (QA s49). -O output_type is a per-tensor choice, named -custom."""
    import shutil

    from edgekit.errors import OutputExistsError

    monkeypatch.setenv("EDGEKIT_MODELS", str(tmp_path / "lib"))
    mine, other = tmp_path / "tiny", tmp_path / "other" / "tiny"
    shutil.copytree(tiny_models["LlamaForCausalLM"], mine)
    shutil.copytree(tiny_models["MistralForCausalLM"], other)
    first = api.convert(mine, "gguf", recipe=api.ConvertRecipe(bits=8))
    with pytest.raises(OutputExistsError, match=f"holds a conversion of {mine}, not of {other}"):
        api.convert(other, "gguf", recipe=api.ConvertRecipe(bits=8))
    again = api.convert(other, "gguf", recipe=api.ConvertRecipe(bits=8), force=True)
    assert again.path == first.path and f"was a conversion of {mine}" in " ".join(again.notes)
    notes = api.convert(other, "gguf", recipe=api.ConvertRecipe(bits=8), force=True).notes
    # its own: replaced as before, nothing more said (but the Mistral fixture's SentencePiece warning)
    assert [n for n in notes if "SentencePiece" not in n] == [f"replaced {first.path} (an earlier edgekit output)"]
    custom = api.convert(mine, "gguf", recipe=api.ConvertRecipe(bits=8, extra={"output_type": "Q8_0"}))
    assert custom.path.name == first.path.name + "-custom"
