"""GPTQ onto ggml grids: exact GGUF bytes, lower Hessian-weighted error than RTN, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit.converters.quantize import ggml
from edgekit.converters.quantize.ggml import iq4nl, kquants, legacy
from edgekit.converters.quantize.gptq_kernel import (
    GridResult,
    gptq,
    hessian_error,
    inverse_hessian,
    rtn,
)
from edgekit.errors import InputError, UnsupportedError

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZED = [*LEGACY, *KQUANTS, T.IQ4_NL]

# gptq / rtn Hessian-weighted error on _problem(); measured 0.22-0.59 over three seeds and both shapes
# below (Q2_K the highest, then the 4-bit types), with and without an importance matrix
MAX_RATIO = 0.65


def _activations(n_in: int, n: int = 2048, seed: int = 0) -> np.ndarray:
    """Calibration-like inputs: correlated features (a low-rank mix plus noise) and a few outlier
    channels 25x larger than the rest."""
    rng = np.random.default_rng(seed)
    k = n_in // 8
    X = rng.standard_normal((n, k)) @ (rng.standard_normal((k, n_in)) / np.sqrt(k))
    X += 0.5 * rng.standard_normal((n, n_in))
    X[:, rng.choice(n_in, 4, replace=False)] *= 25.0
    return X


def _problem(n_out: int, n_in: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    X = _activations(n_in, seed=seed)
    W = (np.random.default_rng(100 + seed).standard_t(5, (n_out, n_in)) * 0.02).astype(np.float32)
    return W, X.T @ X


def _blocks(qt: T, a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, GGML_QUANT_SIZES[qt][0])


def _round_to_grid(qt: T, blocks: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    if qt in kquants.TYPES:
        return kquants.round_to_grid(qt, blocks, params)
    if qt == T.IQ4_NL:
        return iq4nl.round_to_grid(blocks, params)
    return legacy.round_to_grid(qt, blocks, params)


def _choose_params(qt: T, blocks: np.ndarray):
    if qt in kquants.TYPES:
        return kquants.choose_params(qt, blocks)
    if qt == T.IQ4_NL:
        return iq4nl.choose_params(blocks)
    return legacy.choose_params(qt, blocks)


def _check_exact(res: GridResult, qt: T, shape: tuple[int, int]) -> None:
    """The bytes have the GGUF size and decode (through gguf-py) to exactly ``res.weight``; the codes
    are the nearest grid points of those values under the packed parameters."""
    n_out, n_in = shape
    bs, ts = GGML_QUANT_SIZES[qt]
    assert res.qtype == qt
    assert res.data.dtype == np.uint8 and res.data.shape == (n_out, n_in // bs * ts)
    assert res.weight.dtype == np.float32 and res.weight.shape == shape
    decoded = gq.dequantize(res.data, qt).reshape(shape)
    assert np.array_equal(decoded, res.weight)
    if res.codes is not None:
        codes, values = _round_to_grid(qt, _blocks(qt, res.weight), res.params)
        assert np.array_equal(codes.reshape(shape), res.codes)
        assert np.array_equal(values.reshape(shape), res.weight)


@pytest.mark.parametrize("qt", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(96, 768), (64, 512)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gptq_beats_rtn_and_is_exact(qt, shape):
    W, H = _problem(*shape)
    base = rtn(W, qt)
    res = gptq(W, H, qt)
    _check_exact(base, qt, shape)
    _check_exact(res, qt, shape)
    assert res.damp == 0.01
    ratio = hessian_error(W, res.weight, H) / hessian_error(W, base.weight, H)
    assert ratio < MAX_RATIO, ratio


@pytest.mark.parametrize("qt", QUANTIZED, ids=lambda t: t.name)
def test_imatrix_roundtrips_exactly(qt):
    shape = (64, 512)
    W, H = _problem(*shape, seed=1)
    im = np.diag(H).astype(np.float32)
    base = rtn(W, qt, imatrix=im)
    res = gptq(W, H, qt, imatrix=im)
    _check_exact(base, qt, shape)
    _check_exact(res, qt, shape)
    # rtn with the importance matrix is exactly llama.cpp's --imatrix quantisation
    assert np.array_equal(base.data, ggml.quantize(W, qt, im))
    ratio = hessian_error(W, res.weight, H) / hessian_error(W, base.weight, H)
    assert ratio < MAX_RATIO, ratio
    if qt != T.Q8_0:  # (Q8_0 ignores the importance matrix, as llama.cpp does)
        assert not np.array_equal(res.data, gptq(W, H, qt).data)


@pytest.mark.parametrize("qt", QUANTIZED, ids=lambda t: t.name)
def test_diagonal_hessian_is_rounding_under_the_kernels_params(qt):
    """With no correlation between inputs nothing propagates: every block's parameters are chosen from
    the original weights and each weight goes to its nearest grid point, i.e. exactly the kernel's
    choose_params + round_to_grid."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((16, 512)).astype(np.float32)
    H = np.diag(rng.uniform(0.1, 10.0, 512))
    res = gptq(W, H, qt)
    blocks = _blocks(qt, W)
    params = _choose_params(qt, blocks)
    codes, values = _round_to_grid(qt, blocks, params)
    assert np.array_equal(res.codes, codes.reshape(W.shape))
    assert np.array_equal(res.weight, values.reshape(W.shape))
    for name in ("d", "m", "scales", "dmin", "mins"):
        if hasattr(params, name) and getattr(params, name) is not None:
            assert np.array_equal(getattr(res.params, name), getattr(params, name)), name


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q5_1, T.Q3_K, T.Q4_K, T.IQ4_NL], ids=lambda t: t.name)
def test_dead_column_and_zero_row(qt):
    shape = (32, 512)
    W, H = _problem(*shape, seed=2)
    dead = 37
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    W[5] = 0.0
    res = gptq(W, H, qt, imatrix=np.diag(H).astype(np.float32))
    _check_exact(res, qt, shape)
    assert not res.weight[5].any() and hessian_error(W[5:6], res.weight[5:6], H) == 0.0
    # the dead column keeps its weights (rounded under its block's parameters) and passes no error on
    orig = res.weight.copy()
    orig[:, dead] = W[:, dead]
    codes, values = _round_to_grid(qt, _blocks(qt, orig), res.params)
    assert np.array_equal(codes.reshape(shape)[:, dead], res.codes[:, dead])
    assert np.abs(res.weight[:, dead] - W[:, dead]).max() <= np.abs(W[:, dead]).max() * 0.5
    assert hessian_error(W, res.weight, H) < hessian_error(W, rtn(W, qt).weight, H)
    # every column dead: no Hessian information at all, still exact
    res0 = gptq(W, np.zeros_like(H), qt)
    _check_exact(res0, qt, shape)


