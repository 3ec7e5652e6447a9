"""An importance matrix (llama-imatrix's GGUF) given where a model goes: every command says in one line what
the file is and how to use it (``convert MODEL --imatrix FILE``), writes nothing and exits 2; and the refusals
about ``--imatrix`` name the flag the user typed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()


def _imatrix_gguf(path: Path, *, typed: bool = True) -> Path:
    """A file laid out as llama-imatrix writes it: no general.architecture, general.type imatrix (``typed``),
    ``<tensor>.in_sum2`` and ``<tensor>.counts`` per matrix."""
    w = gguf.GGUFWriter(path, arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none
    if typed:
        w.add_type("imatrix")
    w.add_uint32("imatrix.chunk_count", 2)
    w.add_uint32("imatrix.chunk_size", 64)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        w.add_tensor(f"{name}.in_sum2", np.ones((1, 64), np.float32))
        w.add_tensor(f"{name}.counts", np.full((1, 1), 2.0, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("typed", [True, False], ids=["general.type", "tensors-only"])
@pytest.mark.parametrize("command", ["inspect", "plan", "import", "convert", "profile", "run"])
def test_an_importance_matrix_is_named_as_one(command, typed, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDGEKIT_MODELS", str(tmp_path / "lib"))
    im = _imatrix_gguf(tmp_path / "model.imatrix.gguf", typed=typed)
    out = tmp_path / "out"
    args = {"inspect": [], "plan": ["--ram", "1GiB"], "import": ["-o", str(out)],
            "convert": ["--type", "Q4_0", "-o", str(out)], "profile": ["-t", "1"],
            "run": ["-p", "hi", "-n", "2", "-t", "1"]}[command]
    r = runner.invoke(app, [command, str(im), *args])
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output)
    assert "is an importance matrix" in line and f"--imatrix {im}" in line and "convert MODEL" in line, line
    assert "architecture" not in line and "update llama-cpp-python" not in line
    assert not out.exists()


def test_a_model_gguf_is_still_read_as_a_model(tiny_gguf):
    r = runner.invoke(app, ["inspect", str(tiny_gguf)])
    assert r.exit_code == 0, r.output
    assert "importance matrix" not in r.output


# ------------------------------------------------------------------------- types that need importances (R7)


def _convert(*args: str):
    return runner.invoke(app, ["convert", *args])


def _ok_imatrix(ckpt: Path, path: Path) -> Path:
    from safetensors.numpy import load_file

    from edgekit.converters.quantize.imatrix_file import write_imatrix

    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    means = {f"blk.{hf.split('.')[2]}.{kinds[hf.split('.')[-2]]}.weight": np.ones(w.shape[1], np.float32)
             for hf, w in load_file(ckpt / "model.safetensors").items()
             if hf.startswith("model.layers.") and hf.endswith("proj.weight")}
    write_imatrix(path, means, count=64, chunk_size=64, dataset="c")
    return path


@pytest.mark.parametrize(("args", "asked", "type_written"), [
    (["--type", "IQ3_XXS"], "--type IQ3_XXS", "IQ2_S"),  # the preset's mix puts IQ2_S on attn_q/attn_k
    (["--type", "IQ2_XXS"], "--type IQ2_XXS", "IQ2_XXS"),
    (["--type", "Q4_0", "--tensor-type", "ffn_down=IQ2_XS"], "--tensor-type ffn_down=IQ2_XS", "IQ2_XS"),
])
def test_a_type_that_needs_importances_names_what_was_asked_and_both_fixes(args, asked, type_written, tiny_llama,
                                                                          tmp_path):
    out = tmp_path / "out"
    r = _convert(str(tiny_llama), *args, "-o", str(out))
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output)
    assert line.startswith(f"error: {asked} needs an importance matrix"), line
    assert type_written in line and "--imatrix FILE" in line and "--method imatrix" in line, line
    if asked == "--type IQ3_XXS":
        assert "IQ2_S needs" not in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_with_an_importance_matrix_file_the_type_is_written(tiny_llama, tmp_path):
    im = _ok_imatrix(tiny_llama, tmp_path / "ok.imatrix.gguf")
    r = _convert(str(tiny_llama), "--type", "IQ3_XXS", "--imatrix", str(im), "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ the flag the user typed: --imatrix (R1)


def test_the_calib_note_names_imatrix_not_the_internal_method(tiny_llama, tmp_path):
    im = _ok_imatrix(tiny_llama, tmp_path / "ok.imatrix.gguf")
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text. " * 50)
    r = _convert(str(tiny_llama), "--type", "Q4_0", "--imatrix", str(im), "--calib", str(calib),
                 "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    note = next(ln for ln in r.stderr.splitlines() if ln.startswith("note: --calib"))
    assert "--imatrix FILE" in note and "imatrix-file" not in note, note


@pytest.mark.parametrize("to", [("--to", "aqlm", "--bits", "2"), ("--to", "onnx", "--bits", "16"),
                                ("--to", "mlc", "--quant", "q0f16"), ("--to", "coreml", "--bits", "16")],
                         ids=lambda a: a[1])
def test_format_refusals_name_imatrix_not_the_internal_method(to, tiny_llama, tmp_path):
    im = _ok_imatrix(tiny_llama, tmp_path / "ok.imatrix.gguf")
    r = _convert(str(tiny_llama), *to, "--imatrix", str(im), "-o", str(tmp_path / "out"))
    line = _one_error_line(r.output)
    assert r.exit_code == 2 and "--imatrix FILE" in line and "imatrix-file" not in line, line
    assert not (tmp_path / "out").exists()
