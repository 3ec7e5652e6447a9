"""bench/speculative.py's cost model (bench/speculative_bounds.py): the acceptance rate a draft of a measured cost needs for a speed-up
(what its table reports beside each draft row, and what the note on a missed target rests on)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("speculative_bounds", BENCH / "speculative_bounds.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def speed(a: float, k: int, step: float, extra: float, draft: float) -> float:
    return sum(a ** i for i in range(k + 1)) * step / (step + k * (extra + draft))


def test_acceptance_needed_is_the_least_rate_that_reaches_the_speedup(bench):
    # free verification and drafting: k+1 tokens per step, so the bar is 1 + a + .. + a^16 >= 1.5 (a just over 1/3)
    free = {"step_ms": 10.0, "extra_ms": 0.0, "draft_ms": 0.0}
    a = bench.acceptance_needed(free, 1.5)
    assert 1 / 3 < a < 0.34
    costs = {"step_ms": 16.8, "extra_ms": 4.4, "draft_ms": 4.1}  # bench/results/speculative.json, F16 grounded
    a = bench.acceptance_needed(costs, 1.5)
    best = max(speed(a, k, 16.8, 4.4, 4.1) for k in range(1, 17))
    below = max(speed(a - 0.005, k, 16.8, 4.4, 4.1) for k in range(1, 17))
    assert best >= 1.5 > below
    assert 0.9 < a < 1.0
    # the bar at the perfect draft's own speed-up is a = 1; a draft costing as much as a step never gets there
    top, _ = bench.best_possible(costs)
    assert bench.acceptance_needed(costs, top * 0.999) > 0.99
    assert bench.acceptance_needed({"step_ms": 10.0, "extra_ms": 5.0, "draft_ms": 5.0}, 1.5) is None


def test_the_bench_prices_cycles_with_the_measured_widths(bench):
    """A run that stored the target's step per batch width prices each cycle on that curve (the drafting
    loop's model); a stored run without it on the linear one."""
    linear = {"step_ms": 17.0, "extra_ms": 4.0, "draft_ms": 0.0}
    curve = {**linear, "verify_ms": {"1": 17.0, "2": 25.0, "3": 28.0, "5": 33.0, "9": 37.0}}
    assert bench.speedup_at(linear, 1.0, 8) == pytest.approx(9 * 17.0 / (17.0 + 8 * 4.0))
    assert bench.speedup_at(curve, 1.0, 8) == pytest.approx(9 * 17.0 / 37.0)
    assert bench.speedup_at(curve, 1.0, 1) == pytest.approx(2 * 17.0 / 25.0)
    # the prompt-lookup bound: an output that copies 8 tokens after a one-token match, twice
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    out = [1, 2, 3, 4, 5, 6, 7, 8, 9, 99, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    pairs = [(prompt, out)]
    assert bench.lookup_bound(pairs, curve, k_max=8) > bench.lookup_bound(pairs, linear, k_max=8) > 1.0
    # aggregated as the rows are: the mean over prompts (a short copied answer counts as much as a long one)
    other = ([5, 6, 7], [8, 9, 10, 11])  # nothing to copy: the oracle decodes as plain decoding does
    assert bench.lookup_bounds([other], curve, k_max=8) == [pytest.approx(1.0)]
    both = bench.lookup_bound([*pairs, other], curve, k_max=8)
    assert both == pytest.approx((bench.lookup_bound(pairs, curve, k_max=8) + 1.0) / 2)
