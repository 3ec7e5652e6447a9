"""The numpy ggml kernels: layout, self-consistency, gguf-py identity, error sanity, and byte
identity with llama.cpp itself (the ``llamacpp`` tests, skipped without llama-cpp-python)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgekit.converters.quantize import ggml
from edgekit.converters.quantize.ggml import _common, iq4nl, kquants, legacy
from edgekit.errors import InputError, UnsupportedError

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZED = [*LEGACY, *KQUANTS, T.IQ4_NL]
ALL = [T.F32, T.F16, T.BF16, *QUANTIZED]
GGUF_PY_QUANTIZES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16]


def _pathological(n: int, seed: int = 0) -> np.ndarray:
    """Rows of ``n`` weights built to hit every early exit and clamp in the searches."""
    rng = np.random.default_rng(seed)
    rows = [
        np.zeros(n),
        np.full(n, 0.37),
        np.full(n, -1.5),
        -np.abs(rng.standard_normal(n)),
        np.abs(rng.standard_normal(n)),
        rng.standard_normal(n) * 1e-20,  # below GROUP_MAX_EPS after squaring
        rng.standard_normal(n) * 1e-7,  # fp16-subnormal scales
        rng.standard_normal(n) * 3e4,  # scales near fp16's top
        np.round(rng.standard_normal(n) * 4),
        np.repeat(rng.standard_normal(n // 16), 16),
        rng.standard_t(2, n),
    ]
    spike = rng.standard_normal(n) * 0.01
    spike[5] = 40.0
    rows.append(spike)
    dip = rng.standard_normal(n) * 0.01
    dip[n - 3] = -40.0
    rows.append(dip)
    sparse = rng.standard_normal(n)
    sparse[rng.random(n) < 0.7] = 0.0
    rows.append(sparse)
    holes = rng.standard_normal(n)
    holes[:32] = 0.0
    holes[64:96] = -0.0
    rows.append(holes)
    return np.array(rows, dtype=np.float32)


def _datasets(qtype: T) -> list[np.ndarray]:
    rng = np.random.default_rng(int(qtype))
    if qtype in KQUANTS:
        shapes = [(4, 512), (256,), (2, 3, 768)]
        n = 512
    else:
        shapes = [(3, 576), (2, 4, 64), (32,)]
        n = 576
    data = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in shapes]
    data.append(_pathological(n))
    return data


def _kernel_values(
    qtype: T, x: np.ndarray, imatrix: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and the values decoded from the kernel's own codes and parameters (not from the bytes)."""
    raw, values = ggml.quantize_roundtrip(x, qtype, imatrix)
    assert np.array_equal(raw, ggml.quantize(x, qtype, imatrix))
    return raw, values


# ----- layout and self-consistency -----


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_shape_dtype_and_bytes_decode_to_kernel_values(qtype: T) -> None:
    bs, ts = GGML_QUANT_SIZES[qtype]
    for x in _datasets(qtype):
        raw, values = _kernel_values(qtype, x)
        assert raw.dtype == np.uint8
        assert raw.shape == (*x.shape[:-1], x.shape[-1] // bs * ts)
        decoded = gq.dequantize(raw, qtype)
        assert decoded.shape == x.shape
        assert np.array_equal(decoded, values)
        assert np.array_equal(ggml.dequantize(raw, qtype), values)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_imatrix_path_bytes_decode_to_kernel_values(qtype: T) -> None:
    for x in _datasets(qtype):
        rng = np.random.default_rng(1)
        imatrix = (rng.random(x.shape[-1]) ** 4 * 10).astype(np.float32)
        imatrix[rng.random(x.shape[-1]) < 0.2] = 0.0
        raw, values = _kernel_values(qtype, x, imatrix)
        assert np.array_equal(gq.dequantize(raw, qtype), values)


@pytest.mark.parametrize("qtype", [t for t in QUANTIZED if t != T.Q8_0], ids=lambda t: t.name)
def test_imatrix_steers_the_search(qtype: T) -> None:
    x = np.random.default_rng(2).standard_normal((8, 512)).astype(np.float32)
    imatrix = np.ones(512, dtype=np.float32)
    imatrix[::7] = 50.0
    plain = ggml.quantize_roundtrip(x, qtype)[1]
    steered = ggml.quantize_roundtrip(x, qtype, imatrix)[1]

    def weighted_error(v: np.ndarray) -> float:
        return float(np.sum(imatrix * (v - x) ** 2))

    assert weighted_error(steered) < weighted_error(plain)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # gguf-py's own casts
@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES, ids=lambda t: t.name)
def test_byte_identical_with_gguf_py(qtype: T) -> None:
    for x in _datasets(qtype):
        # +0.0 turns -0.0 into +0.0: gguf-py takes an all-(-0) block's "max" from its first element,
        # where C keeps its +0 start value (see test_all_negative_zero_block_follows_c)
        x = x + np.float32(0.0)
        ours = ggml.quantize(x, qtype)
        theirs = np.asarray(gq.quantize(x, qtype)).view(np.uint8).reshape(ours.shape)
        assert np.array_equal(ours, theirs)


