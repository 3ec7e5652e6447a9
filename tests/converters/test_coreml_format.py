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


@pytest.mark.parametrize("ending", ["written", "interrupted", "disk full"])
def test_coremltools_leaves_nothing_in_the_temp_folder(ending, tiny_llama, tmp_path, monkeypatch):
    """coremltools builds the whole package in $TMPDIR and deletes it only at exit: it must live in the
    output's temporary folder instead, so Ctrl-C (or kill -9, through the sweep) leaves nothing there."""
    import shutil
    import tempfile

    from typer.testing import CliRunner

    from edgekit.cli.main import app
    from edgekit.converters.formats.coreml.package import coremltools

    tmpd = tmp_path / "tmpd"
    tmpd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpd))
    MLModel = coremltools().models.MLModel
    save = MLModel.save

    def failing_save(self, path):
        assert ".out.partial-" in str(self.package_path)  # inside the output's temporary folder
        if ending == "interrupted":
            raise KeyboardInterrupt
        src = f"{self.package_path}/Data/com.apple.CoreML/weights/weight.bin"
        raise shutil.Error([(src, f"{path}/weight.bin", f"[Errno 28] No space left on device: '{src}'")])

    monkeypatch.setattr(MLModel, "save", save if ending == "written" else failing_save)
    out = tmp_path / "cm" / "out"
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "coreml", "--bits", "8", "-o", str(out)])
    assert r.exit_code == {"written": 0, "interrupted": 130, "disk full": 4}[ending], r.output
    assert list(tmpd.iterdir()) == []
    if ending == "written":
        assert sorted(p.name for p in (tmp_path / "cm").iterdir()) == ["out"]
        assert not any(p.name.startswith(".") for p in out.iterdir())
    else:
        assert list((tmp_path / "cm").iterdir()) == []
    if ending == "disk full":
        assert f"the disk filled up while writing {out}; nothing was kept" in r.output and "[(" not in r.output


# (arch, config changes, each layer's window as transformers builds it)
_WINDOWS = {
    "qwen2-window-off": ("Qwen2ForCausalLM", dict(sliding_window=8, use_sliding_window=False), [0, 0]),
    "qwen2-last-layer": ("Qwen2ForCausalLM", dict(sliding_window=8, use_sliding_window=True, max_window_layers=1),
                         [0, 8]),
    "mistral-every-layer": ("MistralForCausalLM", dict(sliding_window=8), [8, 8]),
}
_TOKENS = list(range(5, 35))


def _variant(tmp_path, arch, changes):
    """A tiny ``arch`` checkpoint whose config.json has ``changes`` (transformers' own layer_types removed, so
    use_sliding_window and max_window_layers decide)."""
    import json

    from tests.helpers import build_tiny_model

    src = build_tiny_model(tmp_path / "src", arch, layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("layer_types", None)
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _torch_logits(src, tokens):
    torch = pytest.importorskip("torch")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("case", list(_WINDOWS))
def test_sliding_windows_follow_transformers_per_layer(case, tmp_path):
    from edgekit import api

    arch, changes, windows = _WINDOWS[case]
    src = _variant(tmp_path, arch, changes)
    ref = _torch_logits(src, _TOKENS)  # 30 tokens: well past the window of 8
    art = api.convert(src, "coreml", output=tmp_path / "cml", recipe=api.ConvertRecipe(bits=16))
    meta = art.manifest["coreml"]
    # the runtime's mask windows every layer by edgekit.sliding_window: set only when all layers share it
    assert meta["sliding_window"] == (windows[0] if len(set(windows)) == 1 and windows[0] else None)
    assert meta.get("layer_windows", [0, 0]) == windows
    with api.open_backend(art) as be:
        got = be.logits(_TOKENS)
    assert np.abs(got - ref).max() < 4e-3 * np.abs(ref).max() + 2e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_llama3_rope_tables_are_transformers_own(tmp_path):
    """Llama 3.1/3.2's rope scaling: the program's cos/sin tables are those of transformers' ROPE_INIT_FUNCTIONS
    frequencies, and the converted program computes the model."""
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgekit import api
    from edgekit.converters.formats.coreml.program import rotary_tables
    from edgekit.model import HFCheckpoint

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    src = _variant(tmp_path, "LlamaForCausalLM", {"rope_parameters": scaling, "rope_scaling": scaling})
    cfg = transformers.AutoConfig.from_pretrained(src)
    inv, attn_scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    assert attn_scale == 1.0
    ang = np.outer(np.arange(512, dtype=np.float64), inv.double().numpy())
    ang = np.concatenate([ang, ang], axis=1)
    cos, sin = rotary_tables(HFCheckpoint.open(src).hparams, 512)
    default = np.cos(np.outer(np.arange(512), 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)))
    assert np.abs(np.concatenate([default, default], 1) - cos.astype(np.float64)).max() > 0.5  # scaling matters
    # float32 frequencies (transformers) against float64 (the program), then fp16: within fp16's rounding
    assert np.abs(cos.astype(np.float64) - np.cos(ang)).max() < 2e-3
    assert np.abs(sin.astype(np.float64) - np.sin(ang)).max() < 2e-3
    tokens = list(range(5, 105))  # past original_max_position_embeddings
    ref = _torch_logits(src, tokens)
    art = api.convert(src, "coreml", output=tmp_path / "cml", recipe=api.ConvertRecipe(bits=16))
    with api.open_backend(art) as be:
        got = be.logits(tokens)
    assert np.abs(got - ref).max() < 4e-3 * np.abs(ref).max() + 2e-3


