"""Per-tensor type mixes against llama.cpp itself: llama-cpp-python's llama_model_quantize writes the real
SmolLM2 and small synthetic models (the rules SmolLM2 does not reach), and every tensor's type must be ours."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from edgekit.converters.formats.gguf.mixes import PRESETS, ArchInfo, Assignment, TensorInfo, assign_types
from tests.converters.test_mixes import IMATRIX_ONLY, SMOL_ARCH


def _llama_cpp():
    return pytest.importorskip("llama_cpp")


# Presets whose rules change with an importance matrix (IMATRIX_ONLY: those llama.cpp only writes with one).
IMATRIX_RULES = {"Q4_0", "Q5_0", "IQ4_XS", "IQ4_NL"}


def _imatrix_for(tensors: list[TensorInfo]) -> dict[str, np.ndarray]:
    """All-ones importance for every 2-D+ weight (per expert for 3-D ones), as llama-imatrix would list."""
    return {t.name: np.ones(t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1), np.float32)
            for t in tensors if t.n_dims >= 2}


def _quantize_with_llama_cpp(
    src: Path, dst: Path, ftype: int, *, requantize: bool, overrides: list[tuple[str, T]] = (),
    imatrix: dict[str, np.ndarray] | None = None,
) -> dict[str, T]:
    import gguf

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = requantize
    params.nthread = min(8, os.cpu_count() or 1)
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    if overrides:  # a null-pattern-terminated array, like llama-quantize's --tensor-type list
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            table[i].pattern, table[i].type = pattern.encode(), int(qtype)
        params.tt_overrides = table
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for ftype {ftype}"
    got = {t.name: T(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}
    dst.unlink()
    return got


def _read_tensor_infos(path: Path) -> list[TensorInfo]:
    import gguf

    return [
        TensorInfo(t.name, tuple(int(n) for n in t.shape), T(t.tensor_type))
        for t in gguf.GGUFReader(path).tensors
    ]


def _disagreements(ours: dict[str, Assignment], theirs: dict[str, T]) -> list[str]:
    assert set(ours) == set(theirs)
    return [
        f"{n}: ours {a.type.name}, llama.cpp {theirs[n].name}" for n, a in ours.items() if a.type != theirs[n]
    ]


@pytest.mark.llamacpp
@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("IQ")] + ["IQ2_M"])
def test_real_smollm2_matches_llama_cpp(preset, tmp_path, real_gguf):
    _llama_cpp()
    tensors = _read_tensor_infos(real_gguf)
    im = _imatrix_for(tensors) if preset in IMATRIX_ONLY else None
    theirs = _quantize_with_llama_cpp(
        real_gguf, tmp_path / "out.gguf", PRESETS[preset].ftype, requantize=True, imatrix=im
    )
    assert _disagreements(assign_types(tensors, preset, SMOL_ARCH, has_imatrix=im is not None), theirs) == []


# Small synthetic models for the rules SmolLM2 does not reach: an untied output head, GQA >= 4,
# Falcon, 80-layer "70B" models, 8 experts, fused QKV, rows that fit 256 and rows that fit only 32.
SYNTHETIC = {
    # name: (ArchInfo, row width)
    "llama_gqa4": (ArchInfo(16, 8, 2), 256),
    "llama_gqa1_odd": (ArchInfo(12, 4, 4), 320),
    "falcon": (ArchInfo(16, 8, 8, arch="falcon"), 256),
    "llama_70b": (ArchInfo(80, 8, 1), 256),
    "llama_moe8": (ArchInfo(8, 8, 2, n_expert=8), 256),
    "phi3_qkv": (ArchInfo(16, 8, 8, arch="phi3"), 256),
}
_ROWS = 32  # the rules look at row width (ne0) only; few rows keep llama.cpp's quantizing quick


def _synthetic_tensors(arch: ArchInfo, width: int) -> list[TensorInfo]:
    """Names llama.cpp's rules look at, with ``width``-wide rows (ffn_down's are ``width`` too)."""
    roles = (
        ["attn_qkv", "attn_output"] if arch.arch == "phi3" else ["attn_q", "attn_k", "attn_v", "attn_output"]
    )
    if arch.n_expert:
        ffn = [
            TensorInfo(f"ffn_{r}_exps.weight", (width, _ROWS, arch.n_expert)) for r in ("gate", "up", "down")
        ]
        ffn.append(TensorInfo("ffn_gate_inp.weight", (width, arch.n_expert)))
    else:
        ffn = [
            TensorInfo(f"ffn_{r}.weight", (width, _ROWS))
            for r in ("up", "down", "gate")[: 2 + (arch.arch != "phi3")]
        ]
    per_block = [TensorInfo(f"{r}.weight", (width, _ROWS)) for r in roles] + ffn
    per_block += [TensorInfo("attn_norm.weight", (width,)), TensorInfo("ffn_norm.weight", (width,))]
    out = [TensorInfo(n, (width, _ROWS)) for n in ("token_embd.weight", "output.weight")]
    out.append(TensorInfo("output_norm.weight", (width,)))
    for i in range(arch.n_layer):
        out += [TensorInfo(f"blk.{i}.{t.name}", t.shape) for t in per_block]
    return out


def _write_synthetic(path: Path, arch: ArchInfo, width: int) -> list[TensorInfo]:
    import gguf

    tensors = _synthetic_tensors(arch, width)
    w = gguf.GGUFWriter(path, arch.arch)
    # The hyperparameters llama.cpp's loader reads for these architectures.
    w.add_context_length(256)
    w.add_embedding_length(width)
    w.add_block_count(arch.n_layer)
    w.add_feed_forward_length(width)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)
    w.add_rope_dimension_count(width // arch.n_head)
    w.add_vocab_size(_ROWS)
    if arch.n_expert:
        w.add_expert_count(arch.n_expert)
        w.add_expert_used_count(2)
    rng = np.random.default_rng(0)
    for t in tensors:
        w.add_tensor(t.name, rng.standard_normal(t.shape[::-1], dtype=np.float32) * 0.02)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", list(SYNTHETIC))
def test_synthetic_models_match_llama_cpp(model, tmp_path):
    _llama_cpp()
    arch, width = SYNTHETIC[model]
    tensors = _write_synthetic(tmp_path / "src.gguf", arch, width)
    problems = {}
    runs = [(p, False) for p in PRESETS if p not in IMATRIX_ONLY]
    runs += [(p, True) for p in PRESETS if p in IMATRIX_ONLY | IMATRIX_RULES]
    for preset, with_im in runs:
        theirs = _quantize_with_llama_cpp(
            tmp_path / "src.gguf", tmp_path / "out.gguf", PRESETS[preset].ftype, requantize=False,
            imatrix=_imatrix_for(tensors) if with_im else None,
        )
        if bad := _disagreements(assign_types(tensors, preset, arch, has_imatrix=with_im), theirs):
            problems[f"{preset} imatrix={with_im}"] = bad
    assert problems == {}


OVERRIDES = [(r"blk\.0\.ffn_down", T.Q8_0), (r"attn_q\.", T.Q5_K), ("attn", T.F16), (r"blk\.3\.", T.Q2_K)]


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["llama_gqa4", "llama_gqa1_odd"])
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K", "Q8_0", "F16"])
def test_overrides_match_llama_cpp(model, preset, tmp_path):
    # First match wins, the layer counter skips overridden tensors, and a Q5_K override on 320-wide
    # rows falls back to Q5_1; F16 files ignore overrides.
    _llama_cpp()
    arch, width = SYNTHETIC[model]
    tensors = _write_synthetic(tmp_path / "src.gguf", arch, width)
    theirs = _quantize_with_llama_cpp(
        tmp_path / "src.gguf",
        tmp_path / "out.gguf",
        PRESETS[preset].ftype,
        requantize=False,
        overrides=OVERRIDES,
    )
    assert _disagreements(assign_types(tensors, preset, arch, OVERRIDES), theirs) == []
