"""A bounded fuzz of edgekit's readers (issue 13): a few hundred seeded mutations of a tiny GGUF's header, its
manifest, a checkpoint's config.json and an ONNX artifact, each run in-process through the CLI (or the SDK
for checkpoints) under a per-case time bound. Every case must be a result or a clean one-line refusal:
an EdgekitError, exit 2-6, never "internal error" or a traceback, never a hang.

bench/fuzz.py runs the same mutations longer, each in its own process, on the real model too.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekit import api
from edgekit.errors import EdgekitError
from edgekit.model import HFCheckpoint
from tests.edgekit.test_bad_input import run_cli
from tests.fuzzing import classify, gguf_layout, mutate_bytes, mutate_gguf, mutate_json

SEED = 13
CASE_SECONDS = 20.0  # far above a normal case (milliseconds; an accepted import, a second or two)


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so the CLI's error handler cannot turn it into a refusal."""


@contextlib.contextmanager
def time_bound(seconds: float, what: str) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise CaseTimeout(f"{what} ran past {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(args: list, what: str) -> str:
    with time_bound(CASE_SECONDS, what):
        code, output = run_cli(*args)
    outcome = classify(code, output)
    assert outcome in ("accepted", "refused"), f"{what}: exit {code}: {output}"
    return outcome


@pytest.fixture(scope="module")
def tiny_art(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "tiny-q8"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=8)).path


def test_fuzz_gguf_headers(tiny_art, tmp_path):
    src = tiny_art / "model.gguf" if (tiny_art / "model.gguf").exists() else next(tiny_art.glob("*.gguf"))
    spans, end = gguf_layout(src)
    original = src.read_bytes()
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    t0 = time.perf_counter()
    for i in range(250):
        data, mutation = mutate_gguf(original, spans, end, rng)
        bad = tmp_path / f"case{i}.gguf"
        bad.write_bytes(data)
        # An accepted import writes a whole checkpoint; a few of them show import is bounded too.
        args = ["import", bad, "-o", tmp_path / f"hf{i}"] if i % 80 == 0 else ["inspect", bad]
        outcomes[run_case(args, f"case {i} ({mutation}): {args[0]}")] += 1
        bad.unlink()
        shutil.rmtree(tmp_path / f"hf{i}", ignore_errors=True)
    # Both outcomes occur: the mutations reach the checks and do not all break the file outright.
    assert outcomes["refused"] > 50 and outcomes["accepted"] > 10, outcomes
    assert time.perf_counter() - t0 < 120


def test_fuzz_gguf_manifests(tiny_art, tmp_path):
    original = (tiny_art / "edgekit.json").read_bytes()
    rng = random.Random(SEED + 1)
    outcomes: Counter = Counter()
    for i in range(120):
        art = tmp_path / f"a{i}"
        art.mkdir()
        for f in tiny_art.iterdir():
            (art / f.name).hardlink_to(f)  # an artifact holds its own files: links out are refused
        (art / "edgekit.json").unlink()
        data, mutation = mutate_json(original, rng)
        (art / "edgekit.json").write_bytes(data)
        outcomes[run_case(["inspect", art], f"case {i} ({mutation})")] += 1
        shutil.rmtree(art)
    assert outcomes["refused"] > 10 and outcomes["accepted"] > 10, outcomes


def test_fuzz_checkpoint_configs(tiny_llama, tmp_path):
    """config.json mutations through the SDK's checkpoint reader and the GGUF key table conversion writes."""
    original = (tiny_llama / "config.json").read_bytes()
    m = tmp_path / "m"
    m.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "config.json":
            (m / f.name).symlink_to(f)
    rng = random.Random(SEED + 2)
    outcomes: Counter = Counter()
    for i in range(200):
        data, mutation = mutate_json(original, rng)
        (m / "config.json").write_bytes(data)
        with time_bound(CASE_SECONDS, f"case {i} ({mutation})"):
            try:
                ckpt = HFCheckpoint.open(m)
                ckpt.hparams.gguf_kv(ckpt.spec.gguf_arch)
                outcomes["accepted"] += 1
            except EdgekitError as exc:
                assert "\n" not in str(exc) and 2 <= exc.exit_code <= 6, (mutation, str(exc))
                outcomes["refused"] += 1
    assert outcomes["refused"] > 30 and outcomes["accepted"] > 30, outcomes


def test_fuzz_onnx_artifacts(tiny_llama, tmp_path_factory, tmp_path):
    src = api.convert(tiny_llama, "onnx", output=tmp_path_factory.mktemp("fuzz-onnx") / "o",
                      recipe=api.ConvertRecipe(bits=4)).path
    rng = random.Random(SEED + 3)
    outcomes: Counter = Counter()
    for i in range(90):
        name = ("model.onnx", "config.json", "edgekit.json")[i % 3]
        art = tmp_path / f"a{i}"
        art.mkdir()
        for f in src.iterdir():
            if f.name != name:
                (art / f.name).hardlink_to(f)
        original = (src / name).read_bytes()
        if name == "model.onnx":
            data, mutation = mutate_bytes(original, rng)
        else:
            data, mutation = mutate_json(original, rng)
        (art / name).write_bytes(data)
        outcomes[run_case(["inspect", art], f"case {i} ({name}: {mutation})")] += 1
        shutil.rmtree(art)
    assert outcomes["refused"] > 10 and outcomes["accepted"] > 10, outcomes
