"""Core ML artifacts: weights read back from the saved package are the quantizer's, bit for bit; the palette
kernel; options and errors; ``--help`` stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("coremltools")

CALIB = {"samples": 4, "seqlen": 32}


class _Recording:
    """Wraps a quantizer and keeps every encoded tensor it hands the writer."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, {}
        self.config = inner.config

    def prepare(self, *a, **k):
        return self.inner.prepare(*a, **k)

    def quantize(self, name, weight, qtype):
        raw = self.inner.quantize(name, weight, qtype)
        self.seen[name] = (qtype, np.array(raw, copy=True), weight.shape)
        return raw


def _convert(src, out, method, **extra):
    from edgekit import api
    from edgekit.calibration import CalibConfig
    from edgekit.converters.formats.coreml import CoreMLFormat
    from edgekit.model import HFCheckpoint

    recipe = api.ConvertRecipe(bits=extra.pop("bits", 16), method=method, extra=extra)
    q = _Recording(api.make_quantizer(method, CalibConfig(**CALIB)))
    out.mkdir()
    fields = CoreMLFormat().convert(HFCheckpoint.open(src), out, recipe, q)
    return q, fields


def _assert_read_back_equals(q, package):
    from edgekit.converters.formats.coreml.format import stored_form
    from edgekit.converters.formats.coreml.program import Blockwise, Palette
    from edgekit.converters.formats.coreml.read import read_weights

    stored = read_weights(package)
    checked = 0
    for gname, (grid, raw, shape) in q.seen.items():
        if not hasattr(grid, "block") or getattr(grid, "is_float", True):
            continue
        want = stored_form(grid, raw, shape)
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}.get(gname)
        if hf is None:
            i, rest = gname.split(".", 2)[1:]
            hf = next(k for k, v in _NAMES.items() if v == rest.removesuffix(".weight")).format(i)
        got = stored[hf.replace(".", "_")]
        assert type(got) is type(want)
        if isinstance(want, Blockwise):
            np.testing.assert_array_equal(got.data, want.data, err_msg=hf)
            assert got.scale.dtype == np.float16
            np.testing.assert_array_equal(got.scale.view(np.uint16), want.scale.view(np.uint16), err_msg=hf)
            if want.offset is None:
                assert got.offset is None
            else:
                np.testing.assert_array_equal(got.offset, want.offset, err_msg=hf)
        else:
            assert isinstance(want, Palette) and got.bits == want.bits
            np.testing.assert_array_equal(got.indices, want.indices, err_msg=hf)
            np.testing.assert_array_equal(got.lut.view(np.uint16), want.lut.view(np.uint16), err_msg=hf)
            if want.sparse is None:
                assert got.sparse is None
            else:  # the stored outliers are the nonzero corrections, bit for bit
                assert got.sparse is not None and np.count_nonzero(want.sparse) > 0
                keep = want.sparse.astype(np.float32) != 0
                np.testing.assert_array_equal(got.sparse.view(np.uint16), np.where(keep, want.sparse, 0).view(np.uint16),
                                              err_msg=hf)
        checked += 1
    return checked


_NAMES = {"model.layers.{}.self_attn.q_proj.weight": "attn_q", "model.layers.{}.self_attn.k_proj.weight": "attn_k",
          "model.layers.{}.self_attn.v_proj.weight": "attn_v", "model.layers.{}.self_attn.o_proj.weight": "attn_output",
          "model.layers.{}.mlp.gate_proj.weight": "ffn_gate", "model.layers.{}.mlp.up_proj.weight": "ffn_up",
          "model.layers.{}.mlp.down_proj.weight": "ffn_down"}


@pytest.mark.parametrize(("method", "extra"), [
    ("gptq", {"bits": 4, "block_size": 32}),
    ("rtn", {"bits": 8, "block_size": 64, "symmetric": True}),
    ("squeezellm", {"palettize": 4}),
    ("gptq", {"palettize": 4, "lut_group": 32}),
    ("rtn", {"palettize": 3, "lut_group": 8}),
    ("rtn", {"palettize": 6, "lut_group": 32}),
    ("squeezellm", {"palettize": 4, "outliers": 2.0}),
    ("gptq", {"palettize": 3, "lut_group": 8, "outliers": 1.0}),
])
def test_codes_and_palettes_read_back_equal_the_quantizers(method, extra, tiny_llama, tmp_path):
    q, fields = _convert(tiny_llama, tmp_path / "out", method, **extra)
    n = _assert_read_back_equals(q, tmp_path / "out" / "model.mlpackage")
    assert n == 2 * 7 + 2  # every linear, the embedding and the head
    grid = fields["coreml"]["grid"]
    assert all(t["type"] == grid for name, t in fields["tensors"].items() if len(t["shape"]) == 2)


def test_a_tied_head_reads_the_embedding_table(tiny_models, tmp_path):
    from edgekit.converters.formats.coreml.program import Blockwise
    from edgekit.converters.formats.coreml.read import read_weights

    q, fields = _convert(tiny_models["Qwen2ForCausalLM"], tmp_path / "out", "rtn", bits=4)
    stored = read_weights(tmp_path / "out" / "model.mlpackage")
    assert "lm_head_weight" not in stored and isinstance(stored["model_embed_tokens_weight"], Blockwise)
    assert "output.weight" not in q.seen and "lm_head.weight" not in fields["tensors"]


