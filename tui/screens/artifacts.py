"""Artifacts: what is under a folder with its manifest; inspect, delete, open in chat or profile. A diffusion
model (a pipeline folder or a diffusion artifact) is inspected as a grid of images it samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Header, Input, Label, Static

from edgekit.evaluate import provenance_label
from edgekit.library import MANIFEST, damage, folder_bytes
from edgekit.tui.catalog import (
    ArtifactRow,
    delete_artifact,
    find_artifacts,
    human_bytes,
    middle_ellipsis,
    row_for,
)
from edgekit.tui.screens.dialogs import Confirm
from edgekit.tui.widgets.footer import KeysFooter

COLUMNS = ("name", "format", "method", "quant", "size", "bpw", "ppl", "KL")
#: the name column's widest: a longer name is shortened in its middle (the status line under the table
#: and the Inspect dialog show it whole), so the other columns stay on screen at 80 columns
NAME_WIDTH = 32


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _damage(row: ArtifactRow) -> str:
    """A readable artifact folder's missing or truncated files (sizes only: see :func:`library.damage`)."""
    if row.problem or row.bare or not (row.path / MANIFEST).is_file():
        return ""
    try:
        manifest = json.loads((row.path / MANIFEST).read_text())
    except (OSError, ValueError):
        return ""
    return damage(row.path, manifest) if isinstance(manifest, dict) else ""


