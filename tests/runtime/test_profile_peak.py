"""profile's per-row peak RSS is reached during that row's test: the high-water mark is reset before each
test (Linux), so a row measured after a bigger, transient peak does not report it."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from edgekit import api

pytest.importorskip("llama_cpp")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is reset through /proc")


@pytest.fixture(scope="module")
def tiny_q8(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("peak") / "q8"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(preset="Q8_0")).path


@linux_only
def test_reset_peak_rss_starts_the_high_water_mark_over():
    import numpy as np

    from edgekit.runtime._llamacpp_native import peak_rss_bytes, reset_peak_rss, rss_bytes

    a = np.ones(64 << 17)  # 64 MiB touched, then freed
    del a
    assert peak_rss_bytes() > rss_bytes() + (48 << 20)
    assert reset_peak_rss()
    assert peak_rss_bytes() < rss_bytes() + (8 << 20)


@linux_only
def test_a_bench_after_a_bigger_peak_reports_its_own(tiny_q8):
    """All logits of a full context go through a 4096 x 384 float32 file mapped in the worker (6 MB resident
    while it is written, unmapped after): a tg test after that does not report that transient peak."""
    from edgekit.runtime.base import open_backend

    with open_backend(tiny_q8, n_ctx=4096, n_threads=1) as be:
        be.bench(0, 4, reps=1)
        alone = be.bench(0, 4, reps=1)["peak_rss"]
        be.logits([5 + i % 300 for i in range(4096)])
        after_logits = be.memory()["peak_rss"]
        assert after_logits > alone + (4 << 20)  # the transient peak
        tg = be.bench(0, 4, reps=1)["peak_rss"]
        assert tg < after_logits - (4 << 20)  # old: the worker's lifetime peak
        # still above ``alone``: the compute buffer pages the 512-token batches touched stay resident (llama.cpp
        # allocates the buffer once per context), so they are part of the worker's memory during this test too
        assert tg >= alone


@linux_only
def test_generic_path_resets_this_process_peak(tiny_llama, tmp_path):
    """The ONNX backend runs in this process: its rows' peaks are this process's since the test began."""
    import numpy as np

    from edgekit.runtime.profile_measure import run_generic_test
    from edgekit.runtime.profile_schema import TestSpec

    art = api.convert(tiny_llama, "onnx", output=tmp_path / "o", recipe=api.ConvertRecipe(bits=4))
    with api.open_backend(art, n_ctx=256) as be:
        a = np.ones(96 << 17)  # a 96 MiB peak before the test
        del a

        class Ctx:
            cfg = type("Cfg", (), {"seed": 0, "warmup": False, "reps": 1, "energy": False})()

            @staticmethod
            def cancelled() -> bool:
                return False

        test = TestSpec(n_prompt=0, n_gen=2, n_depth=0)
        row = SimpleNamespace(samples_s=[], ttft_samples_s=[], peak_rss_bytes=None, status="ok")
        run_generic_test(Ctx, be, test, row)
        from edgekit.runtime._llamacpp_native import rss_bytes

        assert row.peak_rss_bytes < rss_bytes() + (32 << 20)
