"""Profile: run the profiler (issue 5's ``edgekit.runtime.profile``) on artifacts from the screen, with
live charts of tokens/s and memory, a results table, comparison with earlier runs and JSON/PNG export."""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Header, Input, Label, ProgressBar, Select, Static

from edgekit.errors import EdgekitError, InputError
from edgekit.fsutil import atomic_file
from edgekit.tui.catalog import human_bytes
from edgekit.tui.widgets.footer import KeysFooter
from edgekit.tui.widgets.progress import settle

#: the window height from which the two charts show above the results table
CHARTS_MIN_HEIGHT = 32
COLUMNS = ("artifact", "test", "threads", "tok/s", "±", "TTFT ms", "load s", "peak RSS", "vs earlier", "status")


def profiler() -> Any:
    """``edgekit.runtime.profile`` (raises ImportError when the profiler is not installed)."""
    return importlib.import_module("edgekit.runtime.profile")


def _row_key(row: dict[str, Any], config_key: Any) -> tuple[Any, ...]:
    art = row.get("artifact") or {}
    return ((row.get("host") or {}).get("fingerprint"), art.get("name"), art.get("sha256"), row.get("test"),
            config_key(row.get("config") or {}))


def earlier_runs() -> Any:
    """A lookup ``row -> tokens/s of the latest earlier run`` of the same artifact (name and sha256),
    test, config and host, from the profiler's history; None for rows never measured before."""
    try:
        from edgekit.runtime.history import History, config_key
    except ImportError:
        return lambda row: None
    latest: dict[tuple[Any, ...], float] = {}
    try:
        with History() as history:
            for r in history.rows(limit=100_000):
                if r.status != "error" and r.samples_s and r.tps[0]:
                    latest[_row_key(r.to_json(), config_key)] = float(r.tps[0])
    except Exception:  # noqa: BLE001 - a broken history database must not stop a profile
        return lambda row: None
    return lambda row: latest.get(_row_key(row, config_key))


def save_history(run: Any) -> None:
    """Keep the run in the profiler's history, where ``edgekit profile`` and the next run compare with it."""
    try:
        from edgekit.runtime.history import History
    except ImportError:
        return
    if run.rows:
        with History() as history:
            history.save(run.rows, started=run.started, status=run.status, host=run.host)


def row_cells(row: dict[str, Any], before: float | None) -> tuple[str, ...]:
    tps, sd = row.get("tps_mean"), row.get("tps_stddev")
    ttft = row.get("ttft_s_mean")
    vs = "-" if before is None or not tps else f"{100 * (tps / before - 1):+.1f}%"
    return (
        row["artifact"]["name"], row["test"], str(row["config"].get("n_threads") or "-"),
        "-" if tps is None else f"{tps:.1f}",
        "-" if sd is None or (row.get("reps") or 0) < 2 else f"{sd:.1f}",  # one timing has no spread
        "-" if ttft is None else f"{1000 * ttft:.0f}", "-" if row.get("load_s") is None else f"{row['load_s']:.2f}",
        "-" if row.get("peak_rss_bytes") is None else human_bytes(row["peak_rss_bytes"]), vs,
        row["status"] if not row.get("error") else f"error: {row['error']}",
    )


