"""How the benchmarks flag noisy timings (bench/common.py's noise_flag, bench/speculative.py's noisy column and
line): a load average above the core count while a row ran, or repeated rounds of one row that disagree."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def load(name: str, file: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def common():
    return load("bench_common", "common.py")


@pytest.fixture(scope="module")
def spec_bench():
    return load("speculative_bench_noise", "speculative.py")


def test_a_quiet_row_is_not_flagged(common):
    assert common.noise_flag([100.0, 103.0, 101.0], [1.2, 1.9, 2.0], cores=2) == ""
    assert common.noise_flag([100.0], [0.5], cores=2) == ""  # one round: nothing to compare


def test_a_load_above_the_cores_or_rounds_that_disagree_flag_a_row(common):
    assert common.noise_flag([100.0, 101.0], [1.5, 2.4], cores=2) == "load 2.4 > 2 cores"
    assert common.noise_flag([100.0, 110.0], [1.0, 1.0], cores=2) == "rounds 10% apart"
    assert common.noise_flag([90.0, 110.0], [3.0], cores=2) == "load 3.0 > 2 cores; rounds 20% apart"
    assert common.noise_flag([100.0, 104.0], [], cores=2) == ""  # within the 5% that rounds may differ by


def row(name: str, speeds: list[float], loads: list[float]) -> dict:
    return {"target": "Q8_0", "prompts": "chat", "drafter": name, "round_tok_s": speeds, "loadavg": loads}


def test_the_speculative_bench_counts_its_noisy_rows_and_says_what_to_do(common, spec_bench):
    rows = [row("none (plain)", [100.0, 101.0], [1.0, 1.1]), row("ngram", [100.0, 130.0], [1.0, 2.6])]
    for r in rows:
        r["noisy"] = common.noise_flag(r["round_tok_s"], r["loadavg"], 2)
    report = {"rows": rows, "cores": 2, "rounds": 2, "loadavg_start": 0.8, "loadavg_end": 2.6}
    (line,) = spec_bench.noise_lines(report)
    assert line.startswith("noisy: 1 of 2 rows (noisy column) ran with the load average above the 2 cores or had "
                           "rounds more than 5% apart") and "rerun them on an idle machine" in line
    quiet = {**report, "rows": rows[:1], "rounds": 1}
    assert spec_bench.noise_lines(quiet) == [
        "noisy: no row (load average at most the 2 cores while each ran; load average 0.8 at start, 2.6 at end on 2 "
        "cores)", "one round: no repeated measurement to compare (--rounds 3 also flags rows whose rounds disagree)"]
    assert spec_bench.noise_lines({"rows": rows}) == ["noisy: ? (this report predates the load and round checks)"]
