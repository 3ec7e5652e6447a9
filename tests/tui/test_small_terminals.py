"""QA on real terminal sizes (60x20, 80x24, 50 columns): nothing the user needs is cut, the chat log is one
Tab stop that scrolls from the input, the footer keeps F1, the quit question tells the truth per job."""

from __future__ import annotations

import shutil
import threading

import pytest
from rich.console import Console
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static
from textual.widgets._footer import FooterKey

from edgekit.tui.app import EdgekitApp
from edgekit.tui.chat_session import LiveStats
from edgekit.tui.screens.chat import NO_ARTIFACT, describe_stats
from edgekit.tui.screens.dialogs import Confirm, Conversations, HelpScreen
from edgekit.tui.widgets.chat import ChatMessage
from tests.tui.conftest import wait_for

pytestmark = pytest.mark.anyio

LONG = "tiny-q4-verylongmodelnameverylongmodelnameverylongmodelnamev"  # 60 characters, as in the QA library


def _footer_keys(app: EdgekitApp) -> list[str]:
    """The footer keys drawn whole inside the window."""
    keys = list(app.screen.query_one(Footer).query(FooterKey))
    return [k.key for k in keys if k.region.width > 0 and k.region.right <= app.size.width]


def _fits(widget) -> bool:
    """All of a one-paragraph text shows: its length fits the lines the widget has."""
    text = str(widget.render()) if isinstance(widget, Static) else widget.placeholder
    return len(text) <= widget.content_region.width * widget.content_region.height


# -- 1. F1 help -----------------------------------------------------------------------------------------

async def test_the_help_never_cuts_a_key_at_60_columns(tmp_path):
    from edgekit.tui.screens.dialogs import HELP_KEYS, help_table

    app = EdgekitApp(folder=tmp_path, start="artifacts")
    async with app.run_test(size=(60, 20)) as pilot:
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="the help")
        await pilot.pause()
        keys = app.screen.query_one("#help-keys", Static)
        width = keys.content_region.width
        assert 30 <= width <= 48  # the dialog's room at 60 columns
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(help_table())
        drawn = console.export_text()
        assert "…" not in drawn  # nothing truncated: the "where" and "does" columns wrap instead
        lines = drawn.splitlines()
        for key, _, _ in HELP_KEYS:
            assert any(line.lstrip().startswith(key) for line in lines), key


# -- 2. the chat log: one Tab stop, scrolled from the input, visibly focused ----------------------------

async def _chat_with_messages(pilot, app: EdgekitApp, n: int = 12):
    chat = app.get_screen("chat")
    log = chat.query_one("#chat-log", VerticalScroll)
    await log.mount_all([ChatMessage("user" if i % 2 == 0 else "assistant", f"message {i}\n\n" + "line\n\n" * 4)
                         for i in range(n)])
    inp = chat.query_one("#chat-input", Input)
    inp.disabled = False
    inp.focus()
    await wait_for(pilot, lambda: log.max_scroll_y > 10, what="a log taller than the window")
    log.scroll_end(animate=False)
    await pilot.pause()
    return chat, log, inp


