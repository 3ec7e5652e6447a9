"""Modal dialogs: the error panel, a yes/no confirmation and the help screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Markdown, Static

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


HELP = """\
# edgekit

Keyboard first: the footer shows the keys of the screen you are on; **Ctrl+P** opens the command palette.

| key | where | does |
|---|---|---|
| F1 | everywhere | this help |
| F2 .. F6 | everywhere | Chat, Artifacts, Convert, Profile, Devices |
| Ctrl+Q | everywhere | quit (asks first while a conversion, profile or push runs) |
| Enter | chat | send the message |
| Esc | chat | stop the generation |
| Ctrl+Y | chat | copy the last reply |
| Ctrl+S | chat | show or hide settings (system prompt, sampling) |
| Ctrl+L | chat | clear this artifact's history |
| Enter / i | artifacts | inspect: per-tensor types |
| c / p / u | artifacts | open in chat / profile / devices (to push) |
| d | artifacts | delete (asks first) |
| r | artifacts, devices | rescan |
| Ctrl+R | convert, profile, devices | start (devices: push) |
| Esc | convert, profile, devices | cancel the run or push |
| Ctrl+O | profile | export the rows (.json or .png) |
| f | devices | fit check of the artifact on the selected device |

Esc, F1 or q closes this help. Histories are kept per artifact under `~/.cache/edgekit/chats` (`EDGEKIT_HOME` moves it).
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help"):
            yield Markdown(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
