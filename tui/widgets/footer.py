"""The footer every screen shows: the keys of the screen first, then Help and the other screens.

At 80 columns they do not all fit (the artifacts screen alone has six keys), and a footer cut off hides
the ones at its end. When the window is narrower than the footer's keys need, it turns compact and
leaves out the command palette's hint and the screen keys (F2-F6), which the header names instead;
F1 still lists every key.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

#: what the header says while the footer leaves the screen keys out
SCREENS_HINT = "F2-F6 screens, F1 keys"
_PALETTE_WIDTH = 12  # "▏^p palette "


class KeysFooter(Footer):
    def compose(self) -> ComposeResult:
        small = self._needed_width() > self.app.size.width
        self.compact = small
        self.set_reactive(Footer.show_command_palette, not small)
        self.app.sub_title = SCREENS_HINT if small else ""
        for widget in super().compose():
            if small and isinstance(widget, FooterKey) and widget.action.startswith("show("):
                continue
            yield widget

    def _needed_width(self) -> int:
        """Columns the full footer takes: each key as " key description " plus a space between."""
        shown = {b.action: b for _, b, _, _ in self.screen.active_bindings.values() if b.show}
        return _PALETTE_WIDTH + sum(len(self.app.get_key_display(b)) + len(b.description) + 3 for b in shown.values())
