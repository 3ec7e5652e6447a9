"""bench/sparse_ffn_gpu.py's skeletons: a GGUF rebuilt from its header and leading rows has the artifact's exact
layout (what the GPU timing relies on), and small tensors come back byte for byte."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parents[2] / "bench" / "sparse_ffn_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sparse_ffn_gpu_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sparse_file(tiny_llama, tmp_path_factory) -> Path:
    from edgekit import api

    art = api.convert(tiny_llama, "gguf", output=tmp_path_factory.mktemp("sk") / "sparse", recipe=api.ConvertRecipe(
        preset="Q4_0", calib=api.CalibConfig(samples=4, seqlen=64),
        extra={"sparse_ffn": "0.25", "sparse_clusters": "4"}))
    return art.model_file


def test_small_tensors_come_back_byte_for_byte(bench, sparse_file, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "WHOLE_BYTES", 1 << 30)
    bench.skeleton(sparse_file, tmp_path / "s")
    out = bench.fill(tmp_path / "s", tmp_path / "back.gguf")
    assert out.read_bytes() == sparse_file.read_bytes()
    assert not (tmp_path / "back.part").exists()


def test_large_tensors_repeat_their_leading_rows_in_the_same_layout(bench, sparse_file, tmp_path, monkeypatch):
    import gguf

    from edgekit.runtime.llamacpp import LlamaCppBackend

    monkeypatch.setattr(bench, "WHOLE_BYTES", 4096)
    monkeypatch.setattr(bench, "TILE_BYTES", 2048)
    info = bench.skeleton(sparse_file, tmp_path / "s")
    tiled = [t for t in info["tensors"] if t["stored"] < t["n_bytes"]]
    assert tiled and all(t["stored"] % t["row_bytes"] == 0 for t in tiled)
    assert sum(t["stored"] for t in info["tensors"]) < sparse_file.stat().st_size / 4
    out = bench.fill(tmp_path / "s", tmp_path / "big.gguf")
    assert out.stat().st_size == sparse_file.stat().st_size
    a, b = gguf.GGUFReader(sparse_file), gguf.GGUFReader(out)
    assert list(a.fields) == list(b.fields)
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in a.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        ra = np.asarray(ta.data).view(np.uint8).reshape(-1)
        rb = np.asarray(tb.data).view(np.uint8).reshape(-1)
        meta = next(t for t in info["tensors"] if t["name"] == ta.name)
        k = meta["stored"]
        assert np.array_equal(rb[:k], ra[:k])
        if k < meta["n_bytes"]:  # every later block of rows is the first one again
            assert np.array_equal(rb[k:2 * k], ra[:k]) and not np.array_equal(rb, ra)
    with LlamaCppBackend(out, n_ctx=64, n_threads=1) as be:  # llama.cpp runs the rebuilt file
        logits = be.logits(list(range(3, 20)))
    assert np.isfinite(logits).all()


def test_placements_timed_include_the_plan_and_only_what_fits(bench, sparse_file):
    from edgekit.runtime.plan import Bandwidths

    bws = Bandwidths(cpu_Bps=20e9, gpu_Bps=1e12)
    full, _ = bench.configs_for(sparse_file, 1 << 30, bws, 256, lambda labels: labels[:1])
    assert full[0]["plan"] and full[0]["label"] == "-ngl 3" and full[0]["overrides"] == []
    budget = int((full[0]["est_vram_MiB"] - 0.05) * 2**20)  # everything on the GPU no longer fits
    cfgs, plan = bench.configs_for(sparse_file, budget, bws, 256, lambda labels: labels)
    assert plan["label"] != "-ngl 3" and sum(c["plan"] for c in cfgs) == 1
    assert [c["label"] for c in cfgs if c["plan"]] == [plan["label"]]
    assert all(c["est_vram_MiB"] * 2**20 <= budget for c in cfgs) and any(c["ngl"] > 0 for c in cfgs)
    assert any(c["overrides"] for c in cfgs)  # expert tensors kept on the CPU are among the placements timed
