"""What every command line shares: ``-h``, ``--version``, ``-t``'s help, flags shown without a value, and a
hint when a short flag is typed with the meaning it had before it followed llama.cpp's.

edgekit's short flags mean what they mean in llama.cpp (``-t`` threads, ``-c`` context, ``-n`` tokens,
``-b`` batch, ``-s`` seed) in every command that has them, and nothing else anywhere.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

try:  # recent typer carries its own copy of click
    from typer._click.exceptions import NoSuchOption, UsageError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import NoSuchOption, UsageError  # type: ignore[no-redef]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

THREADS_HELP = ("CPU threads (default: the physical cores, fewer when other programs keep them busy: "
                "threads that share a core wait on each other).")

# Short flags that meant something else before they followed llama.cpp: command -> flag -> (long option
# it used to stand for, what the flag is now or None where it is gone).
RETIRED: dict[str, dict[str, tuple[str, str | None]]] = {
    "convert": {"-t": ("--type", "--threads"), "-b": ("--bits", None)},
    "quickstart": {"-b": ("--bits", None)},
    "profile": {"-t": ("--tests", "--threads")},
    "run": {"-s": ("--system", "--seed")},
}


def edgekit_version() -> str:
    try:
        return version("edgekit")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def show_version(value: bool) -> None:
    """``--version``'s callback: print and exit before anything else is parsed."""
    if value:
        typer.echo(f"edgekit {edgekit_version()}")
        raise typer.Exit()


def retired_flag_hint(command: str, flag: str) -> str | None:
    """The one-line hint for ``flag`` typed in ``command`` with its old meaning, or None."""
    old, new = RETIRED.get(command, {}).get(flag, (None, None))
    if old is None:
        return None
    now = f"it is {new} now, as in llama.cpp" if new else "llama.cpp uses it for the batch size, so it is gone here"
    return f"hint: {flag} was short for {old}; {now}: write {old} in full"


class EdgekitGroup(TyperGroup):
    """The app's group: ``COMMAND --version`` prints the version, and a short flag typed with its old
    meaning gets a hint naming the long option, where the parser alone would only say that the value
    is not a number or that the option does not exist."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except NoSuchOption as exc:
            if exc.option_name == "--version":
                show_version(True)
            _add_hint(exc, [exc.option_name])
            raise
        except UsageError as exc:  # a bad value: hint when the option owns a retired short flag
            _add_hint(exc, list(getattr(getattr(exc, "param", None), "opts", ())))
            raise


def _add_hint(exc: UsageError, flags: list[str]) -> None:
    command = exc.ctx.info_name if exc.ctx is not None else None
    hint = next((h for f in flags if (h := retired_flag_hint(command or "", f))), None)
    if hint:
        exc.message = f"{exc.message}\n{hint}"


def flags_take_no_value() -> None:
    """Typer's rich help prints a type for every option, so a flag reads ``--force <bool>`` as if it took
    a value; a flag (and a counter) takes none, and shows none."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_edgekit", False):  # older typer shows no types
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else original(self, ctx)

    display_type_rich._edgekit = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


# Calibration sequences longer than this are a typo: --calib-seqlen 1000000000 asked PyTorch for 256 GB.
MAX_CALIB_SEQLEN = 65536
DEFAULT_CALIB_SEQLEN = 512


def typed_flags(ctx: Any, *names: str) -> set[str]:
    """Which of the parameters ``names`` the user typed on the command line (not defaults). Typer vendors
    click, so its ParameterSource is compared by name."""
    return {n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}


def trained_context(model: str | Path) -> int | None:
    """The context a Hugging Face folder's model was trained for (config.json's max_position_embeddings,
    or its text_config's), or None where it is not a readable checkpoint folder (a GGUF, a library name)."""
    import json

    try:
        cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        n = c.get("max_position_embeddings") if isinstance(c, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def artifact_trained_context(target: str | Path) -> int | None:
    """:func:`trained_context` of a checkpoint or an artifact: its folder's config.json, else a GGUF's own
    ``context_length`` (a header read); None where neither says."""
    n = trained_context(target)
    if n is not None:
        return n
    from edgekit.artifact import Artifact
    from edgekit.errors import EdgekitError

    try:
        art = Artifact.open(target)
        if art.format != "gguf":
            return trained_context(art.path)
        from edgekit.runtime.memory import read_shape

        return read_shape(art.model_file).n_ctx_train or None
    except (EdgekitError, OSError, ValueError):
        return None


def beyond_trained_note(target: str | Path, ctx: int, after: str) -> str | None:
    """The note ``--ctx`` gets when it is longer than ``target``'s trained context (for a GGUF of a sliding-window
    model, the window it was written with), ``after`` saying what that means for the command; None otherwise."""
    trained = artifact_trained_context(target)
    if trained is None or ctx <= trained:
        return None
    return f"--ctx {ctx} is beyond the {trained} tokens the model was trained for: {after}"


def check_calib_seqlen(seqlen: int, model: str | Path | None = None) -> None:
    """--calib-seqlen, checked before any work: at most :data:`MAX_CALIB_SEQLEN` tokens and, given the
    ``model``, at most its trained context (calibrating past it measures activations the model never sees)."""
    from edgekit.errors import InputError

    if seqlen > MAX_CALIB_SEQLEN:
        raise InputError(f"--calib-seqlen {seqlen} is too long (at most {MAX_CALIB_SEQLEN} tokens); the default 512 "
                         "is enough for calibration")
    trained = None if model is None else trained_context(model)
    if trained is not None and seqlen > trained and seqlen != DEFAULT_CALIB_SEQLEN:  # the default is not the user's
        raise InputError(f"--calib-seqlen {seqlen} is beyond the {trained} tokens {Path(model).name} was trained for "
                         f"(max_position_embeddings in its config.json); give --calib-seqlen {min(trained, 512)}")
