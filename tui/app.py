"""The edgekit Textual app: five screens (modes) switched with F2..F6, help on F1, a command palette.

    from edgekit.tui.app import EdgekitApp
    EdgekitApp(folder=".", chat="./model-gguf-q4").run()

Long work (loading a model, generating, converting, profiling) runs in worker threads and reports
back with ``call_from_thread``; a failure shows the error panel and the app stays usable.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from edgekit.tui.screens.artifacts import ArtifactsScreen
from edgekit.tui.screens.chat import ChatScreen
from edgekit.tui.screens.convert import ConvertScreen
from edgekit.tui.screens.devices import DevicesScreen
from edgekit.tui.screens.dialogs import Confirm, ErrorPanel, HelpScreen, error_text, error_title
from edgekit.tui.screens.profile import ProfileScreen

SCREEN_KEYS = {"chat": "f2", "artifacts": "f3", "convert": "f4", "profile": "f5", "devices": "f6"}
#: what quitting does to each kind of work under way, as the confirmation says it
QUIT_LOSES = {
    "a conversion": "The conversion stops and what it wrote so far is removed.",
    "a profile": "The test under way stops; the rows measured so far are kept in the profile history, as "
                 "`edgekit profile` keeps them on Ctrl-C.",
    "a push": "The push stops; the partial file stays on the device and the next push resumes it.",
}


class EdgekitApp(App[str | None]):
    """``folder``: where the artifacts screen looks. ``chat``: an artifact to open in chat at start.
    ``start``: the first screen. ``backend_options``: passed to the runtime (n_ctx, n_threads...).
    ``run()`` returns a line on what became of work stopped by quitting (a profile's rows), or None."""

    CSS_PATH = "app.tcss"
    TITLE = "edgekit"
    SCREENS = {"chat": ChatScreen, "artifacts": ArtifactsScreen, "convert": ConvertScreen,
               "profile": ProfileScreen, "devices": DevicesScreen}
    MODES = {name: name for name in SCREENS}
    BINDINGS = [
        Binding("f1", "help", "Help"),
        *(Binding(key, f"show('{name}')", name.capitalize()) for name, key in SCREEN_KEYS.items()),
        # Ctrl+Q is every terminal app's quit, and F1 lists it: the footer keeps its room for the screens.
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
    ]

    def __init__(self, folder: str | Path = ".", chat: str | Path | None = None, start: str | None = None,
                 backend_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.folder = Path(folder).expanduser()
        self.chat_target = Path(chat).expanduser() if chat else None
        self.start = start or ("chat" if chat else "artifacts")
        self.backend_options = dict(backend_options or {})

    async def on_mount(self) -> None:
        await self.switch_mode(self.start)
        if self.chat_target is not None:
            await self.open_in_chat(self.chat_target)

    def running_work(self) -> list[str]:
        """What quitting now would throw away: a conversion, a profile or a push under way."""
        jobs = (("convert", "job", "a conversion"), ("profile", "cancel_event", "a profile"),
                ("devices", "cancel_event", "a push"))
        return [what for name, attr, what in jobs if getattr(self.get_screen(name), attr, None) is not None]

    async def action_quit(self) -> None:
        """Ctrl+Q: asks first while work is under way, saying what quitting does to each (QUIT_LOSES)."""
        profile = self.get_screen("profile")
        if isinstance(profile, ProfileScreen) and profile.quitting:
            self.notify("quitting once the profile has stopped and its rows are saved", markup=False)
            return
        running = self.running_work()
        if not running or isinstance(self.screen, Confirm):
            self._leave()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._leave()

        self.push_screen(Confirm("\n".join([f"{' and '.join(running).capitalize()} is under way: quit and stop it?",
                                            *(QUIT_LOSES[what] for what in running)])), answered)

    def _leave(self) -> None:
        profile = self.get_screen("profile")
        if not (isinstance(profile, ProfileScreen) and profile.stop_then(self._exit_saying)):
            self._exit_saying(None)

    def _exit_saying(self, note: str | None) -> None:
        """Exit; ``note`` (what became of a profile stopped to quit) is what ``run()`` returns, for ``edgekit tui``
        to print once the screen is gone."""
        chat = self.get_screen("chat")
        if isinstance(chat, ChatScreen):
            chat.shutdown()
        self.exit(result=note)

    def on_resize(self, event: events.Resize) -> None:
        self.refresh_bindings()  # the footer lays its keys out again for the new width (widgets/footer.py)

    # -- navigation ---------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The key of the screen being shown leaves the footer (so F6 fits at 120 columns)."""
        if action == "show" and parameters and parameters[0] == self.current_mode:
            return False
        return True

    async def action_show(self, name: str) -> None:
        if self.current_mode != name:
            await self.switch_mode(name)
            self.refresh_bindings()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def open_in_chat(self, path: str | Path) -> None:
        await self.switch_mode("chat")
        chat = self.get_screen("chat")
        assert isinstance(chat, ChatScreen)
        await chat.open_artifact(path)

    async def open_in_profile(self, paths: list[Path]) -> None:
        await self.switch_mode("profile")
        profile = self.get_screen("profile")
        assert isinstance(profile, ProfileScreen)
        profile.set_targets(paths)

    async def open_in_devices(self, path: Path) -> None:
        await self.switch_mode("devices")
        devices = self.get_screen("devices")
        assert isinstance(devices, DevicesScreen)
        devices.set_artifact(path)

    def artifact_deleted(self, path: Path) -> None:
        """An artifact was deleted: the chat open on it closes and its history goes with it."""
        chat = self.get_screen("chat")
        assert isinstance(chat, ChatScreen)
        self.call_later(chat.forget, path)

    def artifact_added(self, path: Path) -> None:
        """A conversion finished: the artifacts list shows it (even outside the scanned folder)."""
        artifacts = self.get_screen("artifacts")
        assert isinstance(artifacts, ArtifactsScreen)
        artifacts.add_extra(path)

    def show_error(self, exc: BaseException | str, title: str | None = None) -> None:
        """The error panel, on top of whatever screen is showing; the app stays usable."""
        message = exc if isinstance(exc, str) else error_text(exc)
        self.push_screen(ErrorPanel(title or (error_title(exc) if not isinstance(exc, str) else "Error"), message))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for name, key in SCREEN_KEYS.items():
            yield SystemCommand(f"Go to {name}", f"The {name} screen ({key.upper()})",
                                lambda name=name: self.run_worker(self.action_show(name)))
        yield SystemCommand("Help", "Keys and screens (F1)", self.action_help)

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """Save an SVG of the screen into ``<edgekit home>/screenshots`` (or ``path``) and say where. Textual's
        own delivers it to a Downloads folder, which need not exist, and says nothing either way."""
        from edgekit.fsutil import edgekit_home

        folder = Path(path).expanduser() if path else edgekit_home() / "screenshots"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            saved = self.save_screenshot(filename, str(folder))
        except OSError as exc:
            self.show_error(f"the screenshot was not saved: {exc.strerror or exc} ({folder})", "Screenshot")
            return
        self.notify(f"saved to {saved}", title="Screenshot")
