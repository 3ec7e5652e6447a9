"""Chat: stream replies from an artifact in a worker thread; Esc stops, history is kept per artifact."""

from __future__ import annotations

import threading
from pathlib import Path

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Header, Input, Label, Static, TextArea

from edgekit.errors import EdgekitError
from edgekit.library import forget_chat
from edgekit.runtime.base import SamplingConfig
from edgekit.tui.catalog import middle_ellipsis
from edgekit.tui.chat_session import ChatSession, LiveStats
from edgekit.tui.screens.dialogs import Conversations
from edgekit.tui.widgets.chat import ChatMessage
from edgekit.tui.widgets.chat_input import ChatInput
from edgekit.tui.widgets.footer import KeysFooter

# Sampling fields shown in the settings pane: (SamplingConfig field, label, Input type).
SAMPLING_FIELDS = (
    ("temperature", "temperature (0 = greedy)", "number"),
    ("top_p", "top-p", "number"),
    ("top_k", "top-k", "integer"),
    ("min_p", "min-p", "number"),
    ("repeat_penalty", "repeat penalty", "number"),
    ("max_tokens", "max new tokens", "integer"),
    ("seed", "seed", "integer"),
)
NO_ARTIFACT = "No artifact open: pick one on Artifacts (F3, then c), or run edgekit chat PATH"
#: the settings pane shows when the window is at least this wide (the chat keeps room beside it)
SETTINGS_MIN_WIDTH = 110
#: below this width the settings pane hides as the window shrinks, even after Ctrl+S showed it
SETTINGS_HIDE_WIDTH = 70
#: the longest artifact name the title shows whole (longer ones keep their start and end)
TITLE_NAME_WIDTH = 40


def chat_title(name: str, fmt: str, template: str = "") -> str:
    """The title line: the artifact (a long name shortened in its middle), its format, its chat template."""
    title = f"{middle_ellipsis(name, TITLE_NAME_WIDTH)} ({fmt})"
    return f"{title} · chat template: {template}" if template else title