def test_all_negative_zero_block_follows_c() -> None:
    x = np.full((1, 32), -0.0, dtype=np.float32)
    # C: max stays +0, d = +0 / -8 = -0 -> fp16 0x8000; gguf-py would store +0
    assert ggml.quantize(x, T.Q4_0)[0, :2].tolist() == [0x00, 0x80]
    assert ggml.quantize(x, T.Q5_0)[0, :2].tolist() == [0x00, 0x80]


def test_rmse_orders_with_bits() -> None:
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    order = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    rmse = [float(np.sqrt(np.mean((ggml.quantize_roundtrip(x, t)[1] - x) ** 2))) for t in order]
    assert rmse == sorted(rmse, reverse=True), dict(zip([t.name for t in order], rmse, strict=True))
    assert rmse[0] < 0.5 and rmse[-1] < 0.01
    legacy_rmse = {t: float(np.sqrt(np.mean((ggml.quantize_roundtrip(x, t)[1] - x) ** 2))) for t in LEGACY}
    assert legacy_rmse[T.Q4_0] > legacy_rmse[T.Q5_0] > legacy_rmse[T.Q8_0]
    assert legacy_rmse[T.Q4_1] > legacy_rmse[T.Q5_1]


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q4_0], ids=lambda t: t.name)
def test_a_real_matrix_shape_is_quantized_row_by_row(qtype: T) -> None:
    """SmolLM2-135M's 576x1536 spans several of the kernel's processing chunks: every row's bytes are
    the same as quantizing that row alone, and they decode to the kernel's values. (Its speed is
    measured by bench/kernels.py, not asserted: the machine running the tests is shared.)"""
    x = np.random.default_rng(4).standard_normal((576, 1536)).astype(np.float32)
    raw, values = _kernel_values(qtype, x)
    rows = np.random.default_rng(5).choice(576, 6, replace=False)
    for r in [0, 575, *rows]:
        assert np.array_equal(raw[r], ggml.quantize(x[r], qtype)), r
    assert np.array_equal(gq.dequantize(raw, qtype), values)
    rmse = float(np.sqrt(np.mean((values - x) ** 2)))
    assert 0 < rmse < {T.Q4_K: 0.078, T.Q6_K: 0.0195, T.Q4_0: 0.094}[qtype], rmse


# ----- the reusable stages (what GPTQ builds on) -----


def _stages(qtype: T):
    if qtype in KQUANTS:
        return (
            lambda b: kquants.choose_params(qtype, b),
            lambda b, p: kquants.round_to_grid(qtype, b, p),
            lambda c, p: kquants.pack(qtype, c, p),
            256,
        )
    if qtype == T.IQ4_NL:
        return iq4nl.choose_params, iq4nl.round_to_grid, iq4nl.pack, 32
    return (
        lambda b: legacy.choose_params(qtype, b),
        lambda b, p: legacy.round_to_grid(qtype, b, p),
        lambda c, p: legacy.pack(qtype, c, p),
        32,
    )


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_round_to_fixed_params_packs_to_its_values(qtype: T) -> None:
    choose, round_, pack, bs = _stages(qtype)
    x = np.random.default_rng(5).standard_normal((16, bs)).astype(np.float32)
    params = choose(x)
    codes, values = round_(x, params)
    raw = pack(codes, params)
    assert raw.shape == (16, GGML_QUANT_SIZES[qtype][1])
    assert np.array_equal(gq.dequantize(raw, qtype), values)
    # rounding against the chosen parameters is as good as llama.cpp's own codes, up to boundary ties
    own = ggml.quantize_roundtrip(x.reshape(-1), qtype)[1].reshape(x.shape)
    assert np.sum((values - x) ** 2) <= np.sum((own - x) ** 2) * 1.001 + 1e-12


def test_k_rounding_is_llama_cpp_final_pass() -> None:
    x = np.random.default_rng(6).standard_normal((8, 256)).astype(np.float32)
    for qtype in KQUANTS:
        codes, params = kquants.encode(qtype, x)
        again, _ = kquants.round_to_grid(qtype, x, params, fallback=codes)
        assert np.array_equal(codes, again)


# ----- API surface -----