def write_png(rows: list[dict[str, Any]], path: Path) -> None:
    """A bar chart of tokens/s and peak memory per artifact and test (matplotlib, written atomically)."""
    from edgekit.errors import require

    require("matplotlib", "tui")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['artifact']['name']}\n{r['test']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(rows) + 3), 4))
    ax1.bar(labels, [r.get("tps_mean") or 0 for r in rows], yerr=[r.get("tps_stddev") or 0 for r in rows])
    ax1.set_ylabel("tokens/s")
    ax2.bar(labels, [(r.get("peak_rss_bytes") or 0) / 1e6 for r in rows], color="tab:orange")
    ax2.set_ylabel("peak RSS (MB)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


class ProfileScreen(Screen[None]):
    BINDINGS = [
        Binding("ctrl+r", "start", "Start"),
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+o", "export", "Export"),
    ]

    def __init__(self) -> None:
        super().__init__(id="profile")
        self.rows: list[dict[str, Any]] = []
        self.cancel_event: threading.Event | None = None
        self.outcome = ""  # "ok", "interrupted" or "failed" once a run ends
        self.after_stop: Callable[[str], None] | None = None  # quitting: called once the profile has stopped

    @property
    def quitting(self) -> bool:
        """Whether the app is waiting for this profile to stop before it quits."""
        return self.after_stop is not None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="field"):
            yield Label("artifacts")
            yield Input(placeholder="paths, comma-separated (or pick on Artifacts, then p)", id="pf-targets")
        with Horizontal(classes="field"):
            yield Label("tests")
            yield Input("pp512,tg128", id="pf-tests", tooltip="llama-bench style: pp512, tg128, pp512+tg128, tg128@d4096")
            yield Label("reps", classes="inline")
            yield Input("3", id="pf-reps", type="integer", tooltip="repetitions per test")
        with Horizontal(classes="field"):
            yield Label("threads")
            yield Input("", placeholder="1,2 (default: the physical cores)", id="pf-threads")
            offload = str(getattr(self.app, "backend_options", {}).get("offload") or "none")
            yield Select([("offload: none", "none"), ("offload: auto", "auto")], value=offload, allow_blank=False,
                         id="pf-offload", tooltip="auto: GPU layers and overrides from the offload planner")
        with Horizontal(id="pf-charts"):
            yield self._plot("pf-tps")
            yield self._plot("pf-mem")
        table: DataTable[str] = DataTable(id="pf-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        with Horizontal(classes="field"):
            yield Label("export to")
            yield Input("profile.json", id="pf-export", tooltip=".json or .png; Ctrl+O writes it")
        yield Static("", id="pf-status", markup=False)
        yield ProgressBar(total=1, id="pf-progress", show_eta=False)
        yield KeysFooter()

    @staticmethod
    def _plot(ident: str) -> Any:
        from textual_plotext import PlotextPlot

        return PlotextPlot(id=ident, classes="chart")

    def on_resize(self, event: events.Resize) -> None:
        # Below this height the charts would leave the results table a single row: the rows matter more.
        self.query_one("#pf-charts").display = event.size.height >= CHARTS_MIN_HEIGHT

    def on_mount(self) -> None:
        try:
            profiler()
        except ImportError as exc:
            self._status(f"the profiler is not available in this install ({exc}); it comes with edgekit's "
                         "runtime (issue 5): update edgekit")
        self._draw()

    def set_targets(self, paths: list[Path]) -> None:
        self.query_one("#pf-targets", Input).value = ", ".join(str(p) for p in paths)

    # -- running ------------------------------------------------------------------------------

    def config(self) -> tuple[list[str], Any]:
        mod = profiler()
        targets = [t.strip() for t in self.query_one("#pf-targets", Input).value.split(",") if t.strip()]
        if not targets:
            raise InputError("give one or more artifacts to profile (comma-separated paths)")
        threads_text = self.query_one("#pf-threads", Input).value
        try:
            reps = int(self.query_one("#pf-reps", Input).value or "3")
            threads = tuple(int(t) for t in threads_text.split(",") if t.strip()) or (None,)
        except ValueError:
            raise InputError("repetitions and threads must be whole numbers (threads: e.g. 1,2)") from None
        offload = self.query_one("#pf-offload", Select).value
        cfg = mod.ProfileConfig(tests=mod.parse_tests(self.query_one("#pf-tests", Input).value), reps=reps,
                                threads=threads, offload_auto=offload == "auto")
        return targets, cfg

    def action_start(self) -> None:
        if self.cancel_event is not None:
            self.notify("a profile is running (Esc cancels it)", severity="warning")
            return
        try:
            targets, cfg = self.config()
        except ImportError as exc:
            self.app.show_error(f"the profiler is not available in this install ({exc})", "Profiler missing")  # type: ignore[attr-defined]
            return
        except EdgekitError as exc:
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        self.rows = []
        self.query_one("#pf-table", DataTable).clear()
        self._draw()
        self.outcome = ""
        self.cancel_event = threading.Event()
        self.query_one("#pf-progress", ProgressBar).update(total=None, progress=0)
        self._status(f"profiling {len(targets)} artifact(s)... (Esc stops; finished rows are kept)")
        self._run(targets, cfg, self.cancel_event)

    @work(thread=True, group="profile")
    def _run(self, targets: list[str], cfg: Any, cancel: threading.Event) -> None:
        mod = profiler()
        earlier = earlier_runs()

        def on_row(row: Any) -> None:
            data = row.to_json()
            self.app.call_from_thread(self._add_row, data, earlier(data))

        def on_progress(label: str, done: int, total: int) -> None:
            self.app.call_from_thread(self._progress, done, total, label)

        try:
            run = mod.profile(targets, cfg, on_row=on_row, on_progress=on_progress, cancel=cancel)
            unrecorded = None
            try:
                save_history(run)
            except EdgekitError as exc:  # a damaged history: the rows measured still count
                unrecorded = str(exc)
                self.app.call_from_thread(self.notify, f"{exc}; this run was not recorded", severity="warning",
                                          markup=False)
        except BaseException as exc:  # noqa: BLE001 - error panel; finished rows stay on screen
            self.app.call_from_thread(self._finished, "failed", exc)
            return
        self.app.call_from_thread(self._finished, run.status, None, unrecorded)

    def _add_row(self, row: dict[str, Any], before: float | None) -> None:
        self.rows.append(row)
        self.query_one("#pf-table", DataTable).add_row(*map(escape, row_cells(row, before)))  # cells are markup
        self._draw()

    def _progress(self, done: int, total: int, label: str) -> None:
        self.query_one("#pf-progress", ProgressBar).update(total=max(total, 1), progress=done)
        self._status(f"{label} ({done}/{total})")

    def _finished(self, status: str, exc: BaseException | None, unrecorded: str | None = None) -> None:
        self.cancel_event = None
        self.outcome = status
        settle(self.query_one("#pf-progress", ProgressBar), exc is None and status != "interrupted")
        if exc is not None:
            self._status(f"failed after {len(self.rows)} row(s); see the error")
            self.app.show_error(exc)  # type: ignore[attr-defined]
        else:
            note = " (stopped: the rows so far are kept)" if status == "interrupted" else ""
            self._status(f"{len(self.rows)} row(s){note}. Ctrl+O exports them.")
        if self.after_stop is not None:
            after_stop, self.after_stop = self.after_stop, None
            after_stop(self._kept(exc, unrecorded))

    def _kept(self, exc: BaseException | None, unrecorded: str | None) -> str:
        """What became of the rows of a profile stopped to quit, for the line the app leaves on exit."""
        from edgekit.tui.screens.dialogs import error_text

        if exc is not None:
            return f"the profile failed, and nothing of it was recorded: {error_text(exc)}"
        ended = "stopped" if self.outcome == "interrupted" else "finished"  # it may end before it sees the stop
        if not self.rows:
            return f"the profile {ended} before its first row; nothing was measured to keep"
        if unrecorded is not None:
            return f"the profile {ended}; its {len(self.rows)} row(s) were not recorded: {unrecorded}"
        marked = ", the run marked 'interrupted'" if ended == "stopped" else ""
        return (f"the profile {ended}; its {len(self.rows)} row(s) are kept in the profile history{marked} "
                "(edgekit profile --compare shows them)")

    def stop_then(self, then: Callable[[str], None]) -> bool:
        """Quitting while a profile runs: stop it as Esc does (the test under way ends within one token or batch
        and its model's worker process is closed), keep the rows in the profile history as ``edgekit profile``
        does on Ctrl-C (the run marked interrupted, a test timed in part as an 'interrupted' row), then call
        ``then`` with a line that says so. False, and ``then`` is not called, when no profile runs."""
        if self.cancel_event is None:
            return False
        self.after_stop = then
        self.action_cancel()
        self._status(f"stopping to quit; keeping the {len(self.rows)} row(s) measured so far...")
        return True

    def action_cancel(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()
            self._status("stopping within one token or batch...")

    # -- charts and export --------------------------------------------------------------------

    def _draw(self) -> None:
        from textual_plotext import PlotextPlot

        ok = [r for r in self.rows if r.get("tps_mean")]
        labels = [f"{r['artifact']['name'][:10]} {r['test']}" for r in ok]
        for ident, title, values in (
            ("#pf-tps", "tokens/s", [r["tps_mean"] for r in ok]),
            ("#pf-mem", "peak RSS (MB)", [(r.get("peak_rss_bytes") or 0) / 1e6 for r in ok]),
        ):
            plot = self.query_one(ident, PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            plt.clear_figure()
            plt.title(title)
            if values:
                plt.bar(list(range(1, len(values) + 1)), values, width=0.5)
                plt.xticks(list(range(1, len(values) + 1)), labels)
            plot.refresh()

    def action_export(self) -> None:
        if not self.rows:
            self.notify("nothing to export yet: run a profile first", severity="warning")
            return
        path = Path(self.query_one("#pf-export", Input).value.strip() or "profile.json").expanduser().absolute()
        try:
            if path.suffix.lower() == ".png":
                write_png(self.rows, path)
            elif path.suffix.lower() == ".json":
                with atomic_file(path) as tmp:
                    tmp.write_text(json.dumps({"schema": "edgekit.profile/1", "rows": self.rows}, indent=1))
            else:
                raise InputError(f"{path.name}: export to a .json or a .png file")
        except (EdgekitError, OSError) as exc:
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        self.notify(f"wrote {path}", markup=False)
        self._status(f"exported {len(self.rows)} row(s) to {path}")

    def _status(self, text: str) -> None:
        self.query_one("#pf-status", Static).update(text)
