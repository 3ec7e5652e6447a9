"""Snapshot tests (pytest-textual-snapshot) of the main screens at 80x24 and a larger size.

Everything on screen is deterministic: relative folder names (cwd is the test's tmp folder), tiny
artifacts built from a seeded model, a chat history written before the app starts, no timings.
Update after an intended change with: pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import importlib.util

import pytest

from edgekit.tui.app import EdgekitApp
from edgekit.tui.chat_session import ChatSession
from tests.tui.conftest import wait_for

if importlib.util.find_spec("pytest_textual_snapshot") is None:
    pytest.skip("pytest-textual-snapshot is not installed (bash .ci/setup.sh)", allow_module_level=True)

SIZES = [(80, 24), (120, 40)]
HISTORY = [
    {"role": "user", "content": "How do I reverse a list in Python?"},
    {"role": "assistant", "content": "Use slicing:\n\n```python\nitems[::-1]\n```\n\nor `items.reverse()` in place."},
]


async def _table_settled(pilot, table) -> None:
    """A DataTable sizes its columns on the idle after rows arrive; the snapshot waits for that."""
    await wait_for(pilot, lambda: table.row_count > 0 and not table._require_update_dimensions
                   and not table._new_rows, what="the table to lay out")
    await pilot.pause()


async def _artifacts_ready(pilot) -> None:
    screen = pilot.app.get_screen("artifacts")
    await wait_for(pilot, lambda: len(screen.rows) == 2, what="the artifacts list")
    await _table_settled(pilot, screen.query_one("#artifacts-table"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_artifacts_screen(snap_compare, models, size):
    assert snap_compare(EdgekitApp(folder="models"), terminal_size=size, run_before=_artifacts_ready)


@pytest.mark.llamacpp
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_screen(snap_compare, models, size):
    session = ChatSession.open("models/tiny-q8")
    session.messages = list(HISTORY)
    session.save()

    async def ready(pilot) -> None:
        chat = pilot.app.get_screen("chat")
        await wait_for(pilot, lambda: chat.session is not None and chat.session.backend is not None
                       and not chat.busy, what="the model to load")
        await pilot.pause()

    app = EdgekitApp(folder="models", chat="models/tiny-q8", backend_options={"n_ctx": 2048, "n_threads": 2})
    assert snap_compare(app, terminal_size=size, run_before=ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_convert_screen(snap_compare, models, size):
    assert snap_compare(EdgekitApp(folder="models", start="convert"), terminal_size=size)


def test_inspect_dialog(snap_compare, models, monkeypatch):
    from edgekit.runtime import hostinfo

    # "at peak to run" counts the worker's baseline, measured per host: a fixed one keeps the picture fixed
    monkeypatch.setattr(hostinfo, "baseline_rss", lambda refresh=False, strict=True: hostinfo.TYPICAL_BASELINE_RSS)

    async def inspect(pilot) -> None:
        await _artifacts_ready(pilot)
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: bool(pilot.app.screen.query("#inspect-tensors")), what="the inspect view")
        await _table_settled(pilot, pilot.app.screen.query_one("#inspect-tensors"))
        # under load the dialog's other widgets can still be rendering: let every worker and refresh finish
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.2)
        await pilot.pause()

    assert snap_compare(EdgekitApp(folder="models"), terminal_size=(100, 30), run_before=inspect)


def test_error_panel_and_help(snap_compare, models):
    async def error(pilot) -> None:
        await _artifacts_ready(pilot)
        pilot.app.show_error("llama.cpp crashed (SIGSEGV) while generating text (model.gguf): rebuild it with "
                             "`bash .ci/setup.sh --rebuild-llama`", "The runtime crashed")
        await pilot.pause()

    assert snap_compare(EdgekitApp(folder="models"), terminal_size=(80, 24), run_before=error)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_profile_screen(snap_compare, models, size):
    assert snap_compare(EdgekitApp(folder="models", start="profile"), terminal_size=size)


def test_help_screen(snap_compare, models):
    assert snap_compare(EdgekitApp(folder="models"), terminal_size=(80, 24), press=["f1"],
                        run_before=_artifacts_ready)
