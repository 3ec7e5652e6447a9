"""Progress in a log (stderr not a terminal) comes per phase, not per item: QA s55 saw a GGUF conversion print
one line per tensor ("encoding blk.N.xxx as T" was a new phase each time), which for a 70B model is thousands."""

from __future__ import annotations

import pytest

from edgekit.cli import ui


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    monkeypatch.delenv("EDGEKIT_PROGRESS", raising=False)
    return now


def test_a_gguf_conversion_prints_every_30_s_and_its_phase_changes(clock, capsys):
    names = [f"blk.{i}.{t}.weight" for i in range(30) for t in ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_down")]
    with ui.progress_bar() as progress:
        for i, name in enumerate(names):  # 150 tensors, one every second
            clock[0] = float(i)
            progress(f"encoding {name} as {'Q6_K' if 'ffn_down' in name else 'Q4_K'}", i, len(names))
        clock[0] = 150.0
        progress("done", len(names), len(names))
    lines = capsys.readouterr().err.splitlines()
    # after the quiet first 10 s, one line each 30 s (at 10, 40, 70, 100, 130 s), and the new phase at once
    assert [line.rsplit(", ", 1)[1] for line in lines] == ["10 s)", "40 s)", "70 s)", "100 s)", "130 s)", "150 s)"]
    assert lines[0] == "encoding blk.2.attn_q.weight as Q4_K (10/150, 10 s)" and lines[-1] == "done (150/150, 150 s)"


def test_layer_numbers_are_one_phase(clock, capsys):
    with ui.progress_bar() as progress:
        for i in range(60):  # a layer a second, two steps each
            for step in ("calibrating", "rounding"):
                clock[0] = i + (0.5 if step == "rounding" else 0.0)
                progress(f"layer {i + 1}/60: {step}", i, 60)
        clock[0] = 61.0
        progress("output head", 60, 60)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["layer 11/60: calibrating (10/60, 10 s)", "layer 41/60: calibrating (40/60, 40 s)",
                     "output head (60/60, 61 s)"]


@pytest.mark.parametrize(("a", "b"), [
    ("encoding blk.0.attn_q.weight as Q4_K", "encoding output.weight as Q6_K"),
    ("measuring sensitivity of blk.0.ffn_up.weight", "measuring sensitivity of token_embd.weight"),
    ("measuring the FFN widths of block 1/30", "measuring the FFN widths of block 29/30"),
    ("healing: refitting block 1/30", "healing: refitting block 2/30"),
    ("quantizing down_blocks.0.resnets.0.conv1", "quantizing conv_in"),
])
def test_descriptions_that_differ_in_the_item_are_one_phase(a, b):
    assert ui._phase(a) == ui._phase(b)


@pytest.mark.parametrize(("a", "b"), [
    ("encoding blk.0.attn_q.weight as Q4_K", "done"),
    ("layer 1/30: calibrating", "output head"),
    ("reading GGUF (dequantizing)", "writing safetensors"),
    ("down block 0", "up block 0"),
])
def test_a_new_phase_is_a_new_phase(a, b):
    assert ui._phase(a) != ui._phase(b)
