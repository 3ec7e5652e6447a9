"""Convert: a form that runs ``api.convert`` in a worker thread with per-step progress and cancel."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    Header,
    Input,
    Label,
    ProgressBar,
    RichLog,
    Select,
    Static,
)

from edgekit.errors import EdgekitError, InputError
from edgekit.tui.jobs import CancellableProgress, Cancelled
from edgekit.tui.widgets.footer import KeysFooter
from edgekit.tui.widgets.progress import settle


@dataclass(frozen=True)
class ConvertForm:
    """The form's values; :meth:`recipe` validates them the way ``edgekit convert`` does."""

    model: str
    fmt: str = "gguf"
    quant: str = "4"  # bits (2..8) or a preset name (Q4_K_M, Q8_0, F16...)
    bpw: str = ""  # a budget: bits per weight ("4.5") or a file size ("90MB")
    method: str = "rtn"
    calib: str = "self"
    calib_samples: str = "32"
    output: str = ""
    force: bool = False
    options: str = ""  # the format's options, as convert -O takes them: "embedding=fp8 scheme=2x8"

    def recipe(self):  # -> ConvertRecipe (imported lazily: converters pull numpy and more)
        from edgekit import api

        if not self.model.strip():
            raise InputError("give the model folder (a Hugging Face checkpoint with config.json)")
        from edgekit.runtime.sizing import parse_file_size

        quant, budget = self.quant.strip(), self.bpw.strip()
        size = None
        if budget and any(c.isalpha() for c in budget):  # a file size (90MB), as convert --size takes
            size = parse_file_size(budget)
            budget = ""
        try:
            bpw_value = float(budget) if budget else None
            samples = int(self.calib_samples)
        except ValueError:
            raise InputError("the budget is bits per weight (4.5) or a file size (90MB), and calibration samples "
                             "a whole number") from None
        bits = int(quant) if quant.isdigit() else None
        preset = None if bits is not None or not quant else quant.upper()
        default = api.default_bits(self.fmt)
        method = self.method
        if method == "rtn" and api.default_method(self.fmt):
            method = api.default_method(self.fmt)  # as convert does: AQLM encodes with AQLM
        calibrated = api.calibration_applies(method, bpw_value, size)
        calib = api.CalibConfig(source=self.calib.strip() or "self", samples=samples) if calibrated else None
        return api.ConvertRecipe(bits=None if preset or bpw_value or size else (bits or default), preset=preset,
                                 bpw=bpw_value, size=size, method=method, calib=calib,
                                 extra=api.format_options(self.options.split()))


def _names(kind: str) -> list[str]:
    if kind == "formats":
        from edgekit.converters.formats.base import FORMATS

        return FORMATS.names()
    from edgekit.converters.quantize.base import QUANTIZERS

    return QUANTIZERS.names()


