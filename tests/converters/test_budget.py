"""--bpw: sensitivity-driven mixed precision that lands on the budget."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.gguf.budget import (
    SAMPLE_ROWS,
    Item,
    allocate,
    candidates,
    tensor_errors,
    type_bytes,
)
from edgekit.converters.formats.gguf.mixes import NEEDS_IMATRIX
from edgekit.converters.quantize import gptq_kernel
from edgekit.errors import EdgekitError

T = gguf.GGMLQuantizationType


def _item(name, costs):
    return Item(name, [(t, b, e) for t, b, e in costs])


def test_allocation_spends_bytes_where_error_falls_most():
    sensitive = _item("a", [(T.Q4_0, 100, 50.0), (T.Q5_0, 120, 10.0), (T.Q8_0, 180, 1.0)])
    robust = _item("b", [(T.Q4_0, 100, 5.0), (T.Q5_0, 120, 4.0), (T.Q8_0, 180, 3.9)])
    assert allocate([sensitive, robust], 220) == {"a": T.Q5_0, "b": T.Q4_0}
    assert allocate([sensitive, robust], 300) == {"a": T.Q8_0, "b": T.Q5_0}
    assert allocate([sensitive, robust], 10_000) == {"a": T.Q8_0, "b": T.Q8_0}


def test_dominated_and_non_convex_options_are_skipped():
    it = _item("a", [(T.Q4_0, 100, 10.0), (T.Q4_1, 110, 12.0), (T.Q5_0, 120, 9.9), (T.Q8_0, 140, 1.0)])
    hull = [t for t, _, _ in it.hull()]
    assert hull == [T.Q4_0, T.Q8_0]  # Q4_1 is worse and dearer; Q5_0 lies above the Q4_0-Q8_0 chord


def test_budget_below_the_floor_is_refused():
    with pytest.raises(EdgekitError, match="raise --bpw"):
        allocate([_item("a", [(T.Q4_0, 100, 1.0)])], 50)


def test_candidates_follow_row_width():
    assert T.Q4_K in candidates(1536) and T.Q4_K not in candidates(576)
    assert candidates(576, frozenset({T.Q4_0, T.Q8_0})) == [T.Q4_0, T.Q8_0]
    assert type_bytes(T.Q4_0, (10, 64)) == 10 * 2 * 18
    # rows no block holds are F16, as llama.cpp's fallback writes them, whatever --bpw-types allows
    assert candidates(200) == candidates(200, frozenset({T.Q4_0}), imatrix=False) == [T.F16]
    assert type_bytes(T.F16, (10, 200)) == 10 * 200 * 2


def test_candidates_hold_the_i_quants_cheapest_first():
    wide = candidates(1536)
    assert wide[0] == T.IQ1_S and wide[-1] == T.Q8_0
    assert {T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS, T.IQ4_NL, T.Q2_K} <= set(wide)
    sizes = [type_bytes(t, (1, 1536)) for t in wide]
    assert sizes == sorted(sizes)
    # 576-wide rows hold no 256-weight super-block: of the i-quants only IQ4_NL's 32-weight blocks
    assert [t for t in candidates(576) if t.name.startswith("IQ")] == [T.IQ4_NL]
    # without an importance matrix, what llama.cpp refuses to write unweighted is not offered
    unweighted = candidates(1536, imatrix=False)
    assert not set(unweighted) & NEEDS_IMATRIX and {T.IQ3_S, T.IQ4_XS, T.Q2_K} <= set(unweighted)


def _layer(rows: int, cols: int = 512) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    W = (rng.standard_t(4, (rows, cols)) * rng.gamma(2.0, 0.01, (rows, 1))).astype(np.float32)
    X = rng.standard_normal((2048, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    X *= rng.gamma(0.7, 1.0, cols)  # uneven channel energies, as activations have
    return W, (X.T @ X).astype(np.float32)


def test_lattice_errors_on_a_row_sample_track_the_exact_error():
    """Larger tensors measure the slow lattice types on SAMPLE_ROWS rows, scaled by Q3_K's exact/sample
    ratio; the estimate stays near the exact error, the other types are exact."""
    types = [T.IQ1_M, T.IQ2_S, T.IQ3_XXS, T.Q3_K, T.IQ4_XS]

    def exact(W, H, t):
        return gptq_kernel.hessian_error(W, gptq_kernel.rtn(W, t, imatrix=np.diag(H).copy()).weight, H)

    W, H = _layer(5 * SAMPLE_ROWS)
    est = tensor_errors(W, H, types)
    for t in types:
        want = exact(W, H, t)
        if t in (T.Q3_K, T.IQ4_XS):
            assert est[t] == want
        else:
            assert abs(est[t] / want - 1) < 0.05, (t.name, est[t] / want)
    assert est[T.IQ1_M] > est[T.IQ2_S] > est[T.IQ3_XXS] > est[T.IQ4_XS]
    small, Hs = _layer(2 * SAMPLE_ROWS)  # no sample: every row is measured
    assert tensor_errors(small, Hs, [T.IQ2_S])[T.IQ2_S] == exact(small, Hs, T.IQ2_S)


@pytest.mark.llamacpp
def test_bpw_budget_writes_i_quants_that_llamacpp_runs(tiny_llama, tmp_path):
    """At 3 bits per weight the budget takes lattice i-quants where the rows hold them, GPTQ writes them,
    and llama.cpp runs the file; without an importance matrix (--method rtn) the types llama.cpp refuses
    unweighted are never chosen."""
    from typer.testing import CliRunner

    from edgekit.cli.main import app
    from edgekit.runtime.llamacpp import LlamaCppBackend

    calib = ["--calib-samples", "2", "--calib-seqlen", "32"]
    kinds = {}
    for method in ("gptq", "rtn"):
        out = tmp_path / method
        r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--bpw", "3", "--method", method, *calib,
                                     "-o", str(out)])
        assert r.exit_code == 0, r.output
        m = json.loads((out / "edgekit.json").read_text())
        assert m["bpw"] <= 3.0 and m["budget"]["bpw_planned"] <= 3.0
        kinds[method] = {gguf.GGMLQuantizationType[t["type"]] for t in m["tensors"].values()}
        with LlamaCppBackend(out / "model.gguf", n_ctx=64) as b:
            assert np.isfinite(b.logits(b.tokenize("hello world"))).all()
    lattice = {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S}
    assert kinds["gptq"] & lattice  # the budget took lattice i-quants
    assert not kinds["rtn"] & NEEDS_IMATRIX


@pytest.mark.real
def test_real_model_lands_within_005_of_the_budget(real_hf, tmp_path):
    # the lattice i-quants only fit ffn_down here and cost minutes to measure on 2 cores: left out of this
    # test of the budget's landing (test_bpw_budget_writes_i_quants_that_llamacpp_runs covers them)
    types = tuple(t.name for t in candidates(1536) if t not in (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
                                                                T.IQ3_XXS, T.IQ3_S))
    recipe = api.ConvertRecipe(bits=None, bpw=5.2, calib=CalibConfig(samples=4, seqlen=128), bpw_types=types)
    art = api.convert(real_hf, "gguf", output=tmp_path / "b", recipe=recipe)
    m = json.loads((art.path / "edgekit.json").read_text())
    assert abs(m["bpw"] - 5.2) <= 0.05, m["bpw"]
    assert m["budget"]["bpw_target"] == 5.2
    types = {t["type"] for t in m["tensors"].values()}
    assert len(types - {"F32"}) >= 2  # a real mix, not one type everywhere
