"""Modal dialogs: the error panel, a yes/no confirmation, the kept conversations and the help screen."""

from __future__ import annotations

from rich import box
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Markdown, OptionList, Static
from textual.widgets.option_list import Option

from edgekit.errors import (
    BackendCrashed,
    EdgekitError,
    MissingDependencyError,
    UnsupportedError,
)


def error_title(exc: BaseException) -> str:
    """A heading that says what kind of failure it was."""
    if isinstance(exc, BackendCrashed):
        return "The runtime crashed"
    if isinstance(exc, MissingDependencyError):
        return "A runtime is missing"
    if isinstance(exc, UnsupportedError):
        return "Not supported"
    if isinstance(exc, EdgekitError):
        return "Error"
    return "Internal error"


def error_text(exc: BaseException) -> str:
    """One line that says what happened and the fix (edgekit's own errors already do)."""
    if isinstance(exc, EdgekitError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; close other programs or use a smaller model or context"
    return f"{type(exc).__name__}: {exc} (this is a bug in edgekit; the app is still usable)"


class ErrorPanel(ModalScreen[None]):
    """Shows one failure; the app behind it stays as it was. Esc, Enter or the button closes it."""

    BINDINGS = [Binding("escape,enter", "dismiss_panel", "Close", show=True)]

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.title_text = title
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="error-panel", classes="dialog"):
            yield Label(self.title_text, id="error-title")
            yield Static(self.message, id="error-message", markup=False)
            yield Button("Close", variant="error", id="error-close")

    def on_mount(self) -> None:
        self.query_one("#error-close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_dismiss_panel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    """A yes/no question; ``y``/``n`` answer it from the keyboard."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm"):
            yield Static(self.question, markup=False, id="confirm-question")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def conversation_line(conversation: dict) -> str:
    """One kept conversation in a line: how many turns, and its first question."""
    turns = conversation.get("messages") or []
    first = next((m["content"] for m in turns if m["role"] == "user"), "")
    first = " ".join(first.split())
    first = first if len(first) <= 36 else first[:35] + "…"
    return f"{len(turns)} message{'s' * (len(turns) != 1)} · {first}"


class Conversations(ModalScreen[int | None]):
    """The conversations kept with the open artifact besides the one on screen: Enter takes one up
    (its index), the first line starts a new one (-1); Esc keeps the chat as it is (None)."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, kept: list[dict]) -> None:
        super().__init__()
        self.kept = kept

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="conversations"):
            yield Static("Kept conversations: Enter opens one, Esc closes", markup=False)  # wraps when narrow
            yield OptionList(Option("+ new conversation (this one is kept)", id="new"),
                             *(Option(conversation_line(c), id=str(i)) for i, c in enumerate(self.kept)),
                             id="conversation-list", markup=False)

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(-1 if event.option.id == "new" else int(event.option.id or 0))

    def action_close(self) -> None:
        self.dismiss(None)


HELP_INTRO = """\
# edgekit

Keyboard first: the footer shows the keys of the screen you are on; **Ctrl+P** opens the command palette.
"""

#: (key, where, does): a table whose key column never shrinks (the other two wrap), down to 60 columns
HELP_KEYS = (
    ("F1", "everywhere", "this help"),
    ("F2 .. F6", "everywhere", "Chat, Artifacts, Convert, Profile, Devices"),
    ("Ctrl+Q", "everywhere", "quit (asks first while a conversion, profile or push runs)"),
    ("Tab", "everywhere", "the next box, list or button"),
    ("Enter", "chat", "send the message"),
    ("Ctrl+J", "chat", "a new line in the message (shown as ⏎; a paste keeps its lines)"),
    ("PgUp / PgDn", "chat", "scroll the conversation (Ctrl+Home / Ctrl+End: its start / end)"),
    ("Esc", "chat", "stop the generation"),
    ("Ctrl+Y", "chat", "copy the last reply"),
    ("Ctrl+S", "chat", "show or hide settings (system prompt, sampling)"),
    ("Ctrl+L", "chat", "clear this conversation"),
    ("Ctrl+O", "chat", "the other conversations kept with this artifact, or a new one"),
    ("Enter / i", "artifacts", "inspect: per-tensor types"),
    ("c / p / u", "artifacts", "open in chat / profile / devices (to push)"),
    ("d", "artifacts", "delete (asks first)"),
    ("r", "artifacts & devices", "rescan"),
    ("Ctrl+R", "convert, profile, devices", "start (devices: push)"),
    ("Esc", "convert, profile, devices", "cancel the run or push"),
    ("Ctrl+O", "profile", "export the rows (.json or .png)"),
    ("f", "devices", "fit check of the artifact on the selected device"),
)

HELP_OUTRO = """\
Esc, F1 or q closes this help. Conversations are kept per artifact (the newest and up to 8 others) under \
`~/.cache/edgekit/chats` (`EDGEKIT_HOME` moves it).
"""

#: the whole help as Markdown (for reading outside the app)
HELP = "\n".join([HELP_INTRO, "| key | where | does |", "|---|---|---|",
                  *(f"| {k} | {w} | {d} |" for k, w, d in HELP_KEYS), "", HELP_OUTRO])


def help_table() -> Table:
    """The keys as a table whose key column keeps its width: the other two share what is left and wrap."""
    table = Table(box=box.SIMPLE_HEAD, expand=True, show_edge=False, padding=(0, 2, 0, 0), pad_edge=False,
                  header_style="bold")
    table.add_column("key", no_wrap=True, style="bold")
    table.add_column("where", ratio=1, width=10)  # the longest words: "everywhere", "conversations"
    table.add_column("does", ratio=3, width=13)
    for row in HELP_KEYS:
        table.add_row(*row)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help"):
            yield Markdown(HELP_INTRO)
            yield Static(help_table(), id="help-keys")
            yield Markdown(HELP_OUTRO)

    def action_close(self) -> None:
        self.dismiss(None)
