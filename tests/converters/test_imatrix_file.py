"""llama.cpp importance-matrix files: both layouts read as llama-quantize reads them, and a conversion with
``--imatrix FILE`` rounds each tensor with the file's importances (or refuses a file that cannot apply)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from edgekit import api
from edgekit.cli.main import app
from edgekit.converters.quantize import gptq_kernel
from edgekit.converters.quantize.imatrix_file import ImatrixFileConfig, read_imatrix, write_imatrix
from edgekit.errors import CorruptFileError, InputError

# tensors written in the checkpoint's own row order (GGUF permutes attn_q/attn_k rows)
_HF = {"ffn_down": "mlp.down_proj", "ffn_up": "mlp.up_proj", "ffn_gate": "mlp.gate_proj",
       "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}


def _legacy(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks: int | None = None,
            dataset: str | None = None) -> Path:
    """llama-imatrix's legacy .dat: count; per entry name length, name, ncall, nval, values; then optionally the
    chunk count and the dataset's name."""
    buf = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        buf += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        buf += np.asarray(values, "<f4").tobytes()
    if chunks is not None:
        buf += struct.pack("<i", chunks)
        if dataset is not None:
            buf += struct.pack("<i", len(dataset)) + dataset.encode()
    path.write_bytes(buf)
    return path