def describe_stats(live: LiveStats, state: str = "") -> str:
    """The status line: tokens/s, context use, tokens generated and why it stopped."""
    parts = [f"{live.tokens_per_second:.1f} tok/s"]
    if live.kv_window:
        parts.append(f"KV window {live.kv_cells}/{live.kv_window} ({live.kv_evicted:,} evicted)")
    elif live.n_ctx:
        parts.append(f"ctx {live.context_used}/{live.n_ctx} ({100 * live.context_used / live.n_ctx:.0f}%)")
    if live.acceptance is not None:
        parts.append(f"draft {100 * live.acceptance:.0f}% of {live.drafted} accepted")
    parts.append(f"{live.generated_tokens} tokens")
    if live.stop_reason:
        parts.append(f"stop: {live.stop_reason}")
    return " · ".join(parts + ([state] if state else []))


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+y", "copy_reply", "Copy reply"),
        Binding("ctrl+s", "toggle_settings", "Settings"),
        Binding("ctrl+o", "conversations", "Chats"),
        # in F1's help and the palette; the footer shows it only where it has room (not at 120 columns beside
        # the screen keys: widgets/footer.py SPARE_ACTIONS). Ctrl+O's new conversation keeps the old one.
        Binding("ctrl+l", "clear_history", "Clear", show=False),
        # the conversation scrolls from the input (the log is one Tab stop; focused, it scrolls with its own keys)
        Binding("pageup", "scroll_log('page_up')", "Scroll up", show=False),
        Binding("pagedown", "scroll_log('page_down')", "Scroll down", show=False),
        Binding("ctrl+home", "scroll_log('home')", "Start of the chat", show=False),
        Binding("ctrl+end", "scroll_log('end')", "End of the chat", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="chat")
        self.session: ChatSession | None = None
        self.busy = False
        self._cancel = threading.Event()
        self._reply: ChatMessage | None = None
        #: the message being answered: its widget and text (given back to the input if the turn fails)
        self._asked: tuple[ChatMessage, str, int] | None = None
        #: the settings pane as Ctrl+S left it (None: shown when the window is wide enough)
        self._settings_shown: bool | None = None
        self.last_stats: LiveStats | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="chat-main"):
            with Vertical(id="chat-pane"):
                yield Static(NO_ARTIFACT, id="chat-title", markup=False)
                yield VerticalScroll(id="chat-log")
                yield Static("", id="chat-stats", markup=False)
                yield ChatInput(placeholder="Type a message, Enter to send", id="chat-input", disabled=True)
            with VerticalScroll(id="chat-settings"):
                yield Label("system prompt")
                yield TextArea("", id="system-prompt", soft_wrap=True, show_line_numbers=False,
                               placeholder="empty: the model's own")
                defaults = SamplingConfig()
                for name, label, kind in SAMPLING_FIELDS:
                    yield Label(label)
                    yield Input(str(getattr(defaults, name)), id=f"s-{name}", type=kind, classes="sampling")
        yield KeysFooter()

    def on_mount(self) -> None:
        self._fit_settings(self.app.size.width)

    def on_resize(self, event: events.Resize) -> None:
        self._fit_settings(event.size.width)

    def _fit_settings(self, width: int) -> None:
        """The settings pane shows at 110 columns or more, as the window changes, until Ctrl+S decides; a window
        narrowed below 70 columns hides it all the same (the chat would be left a sliver), and the pane
        follows the width again from there. Ctrl+S still shows it at any width (then 40% of it, app.tcss)."""
        pane = self.query_one("#chat-settings")
        if self._settings_shown and width < SETTINGS_HIDE_WIDTH:
            self._settings_shown = None
        if self._settings_shown is None:
            pane.display = width >= SETTINGS_MIN_WIDTH

    # -- opening an artifact ------------------------------------------------------------------

    async def open_artifact(self, path: str | Path) -> None:
        """Show the conversation with ``path`` and start loading its model in the background."""
        self.action_stop()
        old, self.session = self.session, None
        if old is not None:
            self._close_session(old)
        try:
            session = ChatSession.open(path, **getattr(self.app, "backend_options", {}))
        except EdgekitError as exc:
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        self.session = session
        self.query_one("#chat-title", Static).update(chat_title(session.artifact.name, session.artifact.format))
        await self._show_conversation(session)
        self._set_status("loading the model..." if session.backend is None else "ready")
        self.busy = True
        self._load(session)

    async def _show_conversation(self, session: ChatSession) -> None:
        """The log and the system prompt of ``session``'s conversation."""
        self.query_one("#system-prompt", TextArea).text = session.system
        log = self.query_one("#chat-log", VerticalScroll)
        await log.remove_children()
        await log.mount_all([ChatMessage(m["role"], m["content"]) for m in session.messages])
        # Markdown messages take their height over later refreshes: scrolling to the end now would reach the
        # end of a log still empty (the chat reopened at its top); anchored, it follows them down.
        log.anchor()
        log.scroll_end(animate=False)

    @work(thread=True, group="chat-load")
    def _load(self, session: ChatSession) -> None:
        try:
            with session._lock:
                session.ensure_loaded()
        except BaseException as exc:  # noqa: BLE001 - shown in the error panel
            self.app.call_from_thread(self._loaded, session, exc)
            return
        self.app.call_from_thread(self._loaded, session, None)

    def _loaded(self, session: ChatSession, exc: BaseException | None) -> None:
        if session is not self.session:
            return
        self.busy = False
        inp = self.query_one("#chat-input", Input)
        if exc is not None:
            self._set_status("the model did not load; fix the problem and open it again")
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        offload = f" · offload: {session.offload_reason}" if session.offload_reason else ""
        opts = session.options
        if opts.get("kv_window"):
            room = f"KV window {opts['kv_window']} tokens ({opts.get('kv_sinks', 4)} sinks): the chat never runs out"
        else:
            room = f"context {session.n_ctx} tokens"
        spec = ""
        if opts.get("draft"):
            spec = f" · drafting with {Path(str(opts['draft'])).name}"
        elif opts.get("speculative"):
            spec = f" · {opts['speculative']} drafting"
        if opts.get("experts") is not None:
            spec += f" · experts {opts['experts']} a token"
        self._set_status(f"ready · {room}{spec}{offload}")
        inp.disabled = False
        inp.focus()

    async def forget(self, path: Path) -> None:
        """``path`` (an artifact folder or model file) was deleted: its history goes, and the chat with it
        closes if it is the one open (its model stays mapped until closed, so it would go on answering)."""
        session = self.session
        if session is not None and Path(path).resolve() in (session.artifact.path.resolve(),
                                                            session.key_path.resolve()):
            session.keep_history = False
        else:
            session = None
        forget_chat(path)
        if session is None:
            return
        self.action_stop()
        self.session = None
        self.busy = False
        self._close_session(session)
        await self.query_one("#chat-log", VerticalScroll).remove_children()
        self.query_one("#chat-title", Static).update(NO_ARTIFACT)
        self.query_one("#chat-input", Input).disabled = True
        self._set_status(f"{session.artifact.name} was deleted")

    @work(thread=True, group="chat-close")
    def _close_session(self, session: ChatSession) -> None:
        session.close()

    # -- sending and streaming ----------------------------------------------------------------

    def sampling(self) -> SamplingConfig:
        values: dict[str, float | int] = {}
        for name, label, kind in SAMPLING_FIELDS:
            raw = self.query_one(f"#s-{name}", Input).value.strip()
            try:
                values[name] = int(raw) if kind == "integer" else float(raw)
            except ValueError:
                from edgekit.errors import InputError

                raise InputError(f"{label} must be a number, got {raw!r}") from None
        return SamplingConfig(**values)  # type: ignore[arg-type]

    @on(Input.Submitted, "#chat-input")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.session is None or self.busy:
            return
        try:
            sampling = self.sampling()
        except EdgekitError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return
        self.session.system = self.query_one("#system-prompt", TextArea).text
        event.input.value = ""
        event.input.disabled = True
        log = self.query_one("#chat-log", VerticalScroll)
        self._reply = ChatMessage("assistant")
        asked = ChatMessage("user", text)
        self._asked = (asked, text, len(self.session.messages))
        await log.mount_all([asked, self._reply])
        log.scroll_end(animate=False)
        self.busy = True
        self._cancel.clear()
        self._set_status("generating... (Esc stops)")
        self._generate(self.session, text, sampling)

    @work(thread=True, group="chat")
    def _generate(self, session: ChatSession, text: str, sampling: SamplingConfig) -> None:
        def on_text(chunk: str, live: LiveStats) -> None:
            self.app.call_from_thread(self._on_chunk, session, chunk, live)

        try:
            live = session.reply(text, sampling, self._cancel, on_text)
        except BaseException as exc:  # noqa: BLE001 - shown in the error panel, the app goes on
            if self.app.is_running:
                self.app.call_from_thread(self._on_done, session, None, exc)
            return
        if self.app.is_running:
            self.app.call_from_thread(self._on_done, session, live, None)

    async def _on_chunk(self, session: ChatSession, chunk: str, live: LiveStats) -> None:
        if session is not self.session or self._reply is None:
            return
        await self._reply.append(chunk)
        self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)
        self._set_status(describe_stats(live, "stopping..." if self._cancel.is_set() else "generating... (Esc stops)"))

    async def _on_done(self, session: ChatSession, live: LiveStats | None, exc: BaseException | None) -> None:
        if session is not self.session:
            return
        self.busy = False
        inp = self.query_one("#chat-input", Input)
        inp.disabled = False
        inp.focus()
        reply, self._reply = self._reply, None
        asked, self._asked = self._asked, None
        self._tell_history(session)
        if exc is not None:
            if asked is not None and len(session.messages) == asked[2]:
                # Nothing came back and the session forgot the message: so does the log, and the text
                # returns to the input to be shortened or sent again.
                if reply is not None:
                    await reply.remove()
                await asked[0].remove()
                if not inp.value:
                    inp.value = asked[1]
                    inp.cursor_position = len(asked[1])
                self._set_status("not sent: the message is back in the input (the model reloads if it crashed)")
            else:
                if reply is not None:
                    reply.mark("failed")
                self._set_status("the generation failed; send again to retry (the model reloads if it crashed)")
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        assert live is not None
        self.last_stats = live
        if reply is not None and live.stop_reason == "cancelled":
            reply.mark("stopped")
        if live.template:
            art = session.artifact
            template = "the file's own" if live.template == "gguf" else live.template
            self.query_one("#chat-title", Static).update(chat_title(art.name, art.format, template))
        self._set_status(describe_stats(live))

    def _set_status(self, text: str) -> None:
        self.query_one("#chat-stats", Static).update(text)

    def _tell_history(self, session: ChatSession) -> None:
        """Say once that the history is not being saved (a full or read-only home); the chat goes on."""
        if notice := session.history_notice():
            self.notify(notice, severity="warning", markup=False, timeout=10)

    # -- actions ------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.busy and self._reply is not None:
            self._cancel.set()
            self._set_status("stopping...")

    def action_copy_reply(self) -> None:
        replies = [m for m in (self.session.messages if self.session else []) if m["role"] == "assistant"]
        if not replies:
            self.notify("no reply to copy yet", severity="warning")
            return
        self.app.copy_to_clipboard(replies[-1]["content"])
        self.notify(f"copied the last reply ({len(replies[-1]['content'])} characters)")

    def action_scroll_log(self, where: str) -> None:
        """PageUp/PageDown, Ctrl+Home/Ctrl+End: scroll the conversation, wherever the focus is."""
        log = self.query_one("#chat-log", VerticalScroll)
        if where == "page_up":
            log.scroll_page_up(animate=False)
        elif where == "page_down":
            log.scroll_page_down(animate=False)
        elif where == "home":
            log.scroll_home(animate=False)
        else:
            log.scroll_end(animate=False)

    def action_toggle_settings(self) -> None:
        pane = self.query_one("#chat-settings")
        pane.display = self._settings_shown = not pane.display

    async def action_clear_history(self) -> None:
        if self.session is None:
            return
        if self.busy:
            self.notify("a reply is on its way: Esc stops it, then Ctrl+L clears", severity="warning")
            return
        self.session.clear()
        await self.query_one("#chat-log", VerticalScroll).remove_children()
        self._set_status("history cleared")
        self._tell_history(self.session)

    def action_conversations(self) -> None:
        """Pick another conversation kept with this artifact, or start a new one; the one on screen is kept."""
        session = self.session
        if session is None:
            self.notify("no artifact open: pick one on the Artifacts screen (F3, then c)", severity="warning")
            return
        if self._reply is not None:
            self.notify("a reply is on its way: Esc stops it, then Ctrl+O", severity="warning")
            return
        session.system = self.query_one("#system-prompt", TextArea).text
        kept = session.conversations()

        async def chosen(choice: int | None) -> None:
            if choice is None or session is not self.session or self._reply is not None:
                return
            session.switch_to(None if choice < 0 else kept[choice])
            await self._show_conversation(session)
            turns = len(session.messages)
            self._set_status("a new conversation (the last one is kept: Ctrl+O)" if choice < 0 else
                             f"went back to a kept conversation of {turns} message{'s' * (turns != 1)}")
            self._tell_history(session)

        self.app.push_screen(Conversations(kept), chosen)

    def shutdown(self) -> None:
        """Stop a generation and free the model (the app is closing). Closing waits for the generation
        to let go of the backend, so it happens off the UI thread, which that generation may be waiting on."""
        self._cancel.set()
        session, self.session = self.session, None
        if session is not None:
            threading.Thread(target=session.close, daemon=True).start()
