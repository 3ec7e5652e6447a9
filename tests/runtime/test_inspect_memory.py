"""inspect's memory figures for a GGUF are plan's: the peak to run counts the llama.cpp process's baseline as
plan does, and the KV cache counts the cells llama.cpp allocates (ctx rounded up to 256), one rule for both."""

from __future__ import annotations

import pytest

from edgekit import api

BASELINE = 45 << 20


@pytest.fixture(scope="module")
def tiny_q4(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect-mem") / "q4"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=4)).path


@pytest.fixture
def fixed_baseline(monkeypatch):
    """A known worker baseline: no llama.cpp probe, and the figure must show up in both reports."""
    from edgekit.runtime import hostinfo

    monkeypatch.setattr(hostinfo, "baseline_rss", lambda refresh=False, strict=True: BASELINE)
    return BASELINE


@pytest.mark.parametrize("ctx", [1000, 1024, 2048])
def test_inspect_peak_to_run_is_plans_ram(tiny_q4, fixed_baseline, ctx):
    from edgekit.runtime.plan import plan_artifact

    info = api.inspect(tiny_q4, ctx=ctx)
    run = info["memory"]["to_run"]
    plan = plan_artifact(tiny_q4, ram_bytes=1 << 40, vram_bytes=0, n_ctx=ctx, cpu_Bps=1e10)
    assert run["runtime"] == "llamacpp"
    assert run["bytes"] == plan.memory.ram_bytes  # the same process, the same figure
    assert plan.memory.parts["baseline"] == fixed_baseline
    assert run["bytes"] > info["memory"]["total"] + fixed_baseline


def test_inspect_kv_counts_llamacpp_cells(tiny_q4):
    from edgekit.runtime.memory import MemoryConfig, estimate_memory, read_shape

    shape = read_shape(tiny_q4 / "model.gguf")
    at = {ctx: api.inspect(tiny_q4, ctx=ctx)["memory"] for ctx in (1000, 1024, 1025)}
    assert at[1000]["kv_cache_f16"] == at[1024]["kv_cache_f16"] == 2 * 2 * 1024 * 2 * 64 * 2  # 1024 cells
    assert at[1025]["kv_cache_f16"] == at[1024]["kv_cache_f16"] * 1280 // 1024
    for ctx, mem in at.items():
        assert mem["ctx"] == ctx
        assert mem["kv_cache_f16"] == estimate_memory(shape, MemoryConfig(n_ctx=ctx)).parts["kv_cpu"]  # plan's