async def test_the_chat_log_is_one_tab_stop_and_scrolls_from_the_input(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        chat, log, inp = await _chat_with_messages(pilot, app)
        assert not chat.query_one("#chat-settings").display
        assert not any(m.can_focus for m in chat.query(ChatMessage))
        await pilot.press("tab")
        assert app.focused is log
        assert log.styles.outline_left[0] != ""  # the focused log shows a bar down its left edge
        await pilot.press("tab")
        assert app.focused is inp  # the messages are no stops of their own
        assert log.styles.outline_left[0] == ""

        end = log.scroll_y
        await pilot.press("pageup")  # from the input
        await wait_for(pilot, lambda: log.scroll_y < end, timeout=5, what="PageUp to scroll the log")
        assert app.focused is inp
        await pilot.press("ctrl+home")
        await wait_for(pilot, lambda: log.scroll_y == 0, timeout=5, what="Ctrl+Home to reach the start")
        await pilot.press("pagedown")
        await wait_for(pilot, lambda: log.scroll_y > 0, timeout=5, what="PageDown to scroll back")
        await pilot.press("ctrl+end")
        await wait_for(pilot, lambda: log.scroll_y == log.max_scroll_y, timeout=5, what="Ctrl+End")


# -- 3 and 8. the status line and the title wrap, long names shorten in the middle ------------------------

async def test_the_chat_status_and_title_wrap_instead_of_losing_their_end(tmp_path):
    from edgekit.tui.screens.chat import chat_title

    app = EdgekitApp(folder=tmp_path, start="chat")
    async with app.run_test(size=(60, 20)) as pilot:
        chat = app.get_screen("chat")
        title = chat.query_one("#chat-title", Static)
        await pilot.pause()
        assert _fits(title), title.region  # 8: "No artifact open..." whole

        live = LiveStats(prompt_tokens=17, generated_tokens=256, tokens_per_second=2506.7, n_ctx=2048,
                         stop_reason="length")
        chat._set_status(describe_stats(live))
        title.update(chat_title(LONG, "gguf", "the file's own"))
        await pilot.pause()
        stats = chat.query_one("#chat-stats", Static)
        assert stats.region.height >= 2 and _fits(stats)  # "256 tokens · stop: length" on screen
        assert "stop: length" in str(stats.render())
        assert title.region.height == 2 and _fits(title)
        shown = str(title.render())
        assert "(gguf)" in shown and LONG[:10] in shown and LONG[-6:] in shown and "…" in shown
        assert chat_title("tiny-q4", "gguf") == "tiny-q4 (gguf)"  # short names whole


async def test_the_no_artifact_title_fits_80_columns(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="chat")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        title = app.screen.query_one("#chat-title", Static)
        assert str(title.render()) == NO_ARTIFACT and len(NO_ARTIFACT) <= title.content_region.width


# -- 5. a long artifact name leaves the other columns on screen ------------------------------------------

async def test_a_long_name_does_not_push_the_other_columns_off(models):
    shutil.copytree(models / "tiny-q8", models / LONG)
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.get_screen("artifacts")
        await wait_for(pilot, lambda: len(screen.rows) == 3, what="the three artifacts")
        await pilot.pause()
        table = screen.query_one(DataTable)
        widths = [c.width for c in table.ordered_columns]
        assert widths[0] <= 32
        assert sum(w + 2 for w in widths[:5]) <= 80  # name, format, method, quant, size all on screen
        index = next(i for i, r in enumerate(screen.rows) if r.name == LONG)
        table.move_cursor(row=index)
        await pilot.pause()
        cell = str(table.get_row_at(index)[0])
        assert "…" in cell and cell.startswith(LONG[:10]) and cell.endswith(LONG[-6:])
        status = str(screen.query_one("#artifacts-status", Static).render())
        assert LONG in status and "3 artifacts under models" in status  # the whole name, under the table
        table.move_cursor(row=next(i for i, r in enumerate(screen.rows) if r.name != LONG))
        await pilot.pause()
        assert LONG not in str(screen.query_one("#artifacts-status", Static).render())


# -- 6 and 11. the footer: F1 stays below 52 columns; u and Ctrl+L where there is room ---------------------

@pytest.mark.parametrize("screen", ["devices", "chat", "artifacts", "convert", "profile"])
async def test_the_footer_keeps_f1_at_50_columns(screen, tmp_path):
    app = EdgekitApp(folder=tmp_path, start=screen)
    async with app.run_test(size=(50, 20)) as pilot:
        await wait_for(pilot, lambda: "f1" in _footer_keys(app), timeout=10, what="f1 drawn whole in the footer")
        assert len(_footer_keys(app)) >= 3  # the screen's first keys stay too


async def test_the_compact_footer_shows_push_and_clear_where_there_is_room(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="artifacts")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: "u" in _footer_keys(app), timeout=10, what="u Push in the footer")
        assert "f1" in _footer_keys(app)
        await app.action_show("chat")
        await wait_for(pilot, lambda: "ctrl+l" in _footer_keys(app), timeout=10, what="^l Clear in the footer")
        assert "f1" in _footer_keys(app)
        await pilot.resize_terminal(120, 40)  # the full footer: the screen keys, no room for the spare ones
        await wait_for(pilot, lambda: "f3" in _footer_keys(app), timeout=10, what="the screen keys")
        assert "ctrl+l" not in _footer_keys(app)


# -- 7. placeholders and labels whole at 80 columns -------------------------------------------------------

async def test_placeholders_fit_at_80_columns(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="convert")
    async with app.run_test(size=(80, 24)) as pilot:
        for screen in ("convert", "devices"):
            await app.action_show(screen)
            await pilot.pause()
            boxes = [b for b in app.screen.query(Input) if b.placeholder]
            assert len(boxes) >= 2
            for box in boxes:
                assert len(box.placeholder) <= box.content_region.width, (box.id, box.placeholder)


async def test_the_conversations_label_wraps_at_60_columns(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="artifacts")
    async with app.run_test(size=(60, 20)) as pilot:
        await app.push_screen(Conversations([]))
        await pilot.pause()
        label = app.screen.query_one("#conversations").children[0]
        assert "Esc closes" in str(label.render()) and _fits(label)


# -- 9. the quit question says what quitting does to the job under way -----------------------------------

async def test_the_quit_question_during_a_profile_says_what_happens_to_its_rows(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="profile")
    async with app.run_test(size=(80, 24)) as pilot:
        profile = app.get_screen("profile")
        profile.cancel_event = threading.Event()  # a profile under way, as far as quitting goes
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the quit question")
        question = app.screen.question
        assert question.startswith("A profile is under way")
        assert "removed" not in question and "lost" not in question
        assert "rows measured so far are kept in the profile history" in question
        await pilot.press("n")
        await pilot.pause()
        profile.cancel_event = None
        assert app.is_running


# -- 10. the settings pane makes room on a narrow window ----------------------------------------------------

async def test_the_settings_pane_gives_way_on_a_narrow_window(tmp_path):
    app = EdgekitApp(folder=tmp_path, start="chat")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = app.get_screen("chat")
        pane = chat.query_one("#chat-settings")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert pane.display and pane.region.width == 34
        await pilot.resize_terminal(60, 20)
        await pilot.pause()
        assert not pane.display  # the chat keeps the whole width
        await pilot.press("ctrl+s")  # asked for at 60 columns: it shows, at 40% of the width
        await pilot.pause()
        assert pane.display and pane.region.width <= 24
        assert chat.query_one("#chat-pane").region.width >= 36