@pytest.mark.parametrize("block_cols", [1, 100, 256, 512])
@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_K], ids=lambda t: t.name)
def test_batch_width_only_changes_rounding_noise(qt, block_cols):
    shape = (32, 512)
    W, H = _problem(*shape, seed=4)
    ref = hessian_error(W, gptq(W, H, qt).weight, H)
    res = gptq(W, H, qt, block_cols=block_cols)
    _check_exact(res, qt, shape)
    assert hessian_error(W, res.weight, H) == pytest.approx(ref, rel=0.02)


def test_shared_inverse_hessian():
    """q/k/v (or gate/up) read the same input: one factorisation serves them all, with the same bytes."""
    W, H = _problem(48, 512, seed=5)
    ih = inverse_hessian(H, damp=0.02)
    assert ih.U.dtype == np.float32 and ih.U.shape == (512, 512) and ih.damp == 0.02
    assert np.array_equal(ih.U, np.triu(ih.U)) and (np.diag(ih.U) > 0).all()
    for qt in (T.Q4_0, T.Q5_K):
        a = gptq(W, ih, qt)
        b = gptq(W, H, qt, damp=0.02)
        assert np.array_equal(a.data, b.data) and a.damp == 0.02
    with pytest.raises(InputError, match="inverse Hessian has shape"):
        gptq(W[:, :256], ih, T.Q4_0)


