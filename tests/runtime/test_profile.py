"""The profiler on tiny real GGUFs through llama.cpp: schema, statistics, sweeps, interleaving, cancel,
Ctrl-C, the generic path, llama-bench import, and the `edgekit profile` CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.errors import InputError, UnsupportedError
from edgekit.runtime.profile import (
    ProfileConfig,
    ProfileInterrupted,
    TestSpec,
    from_llama_bench,
    mean_std,
    parse_tests,
    profile,
)

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    from edgekit import api

    root = tmp_path_factory.mktemp("prof")
    return {t: api.convert(tiny_llama, "gguf", output=root / f"tiny-{t}", recipe=api.ConvertRecipe(bits=None, preset=t)).path
            for t in ("F16", "Q8_0")}


@pytest.fixture()
def home(private_home) -> Path:
    return private_home


def test_parse_tests_and_names():
    tests = parse_tests("pp512, tg128,pp512+tg128,tg64@d1024")
    assert [t.name for t in tests] == ["pp512", "tg128", "pp512+tg128", "tg64@d1024"]
    assert tests[3] == TestSpec(n_gen=64, n_depth=1024)
    for bad in ("", "xx", "pp", "pp-1", "tg0"):
        with pytest.raises(InputError):
            parse_tests(bad)


def test_mean_std_is_sample_stddev():
    assert mean_std([]) == (None, None)
    assert mean_std([2.0]) == (2.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(1.2909944, rel=1e-6)


def test_config_validation():
    with pytest.raises(InputError):
        ProfileConfig(reps=0)
    with pytest.raises(InputError):
        ProfileConfig(threads=(0,))
    assert len(ProfileConfig(threads=(1, 2), ctx=(1024, 2048), depth=(0, 8)).combos()) == 8
    with pytest.raises(InputError, match="--ctx 512 cannot hold pp512 at depth 8"):
        ProfileConfig(ctx=(1024, 512), depth=(0, 8))


@needs_llama
def test_profile_rows_schema_and_statistics(tiny_ggufs, home):
    seen = []
    run = profile([tiny_ggufs["F16"]], ProfileConfig(tests=parse_tests("pp16,tg8,pp8+tg4"), reps=3, threads=(2,)),
                  on_row=seen.append)
    assert run.status == "ok" and [r.test for r in run.rows] == ["pp16", "tg8", "pp8+tg4"] and seen == run.rows
    for r in run.rows:
        d = json.loads(json.dumps(r.to_json()))
        assert d["schema"] == "edgekit.profile/1" and d["status"] == "ok" and d["method"] == "llamacpp-worker"
        assert d["reps"] == 3 and len(d["samples_s"]) == 3 and all(s > 0 for s in d["samples_s"])
        tokens = r.n_prompt + r.n_gen
        assert d["samples_tps"] == pytest.approx([tokens / s for s in d["samples_s"]])
        assert d["tps_mean"] == pytest.approx(sum(d["samples_tps"]) / 3)
        assert d["config"]["n_threads"] == 2 and d["config"]["n_ctx"] >= tokens
        assert d["artifact"]["sha256"] and d["artifact"]["size_bytes"] > 0 and d["load_s"] > 0
        assert d["peak_rss_bytes"] > 20e6  # the worker's, with llama.cpp loaded
        assert d["energy"]["available"] is False and d["energy"]["reason"] or d["energy"]["joules_per_token"] > 0
        assert d["host"]["fingerprint"] and d["runtime"]["llama_cpp_python"]
    pp, tg, pg = run.rows
    assert pp.ttft_samples_s and pg.ttft_samples_s and not tg.ttft_samples_s
    assert all(t < s for t, s in zip(pg.ttft_samples_s, pg.samples_s, strict=True))  # TTFT is part of the total
    assert tg.roofline["available"] and 0 < tg.roofline["fraction"] and tg.roofline["bytes_per_token"] > 0
    assert pp.roofline is None


@needs_llama
def test_sweep_interleaves_artifacts_and_applies_depth(tiny_ggufs, home):
    cfg = ProfileConfig(tests=(TestSpec(n_gen=4),), reps=1, threads=(1, 2), depth=(0, 40))
    run = profile([tiny_ggufs["F16"], tiny_ggufs["Q8_0"]], cfg)
    names = [r.artifact["name"] for r in run.rows]
    assert names == ["tiny-F16", "tiny-Q8_0"] * 4  # configurations outside, artifacts inside
    assert [r.config["n_threads"] for r in run.rows] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [r.n_depth for r in run.rows] == [0, 0, 40, 40] * 2
    assert all(r.config["n_ctx"] >= r.n_depth + 4 for r in run.rows)
    assert run.rows[2].test == "tg4@d40"


@needs_llama
def test_generic_path_matches_schema(tiny_ggufs, home):
    run = profile([tiny_ggufs["F16"]], ProfileConfig(tests=parse_tests("pp16,tg4"), reps=2, method="generic"))
    assert [r.method for r in run.rows] == ["generic", "generic"]
    assert all(r.reps == 2 and r.tps[0] > 0 and r.peak_rss_bytes > 20e6 for r in run.rows)


@needs_llama
def test_cancel_from_another_thread_keeps_partial_rows(tiny_ggufs, home):
    cancel = threading.Event()
    rows = []

    def on_row(row):
        rows.append(row)
        # another thread cancels once the first test is done (joined here, so the timing is deterministic)
        t = threading.Thread(target=cancel.set)
        t.start()
        t.join()

    cfg = ProfileConfig(tests=parse_tests("pp8,tg256"), reps=50, threads=(1,))
    run = profile([tiny_ggufs["F16"]], cfg, on_row=on_row, cancel=cancel)
    assert run.status == "interrupted"
    assert run.rows[0].status == "ok" and run.rows[0].reps == 50
    assert len(run.rows) <= 2 and all(r.reps < 50 for r in run.rows[1:])
    assert all(r.status == "interrupted" for r in run.rows[1:])


@needs_llama
def test_keyboard_interrupt_raises_with_partial_run(tiny_ggufs, home):
    def on_progress(label, done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(ProfileInterrupted) as info:
        profile([tiny_ggufs["F16"]], ProfileConfig(tests=parse_tests("tg4,tg8"), reps=1), on_progress=on_progress)
    assert info.value.run.status == "interrupted" and [r.test for r in info.value.run.rows] == ["tg4"]
    assert info.value.exit_code == 130


def test_missing_runtime_fails_before_running(tmp_path):
    model = tmp_path / "tflite-model"  # a format edgekit describes but has no runtime for
    model.mkdir()
    (model / "params.bin").write_bytes(b"x")
    (model / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "tflite",
                                                    "files": {"model": "params.bin"}}))
    with pytest.raises(UnsupportedError, match="no runtime for 'tflite'"):
        profile([model], ProfileConfig())


def test_from_llama_bench_record():
    rec = {"build_commit": "abc1234", "build_number": 5000, "cpu_info": "Intel Xeon", "gpu_info": "",
           "backends": "CPU", "model_filename": "/m/smol.gguf", "model_type": "llama 135M Q4_1",
           "model_size": 96600000, "model_n_params": 134515008, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
           "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "flash_attn": False, "no_kv_offload": False,
           "use_mmap": True, "n_prompt": 0, "n_gen": 128, "n_depth": 0, "test_time": "2025-01-01T00:00:00Z",
           "avg_ns": 2000000000, "stddev_ns": 0, "avg_ts": 64.0, "stddev_ts": 0.0,
           "samples_ns": [2000000000, 2000000000], "samples_ts": [64.0, 64.0]}
    (row,) = from_llama_bench([rec])
    d = row.to_json()
    assert d["source"] == "llama-bench" and d["test"] == "tg128" and d["reps"] == 2
    assert d["tps_mean"] == pytest.approx(64.0) and d["artifact"]["name"] == "smol.gguf"
    assert d["config"]["n_gpu_layers"] == 99 and d["peak_rss_bytes"] is None
    with pytest.raises(InputError):
        from_llama_bench({"n_prompt": 0, "n_gen": 0})


def test_rows_whose_repetitions_spread_are_flagged():
    from edgekit.cli.profile_cmd import noisy_rows

    def rec(samples):
        return {"model_filename": "/m/smol.gguf", "n_prompt": 0, "n_gen": 32, "n_threads": 2, "n_batch": 512,
                "samples_ns": [32 / ts * 1e9 for ts in samples]}

    steady, stalled = from_llama_bench([rec([83.0, 84.0, 82.5]), rec([14.6, 0.4, 7.0])])
    assert noisy_rows([steady]) == [] and noisy_rows([steady, stalled]) == ["smol.gguf tg32"]


@needs_llama
def test_cli_json_csv_history_compare(tiny_ggufs, home):
    from edgekit.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["profile", str(tiny_ggufs["F16"]), "--tests", "pp8,tg4", "-r", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["status"] == "ok" and [r["test"] for r in data["rows"]] == ["pp8", "tg4"]
    res = runner.invoke(app, ["profile", str(tiny_ggufs["F16"]), "--tests", "pp8,tg4", "-r", "2", "--csv"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("artifact,test,")
    assert len(res.stdout.strip().splitlines()) == 3
    assert (home / "profile.sqlite").exists()
    res = runner.invoke(app, ["profile", "--compare", "--json"])
    assert res.exit_code == 0
    comp = json.loads(res.stdout)
    assert {c["test"] for c in comp} == {"pp8", "tg4"}
    assert all(len(c["runs"]) == 2 and c["change"] is not None for c in comp)
    res = runner.invoke(app, ["profile", "--compare"])
    assert res.exit_code == 0 and "tiny-F16" in res.stdout


def test_a_damaged_history_still_shows_what_was_measured(tiny_ggufs, home):
    from edgekit.cli.main import app

    home.mkdir(parents=True, exist_ok=True)
    (home / "profile.sqlite").write_bytes(b"garbage, not a database" * 100)
    runner = CliRunner()
    res = runner.invoke(app, ["profile", str(tiny_ggufs["F16"]), "--tests", "tg4", "-r", "1", "--csv"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == 2  # the row measured
    assert "not a readable profile history" in res.stderr and "not recorded" in res.stderr
    res = runner.invoke(app, ["profile", "--compare"])
    assert res.exit_code == 3 and "move it away" in res.output and "Traceback" not in res.output


def test_cli_bad_input(tmp_path, home):
    from edgekit.cli.main import app

    runner = CliRunner()
    for args in (["profile", str(tmp_path / "nope")], ["profile", str(tmp_path), "--tests", "zz9"], ["profile"],
                 ["profile", str(tmp_path), "--threads", "a,b"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "error:" in res.output and "Traceback" not in res.output


@needs_llama
def test_ctrl_c_keeps_marked_partial_results(tiny_ggufs, tmp_path):
    env = {**os.environ, "EDGEKIT_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "edgekit.cli.main", "profile", str(tiny_ggufs["F16"]), "--tests", "tg8,tg256",
           "-r", "100000", "--threads", "1", "--json"]  # more reps than any CPU runs in the 6 s before the Ctrl-C
    # Ctrl-C as a terminal delivers it: a harness started in the background (`cmd &` in a script) runs with
    # SIGINT ignored, and Python then never installs its KeyboardInterrupt handler in the child.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 130, errs.decode()
    data = json.loads(out)
    assert data["status"] == "interrupted"
    assert data["rows"] and data["rows"][-1]["status"] == "interrupted" and data["rows"][-1]["reps"] >= 1
    assert b"Traceback" not in errs


@needs_llama
def test_a_history_on_a_full_disk_prints_the_results_then_warns(tiny_ggufs, home, monkeypatch):
    import sqlite3

    from edgekit.cli.main import app
    from edgekit.runtime.history import History

    def full(self, *a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(History, "_save", full)
    res = CliRunner().invoke(app, ["profile", str(tiny_ggufs["F16"]), "--tests", "tg4", "-r", "1"])
    assert res.exit_code == 0, res.output
    assert "internal error" not in res.output and "Traceback" not in res.output
    table, warning = res.output.find("tg4"), res.output.find("warning: the disk filled up while writing")
    assert 0 <= table < warning, res.output  # what was measured first, then why it was not kept
    assert "not recorded" in res.output and "--no-history" in res.output
