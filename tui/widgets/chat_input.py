"""The chat's message box: one line on screen, but a message of several lines is kept whole."""

from __future__ import annotations

import unicodedata

from rich.cells import cell_len, get_character_cell_size
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.expand_tabs import expand_tabs_inline
from textual.geometry import clamp
from textual.widgets import Input

#: how a line break in the message shows in the one-line box (the value keeps the real "\n")
NEWLINE_MARK = "⏎"


def is_typed_text(character: str | None) -> bool:
    """A character a key may type: a printable one or a format character (Unicode category Cf).

    Textual's Input drops keys whose character is not printable; the zero width joiner (U+200D) that holds
    👩‍👩‍👧 together, the non-joiner (U+200C) of Persian and the direction marks (U+200E, U+200F) are all Cf."""
    if character is None or len(character) != 1:
        return False
    return character.isprintable() or unicodedata.category(character) == "Cf"


class ChatInput(Input):
    """An ``Input`` whose value may hold line breaks: a paste keeps all its lines (Textual's keeps the first)
    and Ctrl+J (Shift+Enter where the terminal tells it apart) adds one; each shows as ⏎. Enter sends.

    The value is the message as sent; only the drawing swaps "\\n" for ⏎, one character for one, so the
    cursor and selection indices stay those of the value."""

    BINDINGS = [
        Binding("ctrl+j,shift+enter", "newline", "New line", show=False),
    ]

    def action_newline(self) -> None:
        self._insert("\n")

    def _insert(self, text: str) -> None:
        if self.selection.is_empty:
            self.insert_text_at_cursor(text)
        else:
            self.replace(text, *self.selection)

    def _shown(self) -> str:
        return self.value.replace("\n", NEWLINE_MARK)

    # -- keeping what Textual's Input drops ------------------------------------------------------

    # Textual calls each class's handler down the MRO: prevent_default keeps Input's from running after these.

    def _on_paste(self, event: events.Paste) -> None:
        event.stop()
        event.prevent_default()
        if event.text:
            # terminals paste line breaks as \r (some as \r\n): the message keeps them as \n
            self._insert(event.text.replace("\r\n", "\n").replace("\r", "\n"))

    def _on_key(self, event: events.Key) -> None:
        if not event.is_printable and is_typed_text(event.character):
            assert event.character is not None
            event.stop()
            event.prevent_default()
            self._restart_blink()
            self._insert(event.character)

    def check_consume_key(self, key: str, character: str | None) -> bool:
        return is_typed_text(character)

    # -- drawing the line breaks as ⏎ ----------------------------------------------------------------

    @property
    def _value(self) -> Text:
        if self.password or "\n" not in self.value:
            return super()._value
        text = Text(self._shown(), no_wrap=True, overflow="ignore", end="")
        if self.highlighter is not None:
            text = self.highlighter(text)
        for index, char in enumerate(self.value):
            if char == "\n":
                text.stylize("dim", index, index + 1)
        return text

    def _position_to_cell(self, position: int) -> int:
        return cell_len(expand_tabs_inline(self._shown()[:position], 4))

    def _cell_offset_to_index(self, offset: int) -> int:
        cell_offset = 0
        offset += self.scroll_offset.x
        for index, char in enumerate(self._shown()):
            width = get_character_cell_size(char)
            if cell_offset <= offset < cell_offset + width:
                return index
            cell_offset += width
        return clamp(offset, 0, len(self.value))
