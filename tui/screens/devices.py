"""Devices: what ``edgekit devices`` sees, a fit check, and a push with progress and cancel."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Header, Input, Label, ProgressBar, Static

from edgekit.errors import EdgekitError, InputError
from edgekit.tui.catalog import human_bytes
from edgekit.tui.widgets.footer import KeysFooter
from edgekit.tui.widgets.progress import settle

COLUMNS = ("device", "name", "state", "os", "arch", "cores", "RAM", "free storage", "GPUs")


def devices_module() -> Any:
    """``edgekit.devices``, or None when it cannot be imported (its error is shown on the screen)."""
    return importlib.import_module("edgekit.devices")


def _size(v: int | None) -> str:
    return "-" if v is None else human_bytes(v)


def device_row(d: Any) -> tuple[str, ...]:
    """The table's cells, escaped: DataTable reads str cells as markup and devices name themselves."""
    os_text = " ".join(x for x in (d.os, d.os_version) if x) or "-"
    gpus = ", ".join(g.name for g in d.gpus) or "-"
    return tuple(escape(c) for c in (d.id, d.name or "-", d.state, os_text, d.arch or "-", str(d.cores or "-"),
                                     _size(d.ram_total), _size(d.storage_free), gpus))


class DevicesScreen(Screen[None]):
    BINDINGS = [
        Binding("r", "rescan", "Rescan"),
        Binding("f", "fit", "Fit check"),
        Binding("ctrl+r", "push", "Push"),
        Binding("escape", "cancel", "Cancel push"),
    ]

    def __init__(self) -> None:
        super().__init__(id="devices")
        self.infos: list[Any] = []
        self.cancel_event: threading.Event | None = None
        self.outcome = ""  # "pushed", "cancelled", "failed", "fit ok", "fit refused"
        self.last_result: Any = None

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable[str] = DataTable(id="devices-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static("", id="devices-detail", markup=False)
        with Horizontal(classes="field"):
            yield Label("artifact")
            yield Input(placeholder="artifact folder or .gguf to push", id="dev-artifact")
        with Horizontal(classes="field"):
            yield Label("destination")
            yield Input(placeholder="empty: the device's default folder", id="dev-dest",
                        tooltip="empty: Android /data/local/tmp/edgekit, SSH ~/edgekit")
            yield Label("ctx", classes="inline")
            yield Input("4096", id="dev-ctx", type="integer", tooltip="context length the RAM check assumes")
        yield Static("", id="dev-status", markup=False)
        yield ProgressBar(total=1, id="dev-progress", show_eta=False)
        yield KeysFooter()

    def on_mount(self) -> None:
        self.action_rescan()
        self.query_one(DataTable).focus()

    def set_artifact(self, path: Path) -> None:
        self.query_one("#dev-artifact", Input).value = str(path)

    # -- discovery ----------------------------------------------------------------------------

    def action_rescan(self) -> None:
        self._status("looking for devices...")
        self._discover()

    @work(thread=True, exclusive=True, group="discover")
    def _discover(self) -> None:
        try:
            found = devices_module().list_devices()
        except ImportError as exc:
            self.app.call_from_thread(self._status, f"device support is not available: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - shown in the error panel
            self.app.call_from_thread(self._failed, exc)
            return
        self.app.call_from_thread(self._show, found)

    def _show(self, found: Any) -> None:
        self.infos = list(found.devices)
        table = self.query_one(DataTable)
        table.clear()
        for d in self.infos:
            table.add_row(*device_row(d), key=d.id)
        notes = "; ".join(f"{k}: {v}" for k, v in found.notes.items())
        self.query_one("#devices-detail", Static).update(notes)
        self._status(f"{len(self.infos)} device(s). Select one, give an artifact: f checks the fit, Ctrl+R pushes.")

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        d = self.selected(quiet=True)
        if d is None:
            return
        bits = [f"{d.id}: {d.model or d.cpu or d.name}"]
        if d.cpu_features:
            bits.append("features " + " ".join(d.cpu_features))
        if d.storage_path:
            bits.append(f"storage at {d.storage_path}: {_size(d.storage_free)} free of {_size(d.storage_total)}")
        if d.detail:
            bits.append(d.detail)
        self.query_one("#devices-detail", Static).update("  ·  ".join(bits))

    def selected(self, quiet: bool = False) -> Any:
        table = self.query_one(DataTable)
        if not self.infos or not 0 <= table.cursor_row < len(self.infos):
            if not quiet:
                self.notify("no device selected", severity="warning")
            return None
        return self.infos[table.cursor_row]

    # -- fit check and push -------------------------------------------------------------------

    def _request(self, what: str) -> tuple[Any, str, str | None, int] | None:
        d = self.selected()
        if d is None:
            return None
        artifact = self.query_one("#dev-artifact", Input).value.strip()
        dest = self.query_one("#dev-dest", Input).value.strip() or None
        try:
            if not artifact:
                raise InputError(f"give the artifact to {what} (a folder made by 'edgekit convert' or a .gguf; "
                                 "on Artifacts, u brings the selected one here)")
            ctx = int(self.query_one("#dev-ctx", Input).value or "4096")
        except (EdgekitError, ValueError) as exc:
            self.app.show_error(exc if isinstance(exc, EdgekitError) else InputError("context must be a number"))  # type: ignore[attr-defined]
            return None
        return d, artifact, dest, ctx

    def action_fit(self) -> None:
        req = self._request("check")
        if req is not None:
            self._status(f"checking whether {req[1]} fits {req[0].id}...")
            self._fit(*req)

    @work(thread=True, group="device-job")
    def _fit(self, d: Any, artifact: str, dest: str | None, ctx: int) -> None:
        mod = devices_module()
        try:
            with mod.open_device(d.id) as dev:
                report = mod.check_fit(dev, artifact, ctx=ctx, dest=dest)
        except Exception as exc:  # noqa: BLE001
            self.app.call_from_thread(self._failed, exc)
            return
        self.app.call_from_thread(self._fit_done, d, report)

    def _fit_done(self, d: Any, report: Any) -> None:
        self.outcome = "fit ok" if report.ok else "fit refused"
        ram = f", RAM {_size(report.ram_needed)} of {_size(report.ram_total)} at ctx {report.ctx}"
        head = f"fits {d.id}" if report.ok else f"does not fit {d.id}"
        self._status(f"{head}: storage {_size(report.storage_needed)} of {_size(report.storage_free)} free{ram}"
                     + ("".join(f"\n- {r}" for r in report.reasons)))

    def action_push(self) -> None:
        if self.cancel_event is not None:
            self.notify("a push is running (Esc cancels it)", severity="warning")
            return
        req = self._request("push")
        if req is None:
            return
        self.cancel_event = threading.Event()
        self.outcome = ""
        self.query_one("#dev-progress", ProgressBar).update(total=None, progress=0)
        self._status(f"pushing {req[1]} to {req[0].id}...")
        self._push(*req, self.cancel_event)

    @work(thread=True, group="device-job")
    def _push(self, d: Any, artifact: str, dest: str | None, ctx: int, cancel: threading.Event) -> None:
        mod = devices_module()

        def progress(desc: str, done: int, total: int) -> None:
            self.app.call_from_thread(self._progress, desc, done, total)

        try:
            with mod.open_device(d.id) as dev:
                result = mod.push(artifact, dev, mod.PushConfig(dest=dest, ctx=ctx), progress=progress, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001
            self.app.call_from_thread(self._push_failed, exc)
            return
        self.app.call_from_thread(self._pushed, result)

    def _progress(self, desc: str, done: int, total: int) -> None:
        self.query_one("#dev-progress", ProgressBar).update(total=max(total, 1), progress=done)
        self._status(f"{desc}: {human_bytes(done)} of {human_bytes(total)}")

    def _pushed(self, result: Any) -> None:
        self.cancel_event = None
        settle(self.query_one("#dev-progress", ProgressBar), True)
        self.outcome = "pushed"
        self.last_result = result
        resumed = sum(1 for f in result.files if f.resumed_from)
        skipped = sum(1 for f in result.files if f.skipped)
        self._status(f"pushed to {result.device_id}:{result.remote_dir} ({human_bytes(result.bytes_sent)} sent in "
                     f"{result.seconds:.1f} s, sha256 verified; {skipped} already there, {resumed} resumed)")

    def _push_failed(self, exc: BaseException) -> None:
        self.cancel_event = None
        settle(self.query_one("#dev-progress", ProgressBar), False)
        if type(exc).__name__ == "PushCancelled":
            self.outcome = "cancelled"
            self._status(str(exc))
            return
        self.outcome = "failed"
        self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self._status("failed (see the error)")
        self.app.show_error(exc)  # type: ignore[attr-defined]

    def action_cancel(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()
            self._status("cancelling the push...")

    def _status(self, text: str) -> None:
        self.query_one("#dev-status", Static).update(text)
