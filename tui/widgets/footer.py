"""The footer every screen shows: the keys of the screen first, then Help and the other screens.

At 80 columns they do not all fit (the artifacts screen alone has six keys), and a footer cut off hides
the ones at its end. When the window is narrower than the footer's keys need, it turns compact and
leaves out the command palette's hint and the screen keys (F2-F6), which the header names instead;
F1 still lists every key. Keys the footer has no room for even then go from the end, F1 last of all:
it is the one that leads to every other. A few keys (``SPARE_ACTIONS``) show only where there is room.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

#: what the header says while the footer leaves the screen keys out
SCREENS_HINT = "F2-F6 screens, F1 keys"
_PALETTE_WIDTH = 12  # "▏^p palette "
#: bound with ``show=False`` (F1 lists them), shown in the footer only when it has room to spare
SPARE_ACTIONS = frozenset({"push", "clear_history"})
_HELP_ACTION = "help"


class KeysFooter(Footer):
    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        width = self.app.size.width
        keys = self._keys()
        shown = [k for k in keys if k[0].show]
        small = _PALETTE_WIDTH + sum(self._width(b, False) for b, _, _ in shown) > width
        self.compact = small
        self.set_reactive(Footer.show_command_palette, not small)
        self.app.sub_title = SCREENS_HINT if small else ""
        if small:
            shown = [k for k in shown if not k[0].action.startswith("show(")]
        used = sum(self._width(b, small) for b, _, _ in shown) + (0 if small else _PALETTE_WIDTH)
        for key in keys:
            if key[0].action in SPARE_ACTIONS and used + self._width(key[0], small) <= width:
                shown.append(key)
                used += self._width(key[0], small)
        # still too wide (compact, under ~52 columns): the last keys go, F1 stays
        while used > width and (drop := [k for k in shown if k[0].action != _HELP_ACTION]):
            shown.remove(drop[-1])
            used -= self._width(drop[-1][0], small)
        keep = {id(k[0]) for k in shown}
        order = [k for k in keys if id(k[0]) in keep]
        self.styles.grid_size_columns = len(order)
        for binding, enabled, tooltip in order:
            yield FooterKey(binding.key, self.app.get_key_display(binding), binding.description, binding.action,
                            disabled=not enabled, tooltip=tooltip).data_bind(compact=Footer.compact)
        if not small and self.app.ENABLE_COMMAND_PALETTE:
            try:
                _node, binding, enabled, tooltip = self.screen.active_bindings[self.app.COMMAND_PALETTE_BINDING]
            except KeyError:
                return
            yield FooterKey(binding.key, self.app.get_key_display(binding), binding.description, binding.action,
                            classes="-command-palette", disabled=not enabled,
                            tooltip=binding.tooltip or binding.description)

    def _keys(self) -> list[tuple[Binding, bool, str]]:
        """The keys the footer may show, one per action, in the order of the screen's bindings."""
        seen: dict[str, tuple[Binding, bool, str]] = {}
        for _node, binding, enabled, tooltip in self.screen.active_bindings.values():
            if (binding.show or binding.action in SPARE_ACTIONS) and binding.action not in seen:
                seen[binding.action] = (binding, enabled, tooltip)
        return list(seen.values())

    def _width(self, binding: Binding, compact: bool) -> int:
        """Columns one key takes: " key description " in full, "key description " compact."""
        return len(self.app.get_key_display(binding)) + len(binding.description) + (2 if compact else 3)
