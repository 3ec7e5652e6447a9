"""GPTQ onto llama.cpp's lattice i-quants (GPTVQ-style: the super-block's scales from llama.cpp's search
on the error-compensated weights, a codeword and signs per group of 8, the block form of GPTQ's update):
lower Hessian-weighted error than llama.cpp's importance-weighted quantisation, bytes that decode to
exactly the reported weights, and plain weighted rounding under llama.cpp's scales when nothing
propagates."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.converters.quantize import ggml
from edgekit.converters.quantize.ggml import iq1, lattice, lattice_round
from edgekit.converters.quantize.gptq import GPTQConfig
from edgekit.converters.quantize.gptq_kernel import gptq, hessian_error, rtn
from edgekit.errors import InputError

from .test_gptq_kernel import _problem

TYPES = [*lattice.TYPES, *iq1.TYPES]
# gptq / importance-weighted rtn on _problem(64, 512), both with diag(H) as the importance: measured
# 0.30-0.43 over the seven types and two seeds
MAX_RATIO = 0.55


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_llamacpp_imatrix_and_decodes_exactly(qt: T, seed: int) -> None:
    W, H = _problem(64, 512, seed=seed)
    im = np.diag(H).astype(np.float32)
    base = rtn(W, qt, imatrix=im)
    assert np.array_equal(base.data, ggml.quantize(W, qt, im))  # the baseline is llama.cpp's own bytes
    res = gptq(W, H, qt, imatrix=im)
    bs, ts = GGML_QUANT_SIZES[qt]
    assert res.qtype == qt and res.data.dtype == np.uint8 and res.data.shape == (64, 512 // bs * ts)
    assert np.array_equal(gq.dequantize(res.data, qt), res.weight)  # gguf-py's decoder: the same weights
    assert np.array_equal(ggml.dequantize(res.data, qt), res.weight)
    ratio = hessian_error(W, res.weight, H) / hessian_error(W, base.weight, H)
    assert ratio < MAX_RATIO, ratio


@pytest.mark.parametrize("qt", lattice.TYPES, ids=lambda t: t.name)
def test_group_rounding_is_what_the_bytes_decode_to(qt: T) -> None:
    """The values the sweep feeds back are the decoder's, bit for bit, and obey the sign parity."""
    rng = np.random.default_rng(5)
    x = rng.standard_t(4, (6, 256)).astype(np.float32)
    _, p = lattice.encode(qt, x, rng.random((6, 256)).astype(np.float32) + 0.1)
    scales = lattice_round.sub_block_scales(qt, p)
    sub = lattice.SPECS[qt].sub
    w = rng.random(8).astype(np.float32) + 0.1
    codes, values = np.empty((6, 256), np.uint8), np.empty((6, 256), np.float32)
    for g in range(0, 256, 8):
        codes[:, g : g + 8], values[:, g : g + 8] = lattice_round.round_group(qt, x[:, g : g + 8], scales[:, g // sub], w)
    gi, params = lattice_round.codes_to_blocks(qt, codes, p.d, p.ls)
    assert np.array_equal(lattice.dequantize_codes(qt, gi, params), values)
    if lattice.SPECS[qt].parity:
        assert np.all((codes.reshape(6, 32, 8) >> 3).sum(axis=2) % 2 == 0)


@pytest.mark.parametrize("qt", iq1.TYPES, ids=lambda t: t.name)
def test_iq1_group_rounding_is_what_the_bytes_decode_to(qt: T) -> None:
    """IQ1: the fed-back values are the decoder's; IQ1_S keeps each sub-block's shift, IQ1_M picks one
    per group, never worse than either fixed shift."""
    rng = np.random.default_rng(5)
    x = rng.standard_t(4, (6, 256)).astype(np.float32)
    raw = iq1.encode(qt, x, rng.random((6, 256)).astype(np.float32) + 0.1)
    scales, minus = iq1.sub_block_scales(qt, raw)
    sub = iq1.SUB[qt]
    w = rng.random(8).astype(np.float32) + 0.1
    codes, values = np.empty((6, 256), np.uint8), np.empty((6, 256), np.float32)
    for g in range(0, 256, 8):
        k = g // sub
        codes[:, g : g + 8], values[:, g : g + 8] = iq1.round_group(qt, x[:, g : g + 8], scales[:, k], w,
                                                                     None if minus is None else minus[:, k])
        if minus is None:
            err = (w * (x[:, g : g + 8] - values[:, g : g + 8]) ** 2).sum(axis=1)
            for fixed in (False, True):
                _, v = iq1.round_group(qt, x[:, g : g + 8], scales[:, k], w, np.full(6, fixed))
                assert np.all(err <= (w * (x[:, g : g + 8] - v) ** 2).sum(axis=1) * (1 + 1e-6))
    patched = iq1.patch_codes(qt, raw, codes)
    assert np.array_equal(gq.dequantize(patched, qt), values)
    if qt == T.IQ1_S:  # the scales and shifts (scale bytes) are llama.cpp's
        assert np.array_equal(patched[:, :2], raw[:, :2])
        assert np.array_equal(patched[:, 34:].view("<u2") >> 12, raw[:, 34:].view("<u2") >> 12)
    else:
        assert np.array_equal(patched[:, 48:], raw[:, 48:])


@pytest.mark.parametrize("qt", [T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S], ids=lambda t: t.name)
def test_brute_force_nearest_group(qt: T) -> None:
    """round_group is the exact weighted nearest point of the signed codebook (parity included)."""
    rng = np.random.default_rng(6)
    vals, _ = lattice_round.codebook(qt)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    s = (np.abs(x).mean(axis=1) / vals.mean()).astype(np.float32)
    w = rng.random(8).astype(np.float32) + 0.1
    _, got = lattice_round.round_group(qt, x, s, w)
    dim, parity = lattice.SPECS[qt].dim, lattice.SPECS[qt].parity
    signs = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # every sign pattern of 8
    if parity:
        signs = signs[signs.sum(axis=1) % 2 == 0]
    sg = np.where(signs, -1.0, 1.0)
    for r in range(x.shape[0]):
        # for a fixed sign pattern the codewords of the halves (IQ3: two of 4) are independent
        cost = sum((w[h:h + dim] * (x[r, h:h + dim] - s[r] * vals[:, None, :] * sg[None, :, h:h + dim]) ** 2)
                   .sum(axis=2).min(axis=0) for h in range(0, 8, dim))  # (sign patterns,)
        best = float(cost.min())
        assert float((w * (x[r] - got[r]) ** 2).sum()) <= best * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_uncorrelated_inputs_keep_llamacpp_scales_and_round_no_worse(qt: T) -> None:
    """With a diagonal H nothing propagates: every super-block keeps llama.cpp's scales for the original
    weights, and each group's codeword is at least as close (H-weighted) as llama.cpp's own choice."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((16, 512)).astype(np.float32)
    h = rng.uniform(0.1, 10.0, 512)
    res = gptq(W, np.diag(h), qt, imatrix=h.astype(np.float32), damp=0.0)
    qw = np.broadcast_to(h.astype(np.float32), W.shape).reshape(-1, 256)
    if qt in iq1.TYPES:
        ours_s, theirs_s = iq1.sub_block_scales(qt, res.params), iq1.sub_block_scales(qt, iq1.encode(qt, W.reshape(-1, 256), qw))
        assert all(a is b is None or np.array_equal(a, b) for a, b in zip(ours_s, theirs_s, strict=True))
    else:
        _, p = lattice.encode(qt, W.reshape(-1, 256), qw)
        assert np.array_equal(res.params.d, p.d) and np.array_equal(res.params.ls, p.ls)
    ours = (h * (W - res.weight) ** 2).reshape(-1, 8).sum(axis=1)
    theirs = (h * (W - rtn(W, qt, imatrix=h.astype(np.float32)).weight) ** 2).reshape(-1, 8).sum(axis=1)
    assert np.all(ours <= theirs * (1 + 1e-4) + 1e-6)
    assert ours.sum() < theirs.sum()


def test_types_that_need_an_importance_matrix_say_so() -> None:
    W, H = _problem(8, 256)
    for qt in ggml.REQUIRES_IMATRIX:
        with pytest.raises(InputError, match="needs an importance matrix"):
            gptq(W, H, qt)
    res = gptq(W, H, T.IQ3_S)  # llama.cpp quantizes IQ3_S without one: so does GPTQ's scale choice
    assert np.array_equal(gq.dequantize(res.data, T.IQ3_S), res.weight)


def test_convert_with_gptq_onto_a_lattice_preset(tiny_llama, tmp_path) -> None:
    """`--method gptq --type IQ3_XXS` end to end: lattice tensors in the file, holding the model's weights."""
    from edgekit.converters.formats.gguf import GGUFFormat
    from edgekit.converters.quantize.base import QUANTIZERS
    from edgekit.model import HFCheckpoint
    from tests.helpers import assert_gguf_holds_model

    q = QUANTIZERS.get("gptq")(GPTQConfig(calib=CalibConfig(samples=4, seqlen=48)))
    out = tmp_path / "iq3"
    out.mkdir()
    GGUFFormat().convert(HFCheckpoint.open(tiny_llama), out, api.ConvertRecipe(bits=None, preset="IQ3_XXS"), q)
    types = {t.tensor_type for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert {T.IQ3_XXS, T.IQ2_S} <= types  # the preset's body and its attn_q/attn_k
    assert_gguf_holds_model(tiny_llama, out / "model.gguf", q.model)


def test_convert_with_gptq_act_order(tiny_llama, tmp_path) -> None:
    """GPTQConfig(act_order=True) end to end: the file holds the weights the model was left with (the
    permuted sweep's bytes are back in the file's column order), and they differ from the plain sweep's."""
    from edgekit.converters.formats.gguf import GGUFFormat
    from edgekit.converters.quantize.base import QUANTIZERS
    from edgekit.model import HFCheckpoint
    from tests.helpers import assert_gguf_holds_model

    files = {}
    for ao in (False, True):
        q = QUANTIZERS.get("gptq")(GPTQConfig(calib=CalibConfig(samples=4, seqlen=48), act_order=ao))
        out = tmp_path / f"q4-{ao}"
        out.mkdir()
        GGUFFormat().convert(HFCheckpoint.open(tiny_llama), out, api.ConvertRecipe(bits=None, preset="Q4_0"), q)
        assert_gguf_holds_model(tiny_llama, out / "model.gguf", q.model)
        files[ao] = {t.name: bytes(t.data) for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert files[True]["blk.0.ffn_down.weight"] != files[False]["blk.0.ffn_down.weight"]


@pytest.mark.parametrize("to,recipe", [("onnx", {"bits": 4}), ("mlc", {"bits": None, "preset": "q4f16_1"})])
def test_act_order_reaches_onnx_and_mlc_files(tiny_llama, tmp_path, to, recipe) -> None:
    """GPTQConfig(act_order=True) changes what an ONNX (MatMulNBits) or MLC (q4f16_1) file stores; it used to
    give the same bytes as act_order=False while the manifest recorded act_order: true."""
    files = {}
    for ao in (False, True):
        q = GPTQConfig(calib=CalibConfig(samples=4, seqlen=48), act_order=ao)
        art = api.convert(tiny_llama, to, output=tmp_path / f"{to}-{ao}", recipe=api.ConvertRecipe(**recipe), quantize=q)
        assert art.manifest["recipe"]["quantizer"]["steps"][0]["act_order"] is ao
        files[ao] = {p.name: p.read_bytes() for p in art.path.iterdir()
                     if p.name.startswith(("model.onnx.data", "params_shard_"))}
    assert files[True] and files[True].keys() == files[False].keys()
    assert files[True] != files[False]


def test_act_order_is_recorded_off_where_no_grid_has_blocks(tiny_llama, tmp_path) -> None:
    """Core ML's palettes have no blocks along a row to reorder (one table spans every column): GPTQ sweeps
    them in the file's order, and the manifest says act_order: false rather than the true asked for."""
    q = GPTQConfig(calib=CalibConfig(samples=4, seqlen=48), act_order=True)
    art = api.convert(tiny_llama, "coreml", output=tmp_path / "pal", quantize=q,
                      recipe=api.ConvertRecipe(bits=16, extra={"palettize": 4, "lut_group": 32}))
    rec = art.manifest["recipe"]["quantizer"]
    assert rec["act_order"] is False and rec["steps"][0]["act_order"] is False