class ArtifactsScreen(Screen[None]):
    BINDINGS = [
        Binding("enter,i", "inspect", "Inspect"),
        Binding("c", "chat", "Chat"),
        Binding("p", "profile", "Profile"),
        # In the footer only where it has room (compact at 80 columns, not beside every screen key at 120:
        # widgets/footer.py SPARE_ACTIONS); F1 lists it, and the devices screen names it.
        Binding("u", "push", "Push", show=False),
        Binding("d", "delete", "Delete"),
        Binding("r", "rescan", "Rescan"),
    ]

    def __init__(self) -> None:
        super().__init__(id="artifacts")
        self.rows: list[ArtifactRow] = []
        self.damaged: dict[Path, str] = {}  # artifacts whose files are missing or truncated: what to say
        self.extra: list[Path] = []  # artifacts made in this session outside the scanned folder
        self.summary = ""  # the status line: how many artifacts under which folder

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="artifacts-bar"):
            yield Label("folder")
            yield Input(str(self.app.folder), id="artifacts-folder")  # type: ignore[attr-defined]
        table: DataTable[str] = DataTable(id="artifacts-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        yield Static("", id="artifacts-status", markup=False)
        yield KeysFooter()

    def on_mount(self) -> None:
        self.rescan()
        self.query_one(DataTable).focus()

    @on(Input.Submitted, "#artifacts-folder")
    def _folder_changed(self, event: Input.Submitted) -> None:
        self.app.folder = Path(event.value).expanduser()  # type: ignore[attr-defined]
        self.rescan()
        self.query_one(DataTable).focus()

    def rescan(self) -> None:
        self.query_one("#artifacts-status", Static).update("scanning...")
        self._scan(self.app.folder)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, group="scan")
    def _scan(self, folder: Path) -> None:
        try:
            rows = find_artifacts(folder)
        except Exception as exc:  # noqa: BLE001 - shown in the error panel
            self.app.call_from_thread(self.app.show_error, exc)  # type: ignore[attr-defined]
            rows = []
        seen = {r.path.resolve() for r in rows}
        rows += [row_for(p) for p in self.extra if p.exists() and p.resolve() not in seen]
        damaged = {r.path: problem for r in rows if (problem := _damage(r))}
        self.app.call_from_thread(self._show, rows, folder, damaged)

    def _show(self, rows: list[ArtifactRow], folder: Path, damaged: dict[Path, str] | None = None) -> None:
        self.rows = rows
        self.damaged = damaged or {}
        table = self.query_one(DataTable)
        cells = [(middle_ellipsis(r.name, NAME_WIDTH)
                  + (" (unreadable)" if r.problem else " (damaged)" if r.path in self.damaged else ""),
                  r.format, r.method, r.quant,
                  r.size_text if r.size_bytes else "-", _num(r.bpw, ".2f"),
                  _num(r.ppl, ".3f") + (f" on {r.ppl_text}" if r.ppl_text else ""), _num(r.kl, ".4f"))
                 for r in rows]
        # explicit widths: DataTable's own auto-width settles on a later refresh, which made the layout
        # depend on timing (seen as truncated columns in snapshots on a loaded machine)
        table.clear(columns=True)
        for i, label in enumerate(COLUMNS):
            table.add_column(label, width=max([len(str(label))] + [len(str(c[i])) for c in cells]))
        for r, c in zip(rows, cells, strict=True):
            table.add_row(*map(escape, c), key=str(r.path))  # str cells are markup; names are data
        total = sum(r.size_bytes for r in rows)
        self.summary = (
            f"{len(rows)} artifact{'s' if len(rows) != 1 else ''} under {folder} ({human_bytes(total)})" if rows else
            f"no artifacts under {folder}: convert one on the Convert screen (F4) or type another folder above")
        self._show_status()

    @on(DataTable.RowHighlighted, "#artifacts-table")
    def _show_status(self) -> None:
        """The summary, and the selected artifact's whole name when the table shortens it."""
        table = self.query_one(DataTable)
        row = self.rows[table.cursor_row] if self.rows and 0 <= table.cursor_row < len(self.rows) else None
        cut = row is not None and len(row.name) > NAME_WIDTH
        self.query_one("#artifacts-status", Static).update(
            f"{self.summary}\nselected: {row.name}" if cut and row is not None else self.summary)

    def add_extra(self, path: Path) -> None:
        if path not in self.extra:
            self.extra.append(path)
        if self.is_mounted:
            self.rescan()

    def selected(self) -> ArtifactRow | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row < 0 or table.cursor_row >= len(self.rows):
            self.notify("no artifact selected", severity="warning")
            return None
        return self.rows[table.cursor_row]

    # -- actions ------------------------------------------------------------------------------

    def action_rescan(self) -> None:
        self.rescan()

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_inspect()

    def action_inspect(self) -> None:
        row = self.selected()
        if row is not None:
            if row.problem:
                self.app.show_error(row.problem, "Unreadable artifact")  # type: ignore[attr-defined]
                return
            if row.path in self.damaged:
                self.app.show_error(f"{row.path}: {self.damaged[row.path]}", "Damaged artifact")  # type: ignore[attr-defined]
                return
            self.app.push_screen(SamplesScreen(row) if row.task == "diffusion" else InspectScreen(row))

    async def action_chat(self) -> None:
        row = self.selected()
        if row is not None:
            await self.app.open_in_chat(row.path)  # type: ignore[attr-defined]

    async def action_profile(self) -> None:
        row = self.selected()
        if row is not None:
            await self.app.open_in_profile([row.path])  # type: ignore[attr-defined]

    async def action_push(self) -> None:
        row = self.selected()
        if row is not None:
            await self.app.open_in_devices(row.path)  # type: ignore[attr-defined]

    def action_delete(self) -> None:
        row = self.selected()
        if row is None:
            return

        def answered(yes: bool | None) -> None:
            if not yes:
                return
            try:
                delete_artifact(row)
            except Exception as exc:  # noqa: BLE001
                self.app.show_error(exc)  # type: ignore[attr-defined]
                return
            self.notify(f"deleted {row.path}", markup=False)
            self.app.artifact_deleted(row.path)  # type: ignore[attr-defined]
            self.rescan()

        what = "the model file" if row.bare else "the folder"
        # an unreadable manifest records no size: the folder's files say what goes
        size = human_bytes(folder_bytes(row.path)) if row.problem and row.path.is_dir() else row.size_text
        self.app.push_screen(Confirm(f"Delete {row.name}?\n{what} {row.path} ({size}) is removed."), answered)


