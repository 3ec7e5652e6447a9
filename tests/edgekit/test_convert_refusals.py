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
