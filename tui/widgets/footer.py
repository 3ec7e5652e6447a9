"""The footer every screen shows: the keys of the screen first, then Help and the other screens.

At 80 columns they do not all fit (the artifacts screen alone has five keys), and a footer cut off
hides the ones at its end. Below ``NARROW`` columns it is compact, leaves out the command palette's
hint and the screen keys (F2-F6), which the header names instead; F1 still lists every key.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

#: below this width the footer keeps only the screen's own keys and F1
NARROW = 100
#: what the header says while the footer leaves the screen keys out
SCREENS_HINT = "F2-F6 screens, F1 keys"


def narrow(width: int) -> bool:
    return width < NARROW


class KeysFooter(Footer):
    def compose(self) -> ComposeResult:
        small = narrow(self.app.size.width)
        self.compact = small
        self.set_reactive(Footer.show_command_palette, not small)
        for widget in super().compose():
            if small and isinstance(widget, FooterKey) and widget.action.startswith("show("):
                continue
            yield widget