def test_type_metadata() -> None:
    assert ggml.block_size(T.Q4_K) == 256 and ggml.type_size(T.Q4_K) == 144
    assert ggml.block_size(T.Q8_0) == 32 and ggml.type_size(T.Q8_0) == 34
    assert ggml.bits_per_weight(T.Q4_K) == 4.5
    assert ggml.bits_per_weight(T.Q6_K) == 6.5625
    assert ggml.bits_per_weight(T.F16) == 16
    iquants = {T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M}
    assert set(ggml.SUPPORTED_TYPES) == set(ALL) | iquants | {T.TQ1_0, T.TQ2_0}  # ternary: test_ternary_kernels.py


def test_unsupported_type_and_bad_shapes() -> None:
    x = np.zeros((2, 256), dtype=np.float32)
    with pytest.raises(UnsupportedError, match="Q4_K"):
        ggml.quantize(x, T.MXFP4)
    with pytest.raises(InputError, match="multiple of 256"):
        ggml.quantize(np.zeros((2, 288), np.float32), T.Q4_K)
    with pytest.raises(InputError):
        ggml.quantize(x, T.Q4_K, imatrix=np.ones(128, np.float32))
    with pytest.raises(InputError):
        ggml.quantize(x, T.Q4_K, imatrix=-np.ones(256, np.float32))
    bad = np.zeros((2, 256), dtype=np.float32)
    bad[1, 9] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ggml.quantize(bad, T.Q4_K)
    assert ggml.quantize(np.zeros((0, 256), np.float32), T.Q4_K).shape == (0, 144)
    assert ggml.bits_per_weight("q4_k") == 4.5


# ----- byte identity with llama.cpp -----


def _llama_cpp():
    try:
        import llama_cpp
    except Exception:  # ImportError, or its shared library failing to load
        pytest.skip("llama-cpp-python is not installed")
    return llama_cpp


