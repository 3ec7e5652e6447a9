"""The profile screen driven by the pilot: a short real profile of two tiny artifacts (issue 5's profiler),
comparison with the earlier run, cancel, export to JSON and PNG."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgekit.tui.app import EdgekitApp
from tests.tui.conftest import wait_for

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.llamacpp,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"),
]
pytest.importorskip("edgekit.runtime.profile")


async def _profile(pilot, app, targets: str, tests: str, reps: int):
    await pilot.press("f5")
    screen = app.get_screen("profile")
    screen.query_one("#pf-targets").value = targets
    screen.query_one("#pf-tests").value = tests
    screen.query_one("#pf-reps").value = str(reps)
    screen.query_one("#pf-threads").value = "2"
    screen.outcome = ""
    await pilot.press("ctrl+r")
    return screen


async def test_short_profile_fills_table_charts_history_and_exports(models, tmp_path):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _profile(pilot, app, "models/tiny-q8, models/tiny-f16", "pp32,tg16", 2)
        await wait_for(pilot, lambda: screen.outcome != "", timeout=120, what="the profile")
        assert screen.outcome == "ok", screen.query_one("#pf-status").render()
        assert [(r["artifact"]["name"], r["test"]) for r in screen.rows] == [
            ("tiny-q8", "pp32"), ("tiny-q8", "tg16"), ("tiny-f16", "pp32"), ("tiny-f16", "tg16")]
        assert all(r["status"] == "ok" and r["reps"] == 2 and r["tps_mean"] > 0 for r in screen.rows)
        table = screen.query_one("#pf-table")
        assert table.row_count == 4 and table.get_row_at(0)[8] == "-"  # nothing earlier to compare with
        plot = screen.query_one("#pf-tps")
        assert "tokens/s" in str(plot.plt.build())  # the chart was drawn with the rows
        # a second run compares with the first (kept in the profiler's history)
        screen = await _profile(pilot, app, "models/tiny-q8", "tg16", 2)
        await wait_for(pilot, lambda: screen.outcome != "", timeout=120, what="the second profile")
        assert screen.query_one("#pf-table").get_row_at(0)[8].endswith("%")
        for name in ("runs.json", "runs.png"):
            screen.query_one("#pf-export").value = str(tmp_path / name)
            await pilot.press("ctrl+o")
        data = json.loads((tmp_path / "runs.json").read_text())
        assert data["rows"][0]["test"] == "tg16" and data["rows"][0]["artifact"]["name"] == "tiny-q8"
        assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"
        table = screen.query_one("#pf-table")
        assert screen.query_one("#pf-charts").display and table.size.height >= 8
        await pilot.resize_terminal(80, 24)  # the charts give their room to the rows
        await pilot.pause()
        assert not screen.query_one("#pf-charts").display and table.size.height >= 5


async def test_cancel_keeps_the_finished_rows(models):
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await _profile(pilot, app, "models/tiny-f16", "pp16,tg2000", 50)
        await wait_for(pilot, lambda: len(screen.rows) >= 1, timeout=120, what="the first row")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen.outcome != "", timeout=60, what="the profile to stop")
        assert screen.outcome == "interrupted"
        assert screen.rows[0]["status"] == "ok" and screen.rows[0]["test"] == "pp16"
        assert "stopped" in str(screen.query_one("#pf-status").render())


async def test_missing_artifact_shows_the_error_panel(models):
    from edgekit.tui.screens.dialogs import ErrorPanel

    app = EdgekitApp(folder="models")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _profile(pilot, app, "models/nope", "tg4", 1)
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorPanel), what="the error panel")
        assert "does not exist" in app.screen.message
        await pilot.press("escape")
        assert screen.outcome == "failed" and screen.cancel_event is None
        bar = screen.query_one("#pf-progress")
        assert (bar.total, bar.progress) == (1, 0)  # not left spinning as if the job still ran


async def test_offload_field_reaches_the_profiler(models):
    """The offload choice (prefilled from `edgekit tui --offload auto`) becomes the profile's offload_auto."""
    app = EdgekitApp(folder="models", backend_options={"offload": "auto"})
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f5")
        screen = app.get_screen("profile")
        screen.query_one("#pf-targets").value = str(models / "tiny-q8")
        assert screen.query_one("#pf-offload").value == "auto"
        _, cfg = screen.config()
        assert cfg.offload_auto is True
        screen.query_one("#pf-offload").value = "none"
        _, cfg = screen.config()
        assert cfg.offload_auto is False


def test_one_timing_has_no_spread():
    from edgekit.tui.screens.profile import row_cells

    row = {"artifact": {"name": "a"}, "test": "tg16", "config": {"n_threads": 1}, "tps_mean": 10.0,
           "tps_stddev": 0.0, "reps": 1, "status": "ok"}
    assert row_cells(row, None)[4] == "-"
    assert row_cells({**row, "reps": 3, "tps_stddev": 0.25}, None)[4] == "0.2"