class ConvertScreen(Screen[None]):
    BINDINGS = [Binding("ctrl+r", "start", "Start"), Binding("escape", "cancel", "Cancel")]

    def __init__(self) -> None:
        super().__init__(id="convert")
        self.job: CancellableProgress | None = None
        self.last_output: Path | None = None
        self.outcome = ""  # "done", "cancelled" or "failed" once a run ends
        self._step = ""
        self._bits_default = "4"  # the bits field's default for the selected format

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="convert-form"):
            with Horizontal(classes="field"):
                yield Label("model folder")
                yield Input(placeholder="./SmolLM2-135M (a Hugging Face folder)", id="cv-model",
                            tooltip="a folder with config.json and safetensors")
            with Horizontal(classes="field"):
                yield Label("format")
                yield Select([(n, n) for n in _names("formats")], value="gguf", allow_blank=False, id="cv-format")
            with Horizontal(classes="field"):
                yield Label("bits or type")
                yield Input("4", placeholder="2..8 or a type: Q4_K_M, Q8_0, F16", id="cv-quant")
            with Horizontal(classes="field"):
                yield Label("or a budget")
                yield Input("", placeholder="4.5 (bits a weight) or a size: 90MB", id="cv-bpw",
                            tooltip="a type per tensor, chosen by sensitivity to fit the budget")
            with Horizontal(classes="field"):
                yield Label("method")
                yield Select([(n, n) for n in _names("methods")], value="rtn", allow_blank=False, id="cv-method")
            with Horizontal(classes="field"):
                yield Label("calibration")
                yield Input("self", placeholder="'self' or a text file", id="cv-calib")
                yield Label("samples", classes="inline")
                yield Input("32", id="cv-samples", type="integer", tooltip="calibration samples")
            with Horizontal(classes="field"):
                yield Label("options")
                yield Input("", placeholder="as convert -O, e.g. lm_head=int8 (ONNX)", id="cv-options",
                            tooltip="format options, as convert -O: embedding=fp8 (AQLM), lm_head=int8 (ONNX)")
            with Horizontal(classes="field"):
                yield Label("output")
                yield Input("", placeholder="default: the model library (edgekit ls)", id="cv-output")
                yield Checkbox("replace", id="cv-force")
            with Horizontal(classes="field buttons"):
                yield Button("Convert (Ctrl+R)", variant="primary", id="cv-start")
                yield Button("Cancel (Esc)", variant="error", id="cv-cancel", disabled=True)
        yield Static("", id="cv-step", markup=False)
        yield ProgressBar(total=1, id="cv-progress", show_eta=False)
        yield RichLog(id="cv-log", max_lines=200, wrap=True, markup=False)
        yield KeysFooter()

    def on_mount(self) -> None:
        self.query_one("#cv-model", Input).focus()

    @on(Select.Changed, "#cv-format")
    def _format_changed(self, event: Select.Changed) -> None:
        """An untouched bits field follows the format's default (AQLM: 2, the others: 4), as ``convert`` does."""
        from edgekit import api

        quant = self.query_one("#cv-quant", Input)
        new = str(api.default_bits(str(event.value)))
        if quant.value.strip() in ("", self._bits_default):
            quant.value = new
        self._bits_default = new

    def form(self) -> ConvertForm:
        q = self.query_one
        return ConvertForm(
            model=q("#cv-model", Input).value, fmt=str(q("#cv-format", Select).value),
            quant=q("#cv-quant", Input).value, bpw=q("#cv-bpw", Input).value,
            method=str(q("#cv-method", Select).value), calib=q("#cv-calib", Input).value,
            calib_samples=q("#cv-samples", Input).value or "32", output=q("#cv-output", Input).value.strip(),
            force=q("#cv-force", Checkbox).value, options=q("#cv-options", Input).value,
        )

    @on(Button.Pressed, "#cv-start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#cv-cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    def action_start(self) -> None:
        if self.job is not None:
            self.notify("a conversion is already running (Esc cancels it)", severity="warning")
            return
        form = self.form()
        try:
            recipe = form.recipe()
        except EdgekitError as exc:
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        self.job = CancellableProgress(lambda d, n, t: self.app.call_from_thread(self._progress, d, n, t),
                                       "the conversion")
        self.outcome = ""
        self._step = ""
        self.query_one("#cv-start", Button).disabled = True
        self.query_one("#cv-cancel", Button).disabled = False
        self.query_one("#cv-progress", ProgressBar).update(total=None, progress=0)
        log = self.query_one("#cv-log", RichLog)
        log.write(f"converting {form.model} to {form.fmt} ({recipe.preset or recipe.bpw or recipe.bits}, "
                  f"{recipe.method})...")
        self._set_step("starting (loading the checkpoint)...")
        self._run(form, recipe, self.job)

    @work(thread=True, group="convert")
    def _run(self, form: ConvertForm, recipe: object, job: CancellableProgress) -> None:
        from edgekit import api

        t0 = time.perf_counter()
        try:
            art = api.convert(Path(form.model).expanduser(), form.fmt, output=form.output or None,
                              recipe=recipe, force=form.force, progress=job)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - reported on screen, the app goes on
            self.app.call_from_thread(self._finished, None, exc, time.perf_counter() - t0)
            return
        self.app.call_from_thread(self._finished, art.path, None, time.perf_counter() - t0)

    def _progress(self, desc: str, done: int, total: int) -> None:
        self.query_one("#cv-progress", ProgressBar).update(total=max(total, 1), progress=done)
        self._set_step(f"{desc} ({done}/{total})")
        step = desc.split(":")[0] if desc.startswith("layer") else desc.split(" ")[0]
        if step != self._step:  # one log line per phase, not per tensor
            self._step = step
            self.query_one("#cv-log", RichLog).write(desc)

    def _finished(self, path: Path | None, exc: BaseException | None, seconds: float) -> None:
        self.job = None
        self.query_one("#cv-start", Button).disabled = False
        self.query_one("#cv-cancel", Button).disabled = True
        log = self.query_one("#cv-log", RichLog)
        settle(self.query_one("#cv-progress", ProgressBar), exc is None)
        if isinstance(exc, Cancelled):
            self.outcome = "cancelled"
            self._set_step("cancelled: nothing was written")
            log.write(str(exc))
            return
        if exc is not None:
            self.outcome = "failed"
            self._set_step("failed (see the error)")
            log.write(f"failed: {exc}")
            self.app.show_error(exc)  # type: ignore[attr-defined]
            return
        assert path is not None
        self.outcome = "done"
        self.last_output = path
        self._set_step(f"done: {path}")
        log.write(f"wrote {path} in {seconds:.1f} s; it is on the Artifacts screen (F3)")
        self.app.artifact_added(path)  # type: ignore[attr-defined]
        self.notify(f"wrote {path.name}", markup=False)

    def action_cancel(self) -> None:
        if self.job is not None and not self.job.cancelled:
            self.job.cancel()
            self._set_step("cancelling at the next step...")

    def _set_step(self, text: str) -> None:
        self.query_one("#cv-step", Static).update(text)