def _importances(ckpt: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A skewed importance per input column of every matmul the tiny Llama has, by GGUF name."""
    rng = np.random.default_rng(seed)
    out = {}
    for hf, w in load_file(ckpt / "model.safetensors").items():
        if hf.startswith("model.layers.") and hf.endswith("proj.weight"):
            i = int(hf.split(".")[2])
            kind = next((g for g, h in {**_HF, "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj"}.items()
                         if h in hf), None)
            out[f"blk.{i}.{kind}.weight"] = rng.exponential(1.0, w.shape[1]).astype(np.float32) ** 3
    return out


def test_both_layouts_read_as_llama_quantize_reads_them(tmp_path):
    means = {"blk.0.ffn_down.weight": np.array([0.5, 2.0, 0.0, 8.0], np.float32)}
    write_imatrix(tmp_path / "m.gguf", means, count=1024, chunk_size=512, dataset="corpus.txt")
    g = read_imatrix(tmp_path / "m.gguf")
    np.testing.assert_allclose(g.importances["blk.0.ffn_down.weight"][0], means["blk.0.ffn_down.weight"], rtol=1e-6)
    assert (g.chunk_count, g.chunk_size, g.datasets, g.legacy) == (2, 512, ("corpus.txt",), False)
    assert g.describe() == "2 chunks of 512 tokens of corpus.txt"
    # legacy values are mean * ncall; llama-quantize divides by ncall
    dat = _legacy(tmp_path / "m.dat", {"blk.0.ffn_down.weight": (7, means["blk.0.ffn_down.weight"] * 7)}, 7, "c.txt")
    d = read_imatrix(dat)
    np.testing.assert_allclose(d.importances["blk.0.ffn_down.weight"][0], means["blk.0.ffn_down.weight"], rtol=1e-6)
    assert (d.chunk_count, d.datasets, d.legacy) == (7, ("c.txt",), True)
    # the trailer is optional
    assert read_imatrix(_legacy(tmp_path / "bare.dat", {"x.weight": (2, np.ones(3, np.float32))})).chunk_count == 0


def test_per_expert_counts_and_unseen_experts(tmp_path):
    """A GGUF entry has one count per expert; an expert that saw no token gets importance 1, as in llama.cpp."""
    w = gguf.GGUFWriter(tmp_path / "e.gguf", arch="imatrix")
    w.add_type("imatrix")
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", np.array([[2.0, 4.0], [9.0, 9.0]], np.float32))
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[2.0], [0.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = read_imatrix(tmp_path / "e.gguf").importances["blk.0.ffn_down_exps.weight"]
    np.testing.assert_array_equal(got, [[1.0, 2.0], [1.0, 1.0]])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "negative", "model_gguf", "sums_only", "empty"])
def test_damaged_or_wrong_files_are_one_line_errors(tmp_path, damage, tiny_gguf):
    path = tmp_path / "bad.dat"
    good = _legacy(tmp_path / "good.dat", {"blk.0.ffn_down.weight": (3, np.ones(512, np.float32))}, 3, "c")
    if damage == "truncated":
        path.write_bytes(good.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x10\x00\x00" + b"not an imatrix at all" * 10)
    elif damage == "negative":
        _legacy(path, {"blk.0.ffn_down.weight": (1, -np.ones(4, np.float32))})
    elif damage == "model_gguf":
        path = tiny_gguf / "model.gguf"
    elif damage == "sums_only":
        path = tmp_path / "half.gguf"
        w = gguf.GGUFWriter(path, arch="imatrix")
        w.add_tensor("blk.0.ffn_down.weight.in_sum2", np.ones((1, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        path.write_bytes(b"")
    with pytest.raises((CorruptFileError, InputError)) as e:
        read_imatrix(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    if damage == "model_gguf":
        assert "no importance matrix" in str(e.value)


def test_convert_rounds_each_tensor_with_the_files_importances(tiny_llama, tmp_path):
    """Every matmul's bytes are importance-weighted round-to-nearest with the file's values for it: other
    importances give other bytes, so the file is what decides."""
    means = _importances(tiny_llama)
    write_imatrix(tmp_path / "imatrix.gguf", means, count=512, chunk_size=512, dataset="corpus.txt")
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "out", recipe=api.ConvertRecipe(preset="Q4_0"),
                      quantize=ImatrixFileConfig(file=str(tmp_path / "imatrix.gguf")))
    weights = load_file(tiny_llama / "model.safetensors")
    reader = gguf.GGUFReader(art.path / "model.gguf")
    checked = weighted_differs = 0
    for t in reader.tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind not in _HF:
            continue
        w = weights[f"model.layers.{t.name.split('.')[1]}.{_HF[kind]}.weight"].astype(np.float32)
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        want = gptq_kernel.rtn(w, t.tensor_type, means[t.name]).data.reshape(-1)
        np.testing.assert_array_equal(got, want, err_msg=t.name)
        weighted_differs += not np.array_equal(got, gptq_kernel.rtn(w, t.tensor_type).data.reshape(-1))
        checked += 1
    assert checked == 10 and weighted_differs >= 8
    q = art.manifest["recipe"]["quantizer"]
    assert q["method"] == "imatrix-file" and len(q["sha256"]) == 64
    assert art.manifest["recipe"]["method"] == "imatrix-file"
    assert ("importances from imatrix.gguf (1 chunk of 512 tokens of corpus.txt) for 14 of 16 rounded tensors; "
            "without: output.weight (the file has no entry for it" in " ".join(art.notes)), art.notes


def test_onnx_takes_the_file_too(tiny_llama, tmp_path):
    write_imatrix(tmp_path / "im.gguf", _importances(tiny_llama), count=64, chunk_size=64, dataset="c")
    plain = api.convert(tiny_llama, "onnx", output=tmp_path / "plain", recipe=api.ConvertRecipe(bits=4))
    weighted = api.convert(tiny_llama, "onnx", output=tmp_path / "weighted", recipe=api.ConvertRecipe(bits=4),
                           quantize=ImatrixFileConfig(file=str(tmp_path / "im.gguf")))
    a = (plain.path / plain.manifest["files"]["data"]).read_bytes()
    b = (weighted.path / weighted.manifest["files"]["data"]).read_bytes()
    assert len(a) == len(b) and a != b


def _cli(*args: str):
    return CliRunner().invoke(app, ["convert", *args])


def test_cli_refusals_leave_nothing(tiny_llama, tmp_path):
    other = {name: np.ones(7, np.float32) for name in _importances(tiny_llama)}  # made for another model
    write_imatrix(tmp_path / "other.gguf", other, count=64, chunk_size=64, dataset="c")
    write_imatrix(tmp_path / "none.gguf", {"blk.0.something.weight": np.ones(4, np.float32)}, 64, 64, "c")
    write_imatrix(tmp_path / "ok.gguf", _importances(tiny_llama), 64, 64, "c")
    cases = [
        (["--imatrix", str(tmp_path / "missing.gguf")], 2, "not found"),
        (["--imatrix", str(tmp_path / "other.gguf")], 2, "made for another model"),
        (["--imatrix", str(tmp_path / "none.gguf")], 2, "none of this model's tensors"),
        (["--imatrix", str(tmp_path / "ok.gguf"), "--method", "gptq"], 2, "--method gptq does not use it"),
        (["--imatrix", str(tmp_path / "ok.gguf"), "--prune", "wanda:0.5"], 2, "drop --imatrix"),
    ]
    for extra, code, words in cases:
        out = tmp_path / "out"
        r = _cli(str(tiny_llama), "--type", "Q4_0", "-o", str(out), *extra)
        assert r.exit_code == code, (extra, r.stdout, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_convert_with_a_legacy_file(tiny_llama, tmp_path):
    means = _importances(tiny_llama, seed=3)
    dat = _legacy(tmp_path / "imatrix.dat", {n: (5, m * 5) for n, m in means.items()}, 5, "corpus.txt")
    r = _cli(str(tiny_llama), "--type", "IQ4_NL", "--imatrix", str(dat), "-o", str(tmp_path / "o"), "--json")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["recipe"]["quantizer"]["file"] == str(dat.resolve())
    reader = gguf.GGUFReader(tmp_path / "o" / "model.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    w = load_file(tiny_llama / "model.safetensors")["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                                  gptq_kernel.rtn(w, t.tensor_type, read_imatrix(dat).importances[t.name][0]).data
                                  .reshape(-1))
