"""Per-tensor type mixes: the rules of llama.cpp's src/llama-quant.cpp, checked by hand and against llama.cpp."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T

from edgekit.converters.formats.gguf.mixes import (
    BITS_TO_PRESET,
    PRESETS,
    ArchInfo,
    Assignment,
    TensorInfo,
    assign_types,
    is_quantizable,
    nominal_bpw,
    parse_override,
    preset_for_bits,
    preset_from_name,
    tensor_nbytes,
    type_from_name,
)
from edgekit.errors import InputError, UnsupportedError

# --------------------------------------------------------------------------------------------
# Models (GGUF shapes: row width first)
# --------------------------------------------------------------------------------------------


def dense_tensors(
    n_layer: int, hidden: int, ffn: int, kv_width: int, vocab: int, tied: bool
) -> list[TensorInfo]:
    """A llama-style dense model: per block 2 norms, q/k/v/o, gate/up/down."""
    out = [TensorInfo("token_embd.weight", (hidden, vocab)), TensorInfo("output_norm.weight", (hidden,))]
    if not tied:
        out.append(TensorInfo("output.weight", (hidden, vocab)))
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            TensorInfo(b + "attn_norm.weight", (hidden,)),
            TensorInfo(b + "attn_q.weight", (hidden, hidden)),
            TensorInfo(b + "attn_k.weight", (hidden, kv_width)),
            TensorInfo(b + "attn_v.weight", (hidden, kv_width)),
            TensorInfo(b + "attn_output.weight", (hidden, hidden)),
            TensorInfo(b + "ffn_norm.weight", (hidden,)),
            TensorInfo(b + "ffn_gate.weight", (hidden, ffn)),
            TensorInfo(b + "ffn_up.weight", (hidden, ffn)),
            TensorInfo(b + "ffn_down.weight", (ffn, hidden)),
        ]
    return out


# SmolLM2-135M: 30 layers, hidden 576 (not a multiple of 256), ffn 1536 (= 6 * 256), 9 heads of
# 64, 3 kv heads (kv width 192), vocab 49152, tied embeddings.
SMOL = dense_tensors(30, 576, 1536, 192, 49152, tied=True)
SMOL_ARCH = ArchInfo(n_layer=30, n_head=9, n_head_kv=3)
# An 8B-like model: 32 layers, hidden 4096, ffn 14336 (= 56 * 256), 32 heads, 8 kv heads.
BIG = dense_tensors(32, 4096, 14336, 1024, 32000, tied=False)
BIG_ARCH = ArchInfo(n_layer=32, n_head=32, n_head_kv=8)

# llama.cpp's use_more_bits(i, n): i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2.
SMOL_MORE_BITS = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # n = 30
BIG_MORE_BITS = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}  # n = 32


# Presets llama.cpp only writes with an importance matrix.
IMATRIX_ONLY = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ1_S", "IQ1_M"}


def types(mix: dict[str, Assignment], role: str, n_layer: int) -> list[T]:
    return [mix[f"blk.{i}.{role}.weight"].type for i in range(n_layer)]


# --------------------------------------------------------------------------------------------
# What is quantized at all
# --------------------------------------------------------------------------------------------


def test_only_2d_weights_are_quantized():
    assert is_quantizable(TensorInfo("blk.0.attn_q.weight", (64, 64)))
    assert not is_quantizable(TensorInfo("blk.0.attn_norm.weight", (64,)))
    assert not is_quantizable(TensorInfo("blk.0.attn_q.bias", (64,)))
    assert not is_quantizable(TensorInfo("blk.0.attn_q.weight", (64, 1)))  # ggml counts 1 dim
    assert not is_quantizable(TensorInfo("blk.0.attn_q_norm.weight", (64, 64)))
    assert not is_quantizable(TensorInfo("position_embd.weight", (64, 64)))
    assert not is_quantizable(TensorInfo("blk.0.ffn_gate_inp.weight", (64, 8)))
    assert is_quantizable(TensorInfo("blk.0.ffn_down_exps.weight", (64, 64, 8)))


def test_kept_tensors_keep_their_source_type():
    mix = assign_types([TensorInfo("blk.0.attn_norm.weight", (576,), T.F16)], "Q4_K_M", SMOL_ARCH)
    assert mix["blk.0.attn_norm.weight"] == Assignment(T.F16, "kept")


def test_result_keeps_input_order():
    mix = assign_types(list(reversed(SMOL)), "Q4_K_M", SMOL_ARCH)
    assert list(mix) == [t.name for t in reversed(SMOL)]


# --------------------------------------------------------------------------------------------
# SmolLM2: rows of 576 do not fit 256-wide blocks
# --------------------------------------------------------------------------------------------


def test_smollm2_q4_k_m():
    mix = assign_types(SMOL, "Q4_K_M", SMOL_ARCH)
    # Tied embeddings: token_embd is the output head; its rows do not fit Q4_K, so Q8_0 directly.
    assert mix["token_embd.weight"] == Assignment(T.Q8_0, "preset")
    assert mix["output_norm.weight"].type == T.F32
    assert all(mix[f"blk.{i}.ffn_norm.weight"].origin == "kept" for i in range(30))
    for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert {(a.type, a.wanted) for a in (mix[f"blk.{i}.{role}.weight"] for i in range(30))} == {
            (T.Q5_0, T.Q4_K)
        }
    v = mix["blk.5.attn_v.weight"]
    assert (v.type, v.wanted) == (T.Q8_0, T.Q6_K)
    assert v.reason == "row width 576 is not a multiple of 256 (Q6_K's block size)"
    assert types(mix, "attn_v", 30) == [T.Q8_0 if i in SMOL_MORE_BITS else T.Q5_0 for i in range(30)]
    # ffn_down rows are 1536 wide: they fit, no fallback.
    assert types(mix, "ffn_down", 30) == [T.Q6_K if i in SMOL_MORE_BITS else T.Q4_K for i in range(30)]
    assert not any(mix[f"blk.{i}.ffn_down.weight"].fell_back for i in range(30))


def test_smollm2_q2_k_falls_back_to_q4_0():
    mix = assign_types(SMOL, "Q2_K", SMOL_ARCH)
    assert mix["token_embd.weight"].type == T.Q8_0
    # GQA factor 3 (< 4): attn_v Q3_K, which does not fit either -> Q4_0.
    assert (mix["blk.0.attn_v.weight"].type, mix["blk.0.attn_v.weight"].wanted) == (T.Q4_0, T.Q3_K)
    assert (mix["blk.0.attn_output.weight"].type, mix["blk.0.attn_output.weight"].wanted) == (T.Q4_0, T.Q3_K)
    assert (mix["blk.0.attn_q.weight"].type, mix["blk.0.attn_q.weight"].wanted) == (T.Q4_0, T.Q2_K)
    assert set(types(mix, "ffn_down", 30)) == {T.Q3_K}


def test_smollm2_q3_k_m():
    mix = assign_types(SMOL, "Q3_K_M", SMOL_ARCH)
    # attn_v: the first two Q5_K (-> Q5_1), then Q4_K (-> Q5_0).
    assert types(mix, "attn_v", 30) == [T.Q5_1] * 2 + [T.Q5_0] * 28
    # ffn_down: layers below 30/16 = 1 get Q5_K, the rest Q4_K.
    assert types(mix, "ffn_down", 30) == [T.Q5_K] + [T.Q4_K] * 29
    assert mix["blk.7.attn_output.weight"].wanted == T.Q4_K
    assert mix["blk.7.ffn_up.weight"].type == T.Q4_0


@pytest.mark.parametrize(
    ("preset", "layer_type", "down_type", "embd"),
    [
        # The output rule asks Q6_K (576 % 32 == 0), which does not fit and falls back to Q8_0.
        ("Q4_0", T.Q4_0, T.Q4_0, (T.Q8_0, T.Q6_K)),
        ("Q5_1", T.Q5_1, T.Q5_1, (T.Q8_0, T.Q6_K)),
        ("Q8_0", T.Q8_0, T.Q8_0, (T.Q8_0, None)),
        # 576 % 256 != 0: the output rule gives Q8_0 directly; 576-wide rows fall back to Q8_0,
        # ffn_down's 1536-wide rows keep Q6_K.
        ("Q6_K", T.Q8_0, T.Q6_K, (T.Q8_0, None)),
        ("F16", T.F16, T.F16, (T.F16, None)),
        ("BF16", T.BF16, T.BF16, (T.BF16, None)),
    ],
)
def test_smollm2_uniform_presets(preset, layer_type, down_type, embd):
    mix = assign_types(SMOL, preset, SMOL_ARCH)
    assert (mix["token_embd.weight"].type, mix["token_embd.weight"].wanted) == embd
    matrices = {t.name for t in SMOL if t.name.startswith("blk.") and len(t.shape) == 2}
    assert {mix[n].type for n in matrices if "ffn_down" not in n} == {layer_type}
    assert set(types(mix, "ffn_down", 30)) == {down_type}


# --------------------------------------------------------------------------------------------
# An 8B-like model: everything fits, the preset rules show plainly
# --------------------------------------------------------------------------------------------


def test_big_q4_k_m():
    mix = assign_types(BIG, "Q4_K_M", BIG_ARCH)
    assert not any(a.fell_back for a in mix.values())
    assert mix["output.weight"].type == T.Q6_K
    assert mix["token_embd.weight"].type == T.Q4_K  # not tied: an ordinary lookup table
    assert types(mix, "attn_v", 32) == [T.Q6_K if i in BIG_MORE_BITS else T.Q4_K for i in range(32)]
    assert types(mix, "ffn_down", 32) == [T.Q6_K if i in BIG_MORE_BITS else T.Q4_K for i in range(32)]
    assert set(types(mix, "attn_k", 32)) == set(types(mix, "ffn_up", 32)) == {T.Q4_K}


def test_big_other_k_mixes():
    q4s = assign_types(BIG, "Q4_K_S", BIG_ARCH)
    assert types(q4s, "attn_v", 32) == [T.Q5_K] * 4 + [T.Q4_K] * 28  # first 4
    assert types(q4s, "ffn_down", 32) == [T.Q5_K] * 4 + [T.Q4_K] * 28  # first n/8
    q2 = assign_types(BIG, "Q2_K", BIG_ARCH)
    assert set(types(q2, "attn_v", 32)) == {T.Q4_K}  # GQA factor 4
    q3l = assign_types(BIG, "Q3_K_L", BIG_ARCH)
    assert {q3l["blk.9.attn_v.weight"].type, q3l["blk.9.ffn_down.weight"].type} == {T.Q5_K}
    assert q3l["blk.9.attn_output.weight"].type == T.Q5_K
    q5s = assign_types(BIG, "Q5_K_S", BIG_ARCH)
    assert {a.type for n, a in q5s.items() if n.startswith("blk.") and a.origin == "preset"} == {T.Q5_K}
    assert assign_types(BIG, "Q8_0", BIG_ARCH)["output.weight"].type == T.Q8_0


def test_falcon_70b_and_eight_experts():
    falcon = assign_types(BIG, "Q4_K_M", ArchInfo(32, 32, 8, arch="falcon"))
    assert falcon["output.weight"].type == T.Q8_0
    assert types(falcon, "ffn_down", 32)[:3] == [T.Q6_K, T.Q6_K, T.Q5_K]  # < n/16, then use_more_bits
    big80 = dense_tensors(80, 512, 1024, 256, 1000, tied=False)
    llama70 = assign_types(big80, "Q3_K_S", ArchInfo(80, 64, 8))
    assert set(types(llama70, "attn_v", 80)) == {T.Q5_K}
    llama65 = assign_types(big80, "Q3_K_S", ArchInfo(80, 64, 64))
    assert set(types(llama65, "attn_v", 80)) == {T.Q3_K}
    moe = assign_types(BIG, "Q4_K_M", ArchInfo(32, 32, 8, n_expert=8))
    assert set(types(moe, "attn_v", 32)) == set(types(moe, "attn_k", 32)) == {T.Q8_0}
    assert set(types(moe, "attn_output", 32)) == {T.Q5_K}


def test_fused_qkv_follows_attn_v_rules():
    tensors = [TensorInfo(f"blk.{i}.attn_qkv.weight", (4096, 3 * 4096)) for i in range(32)]
    mix = assign_types(tensors, "Q4_K_M", BIG_ARCH)
    assert types(mix, "attn_qkv", 32) == [T.Q6_K if i in BIG_MORE_BITS else T.Q4_K for i in range(32)]


def test_row_width_not_multiple_of_32_ends_in_f16():
    odd = [TensorInfo("blk.0.attn_q.weight", (40, 64))]
    for preset in ("Q4_K_M", "Q8_0", "Q4_0"):
        got = assign_types(odd, preset, BIG_ARCH)["blk.0.attn_q.weight"]
        assert got.type == T.F16 and got.reason.startswith("row width 40 is not a multiple of")


def test_explicit_tied_flag_wins():
    mix = assign_types(BIG, "Q4_K_M", ArchInfo(32, 32, 8, tied_embeddings=True))
    assert mix["token_embd.weight"].type == T.Q6_K


# --------------------------------------------------------------------------------------------
# --tensor-type overrides
# --------------------------------------------------------------------------------------------


def test_override_replaces_preset_rule():
    mix = assign_types(BIG, "Q4_K_M", BIG_ARCH, [("attn_v", "q8_0")])
    assert set(types(mix, "attn_v", 32)) == {T.Q8_0}
    assert mix["blk.0.attn_v.weight"] == Assignment(T.Q8_0, "override", pattern="attn_v")
    assert mix["blk.0.attn_norm.weight"].origin == "kept"


def test_first_matching_override_wins():
    mix = assign_types(BIG, "Q4_K_M", BIG_ARCH, [(r"blk\.0\.", "Q8_0"), ("attn", "F16")])
    assert mix["blk.0.attn_q.weight"].type == T.Q8_0
    assert mix["blk.1.attn_q.weight"].type == T.F16
    assert mix["blk.1.attn_norm.weight"].type == T.F32  # norms are never touched


def test_override_that_does_not_fit_falls_back():
    mix = assign_types(SMOL, "Q4_K_M", SMOL_ARCH, [(r"attn_q\.", T.Q5_K)])
    got = mix["blk.3.attn_q.weight"]
    assert (got.type, got.wanted, got.origin) == (T.Q5_1, T.Q5_K, "override")
    assert "576" in got.reason


def test_overridden_tensors_do_not_advance_layer_counter():
    # llama.cpp counts ffn_down tensors only when the preset rule runs: overriding blk.0 shifts the
    # layer index the rule sees for every later ffn_down by one (layer 4 is seen as 3).
    mix = assign_types(BIG, "Q4_K_M", BIG_ARCH, [(r"blk\.0\.ffn_down", "Q8_0")])
    assert types(mix, "ffn_down", 8) == [T.Q8_0, T.Q6_K, T.Q6_K, T.Q6_K, T.Q6_K, T.Q4_K, T.Q4_K, T.Q6_K]


def test_overrides_do_not_apply_to_float_presets():
    mix = assign_types(BIG, "F16", BIG_ARCH, [("attn_v", "Q8_0")])
    assert mix["blk.0.attn_v.weight"] == Assignment(T.F16, "preset")


def test_bad_overrides():
    with pytest.raises(InputError, match="regex"):
        assign_types(BIG, "Q4_K_M", BIG_ARCH, [("attn_(", "Q8_0")])
    with pytest.raises(UnsupportedError, match="Q6_K"):
        assign_types(BIG, "Q4_K_M", BIG_ARCH, [("attn_v", "Q7_K")])
    with pytest.raises(InputError):
        parse_override("attn_v")
    with pytest.raises(InputError):
        parse_override("=Q8_0")


def test_parse_override():
    assert parse_override(r"BLK\.0\.ATTN_V=q8_0") == (r"blk\.0\.attn_v", T.Q8_0)


# --------------------------------------------------------------------------------------------
# Names and sizes
# --------------------------------------------------------------------------------------------


def test_names():
    assert type_from_name(" q6_k ") == T.Q6_K
    assert type_from_name("bf16") == T.BF16
    with pytest.raises(UnsupportedError, match=r"unknown tensor type 'Q9'.*Q4_K"):
        type_from_name("Q9")
    with pytest.raises(UnsupportedError):
        type_from_name("I32")
    assert preset_from_name("q4_k_m").ftype == 15
    assert preset_from_name("Q4_K").name == "Q4_K_M"
    with pytest.raises(UnsupportedError, match="Q4_K_M"):
        preset_from_name("Q4_K_XL")
    assert {b: preset_for_bits(b).name for b in BITS_TO_PRESET} == BITS_TO_PRESET
    with pytest.raises(UnsupportedError):
        preset_for_bits(7)


def test_preset_table():
    assert {p.name: p.ftype for p in PRESETS.values()} == {
        "F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
        "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
        "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23,
        "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_S": 24, "IQ1_M": 31,
        "TQ1_0": 36, "TQ2_0": 37,
    }  # fmt: skip
    assert BITS_TO_PRESET == {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}


def test_sizes_and_bpw():
    w = TensorInfo("blk.0.attn_q.weight", (256, 4))
    norm = TensorInfo("blk.0.attn_norm.weight", (256,))
    assert tensor_nbytes(w, T.Q4_K) == 4 * 144
    assert tensor_nbytes(w, T.Q8_0) == 4 * 8 * 34
    mix = assign_types([w, norm], "Q8_0", BIG_ARCH)
    assert nominal_bpw([w, norm], mix) == pytest.approx((4 * 8 * 34 * 8 + 256 * 32) / (5 * 256))
    q4 = assign_types(BIG, "Q4_K_M", BIG_ARCH)
    assert 4.5 < nominal_bpw(BIG, q4) < 5.0  # llama-quantize reports ~4.9 for 8B models
    with pytest.raises(InputError):
        tensor_nbytes(TensorInfo("x.weight", (40, 2)), T.Q8_0)


@pytest.mark.parametrize("preset", sorted(IMATRIX_ONLY))
def test_iquant_presets_without_imatrix_say_how(preset):
    with pytest.raises(InputError, match="--method imatrix"):
        assign_types(BIG, preset, BIG_ARCH)
    assign_types(BIG, preset, BIG_ARCH, has_imatrix=True)


def test_iquant_fallbacks_on_smollm2():
    """576-wide rows fit no 256-weight super-block: llama.cpp writes IQ4_NL there, so the imatrix-only
    types survive only in the 1536-wide ffn_down (and IQ3_XXS without an imatrix avoids them)."""
    mix = assign_types(SMOL, "IQ2_M", SMOL_ARCH, has_imatrix=True)
    assert types(mix, "attn_q", 30) == [T.IQ4_NL] * 30
    assert types(mix, "ffn_down", 30) == [T.IQ3_S] * 3 + [T.IQ2_S] * 27
    assert mix["token_embd.weight"].type == T.Q8_0
    plain = assign_types(SMOL, "IQ3_XXS", SMOL_ARCH)
    assert types(plain, "ffn_down", 30) == [T.Q4_K] * 3 + [T.Q3_K] * 27


def test_every_type_tensor_type_accepts_has_an_encoder():
    """--tensor-type refuses up front what the writer could not write (MXFP4, NVFP4, Q1_0 had passed the
    name check and then failed as an 'unknown storage grid' with a list of ~120 other formats' grids)."""
    from edgekit.converters.formats.gguf.mixes import WRITABLE_TYPES, parse_override
    from edgekit.converters.quantize.grids.base import GRIDS

    assert {t.lower() for t in WRITABLE_TYPES} <= set(GRIDS.names())
    with pytest.raises(UnsupportedError, match="unknown tensor type .MXFP4.; valid: F32"):
        parse_override("ffn_down=MXFP4")