def _ggml_quantize_chunk():
    llama_cpp = _llama_cpp()
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.exists():
        pytest.skip("llama-cpp-python ships no libggml-base.so here")
    lib = ctypes.CDLL(str(path))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]

    def run(x: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> np.ndarray:
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        bs, ts = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows.shape[0], rows.shape[1] // bs * ts), dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        fn(
            int(qtype),
            rows.ctypes.data,
            out.ctypes.data,
            0,
            rows.shape[0],
            rows.shape[1],
            None if im is None else im.ctypes.data,
        )
        return out

    return run


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", [*QUANTIZED, T.F16, T.BF16], ids=lambda t: t.name)
def test_byte_identical_with_ggml_quantize_chunk(qtype: T) -> None:
    """Against the C quantiser llama.cpp's ``llama_model_quantize`` calls per tensor, with and without an
    importance matrix, on Gaussian, heavy-tailed and pathological rows."""
    ref = _ggml_quantize_chunk()
    rng = np.random.default_rng(7)
    data = [
        rng.standard_normal((16, 1024)).astype(np.float32) * 0.02,
        rng.standard_t(3, (16, 1024)).astype(np.float32),
        np.concatenate([_pathological(512, 1), _pathological(512, 2)], axis=1),
    ]
    imatrices = [None, rng.random(1024).astype(np.float32), (rng.random(1024) ** 8 * 100).astype(np.float32)]
    imatrices[2][rng.random(1024) < 0.3] = 0.0
    for x in data:
        for im in imatrices:
            ours = ggml.quantize(x, qtype, im).reshape(x.shape[0], -1)
            theirs = ref(x, qtype, im)
            same = float(np.mean(ours == theirs))
            assert same == 1.0, f"{qtype.name} imatrix={im is not None}: {same:.6f} of bytes identical"


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q5_1], ids=lambda t: t.name)
def test_numpy_fallback_is_byte_identical_with_ggml_too(qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """The affine, symmetric and Q3_K scale searches run compiled by numba when it is installed (the default extras)
    and in numpy without it: with numba hidden, the same rows (pathological ones included) give ggml's bytes
    as well, with and without an importance matrix. More groups than one compiled block holds, so the
    blocking is crossed. (A process compiles them only after ``COMPILE_AFTER`` groups, so the other byte tests
    check the numpy path.)"""
    ref = _ggml_quantize_chunk()
    rng = np.random.default_rng(13)
    x = np.concatenate([rng.standard_t(3, (16, 1024)).astype(np.float32) * 0.05,
                        np.concatenate([_pathological(512, 4), _pathological(512, 5)], axis=1)])
    im = (rng.random(1024) ** 4 * 10).astype(np.float32)
    im[rng.random(1024) < 0.2] = 0.0
    kernels = ("_compiled_qkx", "_compiled_qx", "_compiled_q3")
    assert all(getattr(_common, k)() is not None for k in kernels)  # numba is in the default extras
    for imatrix in (None, im):
        with monkeypatch.context() as m:
            m.setattr(_common, "COMPILE_AFTER", 0)  # these few groups would otherwise stay in numpy
            compiled = ggml.quantize(x, qtype, imatrix)
        with monkeypatch.context() as m:
            for k in kernels:
                m.setattr(_common, k, lambda: None)
            fallback = ggml.quantize(x, qtype, imatrix)
        assert np.array_equal(compiled, fallback)
        assert np.array_equal(fallback.reshape(x.shape[0], -1), ref(x, qtype, imatrix))


_N_VOCAB = 300


def _write_tiny_llama(path: Path, n_embd: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF in F32 with a minimal SentencePiece vocabulary; returns its 2-D weights."""
    rng = np.random.default_rng(seed)
    n_ff = 512
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_vocab_size(_N_VOCAB)
    w.add_file_type(0)  # ALL_F32
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(_N_VOCAB - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(_N_VOCAB - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (_N_VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = {
        "token_embd.weight": (_N_VOCAB, n_embd),
        "output.weight": (_N_VOCAB, n_embd),
        "blk.0.attn_q.weight": (n_embd, n_embd),
        "blk.0.attn_k.weight": (n_embd, n_embd),
        "blk.0.attn_v.weight": (n_embd, n_embd),
        "blk.0.attn_output.weight": (n_embd, n_embd),
        "blk.0.ffn_gate.weight": (n_ff, n_embd),
        "blk.0.ffn_up.weight": (n_ff, n_embd),
        "blk.0.ffn_down.weight": (n_embd, n_ff),
    }
    weights = {}
    for name, shape in shapes.items():
        scale = 0.02 if "embd" not in name else 1.0
        weights[name] = (rng.standard_t(4, shape) * scale).astype(np.float32)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name, arr in weights.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _llama_quantize(
    llama_cpp, src: Path, dst: Path, ftype: int, imatrix: dict[str, np.ndarray] | None
) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True  # every 2-D weight gets the base type (or its shape fallback)
    params.nthread = 4
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


_FTYPES = {
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_M": 12,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ4_NL": 25,
}


def _compare_model(tmp_path: Path, ftype_name: str, n_embd: int, with_imatrix: bool) -> dict[str, float]:
    llama_cpp = _llama_cpp()
    src, dst = tmp_path / "f32.gguf", tmp_path / f"{ftype_name}.gguf"
    weights = _write_tiny_llama(src, n_embd)
    imatrix = None
    if with_imatrix:
        rng = np.random.default_rng(11)
        imatrix = {n: (rng.random(a.shape[1]) ** 3 * 5).astype(np.float32) for n, a in weights.items()}
    _llama_quantize(llama_cpp, src, dst, _FTYPES[ftype_name], imatrix)
    reader = GGUFReader(str(dst))
    same: dict[str, float] = {}
    for t in reader.tensors:
        if t.name not in weights:
            continue
        qtype = T(t.tensor_type)
        theirs = np.asarray(t.data).view(np.uint8).reshape(-1)
        im = None if imatrix is None else imatrix[t.name]
        ours = ggml.quantize(weights[t.name], qtype, im).reshape(-1)
        assert ours.shape == theirs.shape, (t.name, qtype.name)
        same[f"{t.name}:{qtype.name}"] = float(np.mean(ours == theirs))
    assert len(same) == len(weights)
    return same


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype_name", list(_FTYPES), ids=str)
def test_byte_identical_with_llama_model_quantize(tmp_path: Path, ftype_name: str) -> None:
    same = _compare_model(tmp_path, ftype_name, n_embd=256, with_imatrix=False)
    assert all(v == 1.0 for v in same.values()), same


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "ftype_name", ["Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL"], ids=str
)
def test_byte_identical_with_llama_model_quantize_imatrix(tmp_path: Path, ftype_name: str) -> None:
    same = _compare_model(tmp_path, ftype_name, n_embd=256, with_imatrix=True)
    assert all(v == 1.0 for v in same.values()), same


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype_name", ["Q2_K", "Q4_K_M", "Q6_K"], ids=str)
def test_shape_fallback_types_match_llama_cpp(tmp_path: Path, ftype_name: str) -> None:
    """Rows of 288 fit no 256-weight super-block: llama.cpp falls back to a 32-block type per tensor."""
    same = _compare_model(tmp_path, ftype_name, n_embd=288, with_imatrix=False)
    assert any(not k.endswith("_K") for k in same)
    assert all(v == 1.0 for v in same.values()), same