def test_weighted_kmeans_lowers_the_weighted_error():
    from edgekit.converters.quantize import palette

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    imp = np.ones(64, np.float32)
    imp[:4] = 1000.0  # four columns meet large activations
    luts_u, idx_u = palette.fit(w, 3, 16)
    luts_w, idx_w = palette.fit(w, 3, 16, imp)
    err = {k: float((((w - palette.decode(lu, ix, 16)) ** 2) * imp).sum())
           for k, (lu, ix) in {"plain": (luts_u, idx_u), "weighted": (luts_w, idx_w)}.items()}
    assert err["weighted"] < 0.9 * err["plain"], err
    # every index is the nearest stored entry of its group's table
    for g in range(2):
        table = luts_w[g].astype(np.float32)
        block = w[g * 16:(g + 1) * 16]
        best = np.abs(block[..., None] - table).min(-1)
        np.testing.assert_array_equal(np.abs(block - table[idx_w[g * 16:(g + 1) * 16]]), best)


def test_cli_converts_and_the_manifest_says_what_it_is(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from edgekit.artifact import Artifact
    from edgekit.cli.main import app

    out = tmp_path / "cm"
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "coreml", "--bits", "16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    art = Artifact.open(out)
    assert art.format == "coreml" and art.model_file.name == "model.mlpackage"
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    m = art.manifest
    assert m["preset"] == "FP16" and {"read_state", "coreml_update_state", "slice_update"} <= set(m["coreml"]["ops"])
    r = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0 and '"coreml"' in r.output


def test_outliers_are_kept_exactly_and_leave_the_tables_to_the_bulk():
    from edgekit.converters.quantize import palette
    from edgekit.converters.quantize.grids.coreml import CoreMLPalette

    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    spikes = rng.random(w.shape) < 0.01
    w[spikes] *= 25.0  # heavy tails: a few weights far outside the bulk
    imp = rng.random(128).astype(np.float32) + 0.5
    mask = palette.outlier_mask(w, 16, 0.02, imp)
    assert mask.sum() == round(0.02 * w.size)
    assert spikes[mask].mean() > 0.4  # the spikes are what it picks first
    plain = CoreMLPalette(3, 16)
    sparse = CoreMLPalette(3, 16, 0.02)
    assert sparse.name == "COREML_LUT3_G16_S2"
    raw, values = sparse.quantize_roundtrip(w, imp)
    assert raw.shape == (32, sparse.row_bytes(128))
    np.testing.assert_array_equal(sparse.dequantize(raw), values)
    # the outliers decode to their fp16 weights (up to the fp16 sum of palette entry and correction)
    fp16 = w.astype(np.float16).astype(np.float32)
    assert np.abs(values[mask] - fp16[mask]).max() <= 2 * np.spacing(np.abs(fp16[mask]).astype(np.float16)).max()
    err = {name: float((((w - v) ** 2) * imp).sum()) for name, v in
           (("plain", plain.quantize_roundtrip(w, imp)[1]), ("sparse", values))}
    assert err["sparse"] < 0.5 * err["plain"], err
    # tables are fitted to the rest: moving the outliers does not change them
    moved = w.copy()
    moved[mask] *= 2.0
    luts_a, _ = palette.fit(w, 3, 16, imp, exclude=mask)
    luts_b, _ = palette.fit(moved, 3, 16, imp, exclude=mask)
    np.testing.assert_array_equal(luts_a.view(np.uint16), luts_b.view(np.uint16))


def test_gptq_onto_palettes_with_outliers_decodes_what_it_reports():
    from edgekit.converters.quantize import gptq_kernel
    from edgekit.converters.quantize.grids.coreml import CoreMLPalette

    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 20.0
    x = rng.standard_normal((256, 64)).astype(np.float32)
    H = (x.T @ x).astype(np.float64)
    grid = CoreMLPalette(4, 16, 0.03)
    r = gptq_kernel.gptq(w, H, grid)
    np.testing.assert_array_equal(grid.dequantize(r.data), r.weight)
    rtn = gptq_kernel.rtn(w, grid)
    assert gptq_kernel.hessian_error(w, r.weight, H) < gptq_kernel.hessian_error(w, rtn.weight, H)


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "5"], "--bits 5 is not available for Core ML"),
    (["--palettize", "5"], "--palettize 5"),
    (["--bits", "4", "--method", "squeezellm"], "give --palettize"),
    (["--bits", "16", "--method", "gptq"], "quantizes weights"),
    (["--bits", "4", "--block-size", "48"], "block size 48"),
    (["--palettize", "4", "-O", "lut_group=3"], "palette group 3"),
    (["--bits", "4", "--dtype", "fp16"], "--dtype is not an option of --to coreml"),
    (["--bits", "4", "-O", "colour=blue"], "unknown Core ML option"),
    (["--bpw", "4"], "one grid for every matrix"),
    (["--bits", "4", "-O", "outliers=0.5"], "give --palettize N with it"),
    (["--palettize", "4", "-O", "outliers=15"], "between 0 and 10%"),
    (["--palettize", "4", "-O", "outliers=lots"], "give a percent of the weights"),
])
def test_bad_options_are_one_line_errors(args, message, tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "coreml", *args, "-o", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_palettize_is_refused_by_other_formats(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--palettize", "4", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--palettize is not an option of --to gguf" in r.output


def test_help_imports_no_coremltools():
    code = ("import sys\nfrom edgekit.cli.main import app\n"
            "try:\n    app(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'coremltools', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_missing_coremltools_names_the_extra(monkeypatch, tiny_llama, tmp_path):
    from edgekit import api
    from edgekit.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgekit\[coreml\]'"):
        api.convert(tiny_llama, "coreml", output=tmp_path / "x", recipe=api.ConvertRecipe(bits=16))
    assert not (tmp_path / "x").exists()
