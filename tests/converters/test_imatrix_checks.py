"""``convert --imatrix FILE`` checks the file against the conversion before any work (QA s57 R2, R3, R9):
a file with entries for tensors the model lacks (a deeper model's, or this model's before ``--prune depth``,
whose block numbers shift) is refused; a conversion that rounds nothing (GGUF ``--type F16``) refuses the file
as ONNX ``--bits 16`` does; and the summary names every rounded tensor that got no importances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.converters.quantize.imatrix_file import read_imatrix, write_imatrix
from tests.converters.test_imatrix_messages import _ok_imatrix
from tests.helpers import build_tiny_model

runner = CliRunner()


def _convert(model: Path, out: Path, *args: str):
    return runner.invoke(app, ["convert", str(model), "-o", str(out), *args])


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def _means(path: Path) -> dict[str, np.ndarray]:
    return {n: im[0] for n, im in read_imatrix(path).importances.items()}


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def _refused(model: Path, out: Path, *args: str) -> str:
    """``convert MODEL -o OUT ARGS`` refused: exit 2, nothing written; its one error line."""
    r = _convert(model, out, *args)
    assert r.exit_code == 2, (model, r.output)
    line = _one_error_line(r)
    _nothing_written(out)
    return line


# ----------------------------------------------------------------------------------------- R3: another model's


def test_a_deeper_models_file_is_refused(tiny_llama, tmp_path):
    """The 2-block model with a file that also has blk.2 and blk.3 (same shapes: a deeper model's, or this one's
    before --prune depth): its importances would land on the wrong blocks."""
    means = _means(_ok_imatrix(tiny_llama, tmp_path / "ok.gguf"))
    means |= {n.replace("blk.1.", f"blk.{i}."): m for n, m in means.items() if n.startswith("blk.1.") for i in (2, 3)}
    write_imatrix(tmp_path / "deeper.gguf", means, count=64, chunk_size=64, dataset="c")
    out = tmp_path / "out"
    line = _refused(tiny_llama, out, "--type", "Q4_0", "--imatrix", str(tmp_path / "deeper.gguf"))
    assert "made for a model with 4 blocks" in line and "this one has 2" in line, line
    assert "llama-imatrix" in line and "--method imatrix" in line, line


def test_a_depth_pruned_checkpoint_refuses_its_sources_file(tmp_path):
    """The realistic trap: the unpruned model's file on a checkpoint pruned with --prune depth and converted
    later (imported back to a folder, or its GGUF converted again)."""
    src = build_tiny_model(tmp_path / "four", "LlamaForCausalLM", hidden=64, ffn=128, layers=4)
    im = _ok_imatrix(src, tmp_path / "four.imatrix.gguf")
    r = _convert(src, tmp_path / "pruned", "--type", "F16", "--prune", "depth:layers=1,2")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["import", str(tmp_path / "pruned" / "model.gguf"), "-o", str(tmp_path / "pruned_hf")])
    assert r.exit_code == 0, r.output
    for model in (tmp_path / "pruned_hf", tmp_path / "pruned" / "model.gguf"):
        out = tmp_path / "out"
        line = _refused(model, out, "--type", "Q4_0", "--imatrix", str(im))
        assert "made for a model with 4 blocks" in line and "this one has 2" in line, line


def test_depth_pruning_with_a_file_is_refused(tiny_llama, tmp_path):
    im = _ok_imatrix(tiny_llama, tmp_path / "ok.gguf")
    out = tmp_path / "out"
    r = _convert(tiny_llama, out, "--type", "Q4_0", "--prune", "depth:1", "--imatrix", str(im))
    assert r.exit_code == 2, r.output
    assert "--prune" in _one_error_line(r)
    _nothing_written(out)


def test_entries_for_tensors_the_model_lacks_are_refused(tiny_llama, tmp_path):
    means = _means(_ok_imatrix(tiny_llama, tmp_path / "ok.gguf"))
    means["blk.0.attn_qkv.weight"] = np.ones(256, np.float32)  # a fused-attention model's
    write_imatrix(tmp_path / "other.gguf", means, count=64, chunk_size=64, dataset="c")
    out = tmp_path / "out"
    line = _refused(tiny_llama, out, "--type", "Q4_0", "--imatrix", str(tmp_path / "other.gguf"))
    assert "1 tensor this model does not have (blk.0.attn_qkv.weight)" in line and "another model" in line, line


def test_entries_merely_missing_are_rounded_without_and_named(tiny_llama, tmp_path):
    """A file covering fewer blocks (only blk.0) is fine, as in llama-quantize: the summary names what it lacks."""
    means = {n: m for n, m in _means(_ok_imatrix(tiny_llama, tmp_path / "ok.gguf")).items() if n.startswith("blk.0.")}
    write_imatrix(tmp_path / "first.gguf", means, count=64, chunk_size=64, dataset="c")
    r = _convert(tiny_llama, tmp_path / "out", "--type", "Q4_0", "--imatrix", str(tmp_path / "first.gguf"))
    assert r.exit_code == 0, r.output
    assert "for 7 of 16 rounded tensors; without: 8 tensors the file has no entries for (" in r.stderr, r.stderr
    assert "token_embd.weight (llama-imatrix never collects" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ R2: nothing is rounded


@pytest.mark.parametrize("qtype", ["F16", "F32"])
def test_a_float_gguf_refuses_the_file_as_onnx_does(qtype, tiny_llama, tmp_path):
    im = _ok_imatrix(tiny_llama, tmp_path / "ok.gguf")
    out = tmp_path / "out"
    line = _refused(tiny_llama, out, "--type", qtype, "--imatrix", str(im))
    assert line.startswith("error: --imatrix FILE quantizes weights; ") and "give a quantized --type" in line, line
    onnx = _convert(tiny_llama, out, "--to", "onnx", "--bits", "16", "--imatrix", str(im))
    assert onnx.exit_code == 2 and _one_error_line(onnx).startswith("error: --imatrix FILE quantizes weights; ")


# ------------------------------------------------------------------------------------------- R9: the summary


def test_the_summary_names_the_tied_embedding(tmp_path):
    """A tied model's only tensor without importances is token_embd (never collected): the summary names it,
    as it names output.weight on an untied model."""
    tied = build_tiny_model(tmp_path / "tied", "LlamaForCausalLM", hidden=64, ffn=128, tie=True)
    im = _ok_imatrix(tied, tmp_path / "tied.imatrix.gguf")
    r = _convert(tied, tmp_path / "out", "--type", "Q4_0", "--imatrix", str(im))
    assert r.exit_code == 0, r.output
    assert ("for 14 of 15 rounded tensors; without: token_embd.weight (llama-imatrix never collects the embedding"
            in r.stderr), r.stderr
