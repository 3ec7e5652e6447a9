"""--bpw: sensitivity-driven mixed precision that lands on the budget."""

from __future__ import annotations

import json

import gguf
import pytest

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.gguf.budget import Item, allocate, candidates, type_bytes
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


@pytest.mark.real
def test_real_model_lands_within_005_of_the_budget(real_hf, tmp_path):
    recipe = api.ConvertRecipe(bits=None, bpw=5.2, calib=CalibConfig(samples=4, seqlen=128))
    art = api.convert(real_hf, "gguf", output=tmp_path / "b", recipe=recipe)
    m = json.loads((art.path / "edgekit.json").read_text())
    assert abs(m["bpw"] - 5.2) <= 0.05, m["bpw"]
    assert m["budget"]["bpw_target"] == 5.2
    types = {t["type"] for t in m["tensors"].values()}
    assert len(types - {"F32"}) >= 2  # a real mix, not one type everywhere