@pytest.mark.parametrize("qt", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_are_rounded_weights(qt):
    W, H = _problem(8, 64)
    res = gptq(W, H, qt)
    data, weight = ggml.quantize_roundtrip(W, qt)
    assert np.array_equal(res.data, data) and np.array_equal(res.weight, weight)
    assert np.array_equal(rtn(W, qt).data, data)


def test_dampening_is_raised_until_the_factorisation_works():
    W, _ = _problem(16, 256)
    X = _activations(256, n=64)  # rank 64 < 256: singular, made definite by the default dampening
    res = gptq(W, X.T @ X, T.Q4_0)
    _check_exact(res, T.Q4_0, W.shape)
    assert res.damp == 0.01
    # shifted to an eigenvalue of -0.02 x the original mean diagonal (about -0.04 x the new one):
    # 0.01 x mean(diag H) is not enough, 0.1 x is
    X = np.random.default_rng(7).standard_normal((2048, 256))
    H = X.T @ X
    H -= (np.linalg.eigvalsh(H)[0] + 0.02 * np.diag(H).mean()) * np.eye(256)
    res = gptq(W, H, T.Q4_K)
    _check_exact(res, T.Q4_K, W.shape)
    assert res.damp == pytest.approx(0.1)
    # never definite: eigenvalue -2 against a mean diagonal of 1, beyond any dampening allowed
    with pytest.raises(InputError, match="not positive definite"):
        gptq(W, 3.0 * np.ones((256, 256)) - 2.0 * np.eye(256), T.Q4_0)
    with pytest.raises(InputError, match="negative diagonal"):
        gptq(W, -np.eye(256), T.Q4_0)


def test_bad_input():
    W, H = _problem(8, 256)
    with pytest.raises(InputError, match="multiple of 256"):
        gptq(W[:, :96], H[:96, :96], T.Q4_K)
    with pytest.raises(InputError, match="H has shape"):
        gptq(W, H[:128, :128], T.Q4_0)
    with pytest.raises(InputError, match="2-D"):
        gptq(W[0], H, T.Q4_0)
    with pytest.raises(InputError, match="imatrix"):
        gptq(W, H, T.Q4_0, imatrix=np.ones(3))
    W2 = W.copy()
    W2[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        gptq(W2, H, T.Q4_0)
    H2 = H.copy()
    H2[1, 1] = np.inf
    with pytest.raises(InputError, match="H contains"):
        gptq(W, H2, T.Q4_0)
    with pytest.raises(InputError, match="damp"):
        gptq(W, H, T.Q4_0, damp=-1.0)
    with pytest.raises(InputError, match="needs an importance matrix"):  # as llama.cpp's scale search
        gptq(W, H, T.IQ2_XS)
    with pytest.raises(UnsupportedError, match="unknown storage grid"):
        gptq(W, H, "Q9_Z")


def test_hessian_error_is_output_error():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((100, 32))
    W = rng.standard_normal((8, 32))
    Wq = W + 0.01 * rng.standard_normal((8, 32))
    direct = float(np.sum((X @ (W - Wq).T) ** 2))
    assert hessian_error(W, Wq, X.T @ X) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gptq_on_smollm_shapes_is_exact_and_beats_rtn(shape):
    """On SmolLM2-135M's matrix shapes (several lazy batches, wide and tall), with an importance matrix as
    the converter passes it: exact GGUF bytes, and less Hessian-weighted error than RTN. (Timings of the
    same runs: bench/kernels.py.)"""
    W, H = _problem(*shape, seed=2)
    im = np.diag(H).astype(np.float32)
    for qt in [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K]:
        if shape[1] % GGML_QUANT_SIZES[qt][0]:
            continue
        res = gptq(W, H, qt, imatrix=im)
        base = rtn(W, qt, imatrix=im)
        _check_exact(res, qt, shape)
        ratio = hessian_error(W, res.weight, H) / hessian_error(W, base.weight, H)
        assert ratio < MAX_RATIO, (qt.name, ratio)


def test_the_callers_matrix_is_never_updated_in_place():
    """A one-row matrix transposes to an array that is already contiguous: the sweep must still copy it."""
    rng = np.random.default_rng(3)
    for shape in ((1, 64), (4, 64)):
        w = rng.standard_normal(shape).astype(np.float32)
        x = rng.standard_normal((256, 64))
        keep = w.copy()
        gptq(w, x.T @ x, T.Q8_0)
        assert np.array_equal(w, keep)


@pytest.mark.parametrize("qt", [*QUANTIZED, T.IQ4_XS, T.IQ2_XS, T.IQ3_S], ids=lambda t: t.name)
def test_act_order_stores_the_files_column_order_and_cuts_the_error(qt):
    """Act-order sweeps whole blocks, those with the largest inputs first: the bytes are still in the file's
    order (they decode to the returned weights, the codes and parameters check out), and with the outlier
    inputs in late blocks it ends with a lower Hessian-weighted error than the left-to-right sweep."""
    shape = (64, 512)
    rng = np.random.default_rng(7)
    X = _activations(shape[1], seed=3)
    X[:, 448:480] *= 6.0  # the loudest inputs in the last blocks: left to right rounds them with nothing after
    W = (rng.standard_t(5, shape) * 0.02).astype(np.float32)
    H = X.T @ X
    im = np.diag(H).astype(np.float32)
    plain = gptq(W, H, qt, imatrix=im)
    ordered = gptq(W, H, qt, imatrix=im, act_order=True)
    if qt in (T.IQ4_XS, T.IQ2_XS, T.IQ3_S):  # no _round_to_grid here: the bytes decode to the weights
        assert np.array_equal(gq.dequantize(ordered.data, qt).reshape(shape), ordered.weight)
    else:
        _check_exact(ordered, qt, shape)
    assert hessian_error(W, ordered.weight, H) < 0.97 * hessian_error(W, plain.weight, H)


@pytest.mark.parametrize("grid,n_in", [("UINT4_B32", 512), ("INT4_B32", 512), ("UINT8_B128", 512),
                                        ("COREML_INT4_B32", 512), ("MLC_INT4_G32_F16", 512),
                                        ("MLC_INT3_G40_F16", 500)])
def test_act_order_on_onnx_coreml_and_mlc_grids(grid, n_in):
    """Act-order is not only for ggml grids: MatMulNBits (ONNX), Core ML's blockwise and MLC's groups keep one
    set of parameters per block too, so their blocks are swept loudest first as well (it used to be a no-op
    there, while the manifest said act_order: true). The stored bytes are in the file's column order and decode
    to the returned weights (MLC int3's padded last group still code 0), the codes differ from the left-to-right
    sweep's, and the layer's output error on the calibration inputs is lower."""
    from edgekit.converters.quantize import mlcgroup
    from edgekit.converters.quantize.grids import as_grid
    from edgekit.converters.quantize.steps.gptq_round import GPTQRound, GPTQRoundConfig

    g = as_grid(grid)
    rng = np.random.default_rng(7)
    X = _activations(n_in, seed=3)
    X[:, 384:416] *= 6.0  # the loudest inputs in late blocks: left to right rounds them with little after
    W = (rng.standard_t(5, (64, n_in)) * 0.02).astype(np.float32)
    H = X.T @ X
    im = np.diag(H).astype(np.float32)
    plain = gptq(W, H, g, imatrix=im)
    ordered = gptq(W, H, g, imatrix=im, act_order=True)
    assert ordered.data.shape == plain.data.shape == (64, g.row_bytes(n_in))
    np.testing.assert_array_equal(g.dequantize(ordered.data).reshape(64, -1)[:, :n_in], ordered.weight)
    if n_in % g.block:
        codes, _ = mlcgroup.unpack(g, ordered.data.reshape(-1, g.record))
        assert not codes.reshape(64, -1)[:, n_in:].any()
    assert not np.array_equal(ordered.codes, plain.codes)
    Y = X @ W.T.astype(np.float64)

    def out_err(q: np.ndarray) -> float:
        return float(((Y - X @ q.T.astype(np.float64)) ** 2).sum())

    assert out_err(ordered.weight) < 0.9 * out_err(plain.weight), (out_err(ordered.weight), out_err(plain.weight))
    # the rounding step applies it for these grids (it used to switch it off for all but ggml's)
    on = GPTQRound(GPTQRoundConfig(act_order=True))._round(W, H, g, im)
    off = GPTQRound(GPTQRoundConfig(act_order=False))._round(W, H, g, im)
    assert np.array_equal(on.data, ordered.data) and np.array_equal(off.data, plain.data)


def test_act_order_needs_a_ggml_grid_and_h_itself():
    W, H = _problem(16, 64)
    with pytest.raises(InputError, match="pass H, not an InverseHessian"):
        gptq(W, inverse_hessian(H), T.Q4_0, act_order=True)
    res = gptq(W[:, :32], H[:32, :32], T.Q4_0, act_order=True)  # one block: nothing to order
    assert np.array_equal(res.weight, gptq(W[:, :32], H[:32, :32], T.Q4_0).weight)