class InspectScreen(ModalScreen[None]):
    """``edgekit inspect`` as a dialog: summary, types by size, and every tensor."""

    BINDINGS = [Binding("escape,q", "close", "Close")]

    def __init__(self, row: ArtifactRow) -> None:
        super().__init__()
        self.row = row

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="inspect"):
            yield Static(f"{self.row.name}: reading...", id="inspect-summary", markup=False)
            table: DataTable[str] = DataTable(id="inspect-tensors", zebra_stripes=True)
            table.add_columns("tensor", "type", "shape", "size", "note")
            yield table

    def on_mount(self) -> None:
        self._read()

    @work(thread=True)
    def _read(self) -> None:
        from edgekit import api

        try:
            info = api.inspect(self.row.path)
        except Exception as exc:  # noqa: BLE001
            self.app.call_from_thread(self._failed, exc)
            return
        self.app.call_from_thread(self._show, info)

    def _failed(self, exc: Exception) -> None:
        self.dismiss(None)
        self.app.show_error(exc)  # type: ignore[attr-defined]

    def _show(self, info: dict[str, Any]) -> None:
        hp = info["hparams"]
        types = ", ".join(f"{t} x{n} ({human_bytes(info['type_bytes'][t])})" for t, n in info["type_counts"].items())
        lines = [
            f"{self.row.name}  ·  {info['architecture']}  ·  {hp['block_count']} layers, hidden "
            f"{hp['embedding_length']}, vocab {hp['vocab_size']}",
            f"{info['n_params'] / 1e6:.2f} M parameters  ·  {human_bytes(info['file_bytes'])}  ·  "
            f"{info['bpw']:.3f} bits/weight  ·  memory at ctx {info['memory']['ctx']}: "
            f"{human_bytes(info['memory']['total'])} (weights + KV cache)" + (
                f", {human_bytes(run['bytes'])} at peak to run on {run['runtime']}"
                if (run := info["memory"].get("to_run")) else ""),
            f"types: {types}",
        ]
        if info["fallbacks"]:
            lines.append(f"fallbacks: {info['fallbacks']} tensors "
                         + ", ".join(f"{k} x{v}" for k, v in info["fallback_summary"].items()))
        for e in [e for e in info.get("eval", []) if "ppl" in e][-2:]:
            kl = f", KL {e['kl_mean']:.4f}" if e.get("kl_mean") is not None else ""
            lines.append(f"eval: ppl {e['ppl']:.3f}{kl} on {provenance_label(e)}")
        self.query_one("#inspect-summary", Static).update("\n".join(lines))
        table = self.query_one(DataTable)
        cells = [(t["name"], t["type"], "x".join(map(str, t["shape"])), human_bytes(t["bytes"]),
                  f"wanted {t['wanted']}" if "wanted" in t else "") for t in info["tensors"]]
        table.clear(columns=True)  # explicit widths: a layout that does not depend on refresh timing
        for i, label in enumerate(("tensor", "type", "shape", "size", "note")):
            table.add_column(label, width=max([len(label)] + [len(c[i]) for c in cells]))
        for c in cells:
            table.add_row(*map(escape, c))
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)


class SamplesScreen(ModalScreen[None]):
    """A diffusion model's detail view: what it is, its last recorded scores and a grid of images it samples
    with its own sampler and step count (in a worker thread; ``r`` draws new ones)."""

    BINDINGS = [Binding("escape,q", "close", "Close"), Binding("r", "resample", "New samples")]
    N = 8  # two rows of four 16x16 digits: 8 classes, fits 80x24

    def __init__(self, row: ArtifactRow) -> None:
        super().__init__()
        self.row = row
        self.seed = 0
        self.images: Any = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="samples"):
            yield Static(f"{self.row.name}: sampling {self.N} images...", id="samples-summary", markup=False)
            yield Static("", id="samples-grid")

    def on_mount(self) -> None:
        self._sample(self.seed)

    @work(thread=True, exclusive=True)
    def _sample(self, seed: int) -> None:
        import time

        from edgekit.evaluate import open_diffusion, sample_images

        try:
            model = open_diffusion(self.row.path)
            t0 = time.perf_counter()
            images, labels = sample_images(model, self.N, model.steps, model.sampler, seed=seed)
        except Exception as exc:  # noqa: BLE001 - shown in the error panel
            self.app.call_from_thread(self._failed, exc)
            return
        self.app.call_from_thread(self._show, model, images, labels, time.perf_counter() - t0, seed)

    def _failed(self, exc: Exception) -> None:
        self.dismiss(None)
        self.app.show_error(exc)  # type: ignore[attr-defined]

    def _show(self, model: Any, images: Any, labels: Any, seconds: float, seed: int) -> None:
        from edgekit.evaluate import diffusion_label
        from edgekit.tui.widgets.sample_grid import halfblock_grid

        self.images = images
        c, h, w = model.shape
        lines = [f"{self.row.name}  ·  {model.sampler} {model.steps} steps  ·  {h}x{w}x{c}  ·  "
                 f"{model.num_classes or 'no'} classes",
                 f"{len(images)} samples in {seconds:.1f} s (seed {seed}); r: new samples"]
        evals = (model.artifact.manifest.get("eval") or []) if model.artifact is not None else []
        lines += [f"eval: {diffusion_label(e)}" for e in evals[-2:] if isinstance(e, dict) and "fid" in e]
        self.query_one("#samples-summary", Static).update("\n".join(lines))
        captions = None if labels is None else [f"class {int(k)}" for k in labels]
        self.query_one("#samples-grid", Static).update(halfblock_grid(images, cols=4, captions=captions))

    def action_resample(self) -> None:
        self.seed += 1
        self.query_one("#samples-summary", Static).update(f"{self.row.name}: sampling {self.N} images...")
        self._sample(self.seed)

    def action_close(self) -> None:
        self.dismiss(None)