def test_block_size_error_names_a_fix_that_exists(tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app
    from tests.helpers import build_tiny_model

    src = build_tiny_model(tmp_path / "h200", "LlamaForCausalLM", hidden=200, ffn=400, heads=4, kv_heads=2)
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "coreml", "--bits", "4", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert "no block size" in r.output and "use --bits 16" in r.output and "e.g. 32" not in r.output
    assert "-O lut_group=4" in r.output  # k/v rows: 100
    assert not (tmp_path / "x").exists()


def test_qwen3_q_k_norms_are_per_head_fp16_vectors(tiny_models, tmp_path):
    """Qwen3 (heads of 48 x 4 = 192, wider than the hidden 128; a per-head RMSNorm of the queries and keys with
    one head_dim weight shared by the heads; tied head) converts at 4 bits: every matrix's codes read back as
    the quantizer's, each layer's q/k norm weight is the checkpoint's as an fp16 vector of head_dim, normalising
    each head's 48 values (a layer_norm over [x, -x]: 96 wide). The CLI converts and inspects it, and a block
    size that does not divide the heads' 192 is refused naming one that does."""
    from safetensors.numpy import load_file
    from typer.testing import CliRunner

    from edgekit.cli.main import app
    from edgekit.converters.formats.coreml.program import Dense
    from edgekit.converters.formats.coreml.read import load_program, read_weights

    src = tiny_models["Qwen3ForCausalLM"]
    q, fields = _convert(src, tmp_path / "out", "rtn", bits=4)
    package = tmp_path / "out" / "model.mlpackage"
    assert _assert_read_back_equals(q, package) == 2 * 7 + 1  # every linear and the (tied) embedding
    stored, ckpt = read_weights(package), load_file(src / "model.safetensors")
    for i in range(2):
        for w in ("q", "k"):
            hf = f"model.layers.{i}.self_attn.{w}_norm.weight"
            got = stored[hf.replace(".", "_")]
            assert isinstance(got, Dense) and got.value.shape == (48,)
            np.testing.assert_array_equal(got.value.view(np.uint16), ckpt[hf].astype(np.float16).view(np.uint16))
            assert fields["tensors"][hf] == {"type": "F16", "shape": [48]}
    prog, _ = load_program(package)
    widths = [op.inputs["x"].shape[-1] for op in prog.functions["main"].operations if op.op_type == "layer_norm"]
    assert sorted(widths) == [96] * 4 + [256] * 5  # q and k in each layer; the hidden norms
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "coreml", "--bits", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "Qwen3ForCausalLM" in r.output, r.output
    r = CliRunner().invoke(app, ["convert", str(src), "--to", "coreml", "--bits", "4", "--block-size", "128",
                                 "-o", str(tmp_path / "b128")])
    assert r.exit_code == 2 and "rows of 192 weights" in r.output and "use --block-size 64" in r.output, r.output
    assert not (tmp_path / "b128").exists()
