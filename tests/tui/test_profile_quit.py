"""Quitting while a profile runs keeps its rows (QA leftover): the test under way stops as Esc stops it, its
model's worker process is closed, the rows are saved in the profile history as ``edgekit profile`` saves them on
Ctrl-C (the run marked 'interrupted'), and a line on the terminal says so once the screen is gone."""

from __future__ import annotations

import importlib.util
import sqlite3
import threading

import pytest

from edgekit.tui.app import EdgekitApp
from edgekit.tui.screens.dialogs import Confirm
from tests.tui.conftest import wait_for

pytestmark = pytest.mark.anyio


def _history(home) -> tuple[list[str], list[tuple[str, str]]]:
    """The statuses of the runs in the profile history, and the (test, status) of their rows."""
    db = sqlite3.connect(home / "profile.sqlite")
    try:
        return ([s for (s,) in db.execute("SELECT status FROM runs ORDER BY id")],
                list(db.execute("SELECT test, status FROM rows ORDER BY id")))
    finally:
        db.close()


def _workers() -> list[int]:
    """The llama.cpp worker processes serving a model that this process started and has not reaped (not the
    short ``--devices`` probe, which the devices screen runs in the background on a fresh home and which may
    still be starting on a loaded machine when the app quits)."""
    import psutil

    from edgekit.runtime.processes import WORKER_SCRIPT

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
            if any(WORKER_SCRIPT in part for part in cmd) and "--devices" not in cmd:
                found.append(child.pid)
        except psutil.Error:  # ended while being looked at
            pass
    return found


@pytest.mark.llamacpp
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
async def test_quitting_during_a_profile_keeps_its_rows_and_leaves_no_worker(models, edgekit_home):
    pytest.importorskip("edgekit.runtime.profile")
    from tests.tui.test_profile_screen import _profile

    before = set(_workers())  # another test's model kept open by a fixture is not this test's
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 30)) as pilot:
        # pp16 ends in a moment; tg2000 x 50 would take minutes: the quit lands while it runs
        screen = await _profile(pilot, app, "models/tiny-f16", "pp16,tg2000", 50)
        await wait_for(pilot, lambda: len(screen.rows) >= 1, timeout=120, what="the first row")
        assert set(_workers()) - before, "the profile's model runs in a worker process"
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the quit question")
        question = app.screen.question
        await pilot.press("y")
        await wait_for(pilot, lambda: not app.is_running, timeout=60, what="the app to quit")
    runs, rows = _history(edgekit_home)
    assert runs == ["interrupted"]  # one run, as the CLI records a Ctrl-C'd one
    assert rows[0] == ("pp16", "ok")
    assert rows[1:] in ([], [("tg2000", "interrupted")])  # tg2000 kept only if a repetition of it was timed
    assert len(rows) == len(screen.rows)
    assert set(_workers()) - before == set()  # the running test was stopped and its worker closed, not orphaned
    assert screen.outcome == "interrupted"
    said = app.return_value  # what `edgekit tui` prints once the screen is gone
    assert f"its {len(rows)} row(s) are kept in the profile history, the run marked 'interrupted'" in said, said
    assert "rows measured so far are kept in the profile history" in question  # it said so before


async def test_quit_waits_for_the_profile_to_stop_and_a_second_ctrl_q_does_not_ask_again(tmp_path):
    """No model needed: a profile under way as far as the app can tell, whose worker ends when the test says."""
    app = EdgekitApp(folder=tmp_path, start="profile")
    async with app.run_test(size=(80, 24)) as pilot:
        profile = app.get_screen("profile")
        cancel = profile.cancel_event = threading.Event()
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the quit question")
        await pilot.press("y")
        await pilot.pause()
        # the profile is asked to stop (as Esc asks) and the app waits for it
        assert cancel.is_set() and app.is_running and profile.quitting
        assert "stopping to quit" in str(profile.query_one("#pf-status").render())
        await pilot.press("ctrl+q")  # again, while it stops: no second question, still waiting
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, Confirm)
        profile.rows = [{"artifact": {"name": "a"}, "test": "pp16"}]
        profile._finished("interrupted", None)  # what the worker thread reports once its rows are saved
        await wait_for(pilot, lambda: not app.is_running, what="the app to quit")
    assert app.return_value.startswith("the profile stopped; its 1 row(s) are kept in the profile history")


async def test_quit_with_no_profile_running_exits_at_once(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="profile")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="the app to quit")
    assert app.return_value is None  # nothing stopped: `edgekit tui` has nothing to say
