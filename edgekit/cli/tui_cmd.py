"""``edgekit tui`` and ``edgekit chat``: the Textual app. Textual is imported only when they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgekit.cli.flags import THREADS_HELP
from edgekit.cli.ui import EXPERTS_HELP, decoding_options, err, handle_errors, refuse_without_terminal, say


def _run_app(folder: Path | None, chat: Path | None, start: str | None, ctx: int, threads: int | None,
             offload: str = "none", decoding: dict[str, Any] | None = None) -> None:
    from edgekit.errors import InputError, require
    from edgekit.runtime.hostinfo import check_threads

    check_threads(threads)  # in the flag's words, before the app starts
    if offload not in ("none", "auto"):
        raise InputError("--offload takes 'auto' or 'none'")

    require("textual", "tui")
    require("textual_plotext", "tui")
    art = None
    if chat is not None:
        from edgekit.artifact import Artifact

        art = Artifact.open(chat)  # a wrong path fails here, as one line, before the screen is taken over
    if folder is None:
        # the folder that holds the artifact (a bare model file's own folder)
        beside = None if art is None else art.path if art.bare_file is not None else art.path.parent
        folder = _library_folder(beside)
    if not folder.expanduser().is_dir():
        raise InputError(f"--dir {folder} is not a folder; give the folder that holds your artifacts")
    # without a terminal (a script, a CI job) the app would wait for keys forever: one line instead
    refuse_without_terminal("the terminal app", str(chat) if chat is not None else "ARTIFACT")
    from edgekit.tui.app import EdgekitApp

    options = {"n_ctx": ctx, "n_threads": threads, "offload": offload, **(decoding or {})}
    note = EdgekitApp(folder=folder, chat=chat, start=start, backend_options=options).run()
    if note:  # a profile stopped by quitting: where its rows went, left on the terminal
        say(err, note, "note:", "yellow")


def _library_folder(beside: Path | None) -> Path:
    """The folder the Artifacts screen lists by default: the model library, made if need be. Chat with an
    artifact given by path needs no library: where that cannot be made, the screen lists the artifact's own
    folder instead of refusing to chat."""
    from edgekit import library
    from edgekit.errors import EdgekitError
    from edgekit.fsutil import make_dir

    try:
        path = library.store_dir()
        return path if path.is_dir() else make_dir(path, "set EDGEKIT_MODELS to another folder (or give --dir)")
    except EdgekitError:
        if beside is None:
            raise
        return beside


@handle_errors
def tui(
    folder: Path | None = typer.Option(None, "--dir", "-d", help="Folder the Artifacts screen lists (default: the "
                                       "model library, see 'edgekit ls').", show_default=False),
    screen: str = typer.Option("artifacts", "--screen", help="First screen: chat, artifacts, convert, profile, devices."),
    ctx: int = typer.Option(2048, "--ctx", "-c", help="Context length for chat."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    offload: str = typer.Option("none", "--offload", help="'auto': chat and profile with the offload planner's "
                                "GPU layers and overrides for this host (`edgekit plan`)."),
    speculative: str | None = typer.Option(None, "--speculative", help="'ngram': chat drafts from the conversation "
                                           "itself (lossless)."),
    kv_window: int | None = typer.Option(None, "--kv-window", help="Chat keeps at most this many tokens in the KV "
                                         "cache (attention sinks + recent): it never runs out of context."),
    kv_sinks: int | None = typer.Option(None, "--kv-sinks", help="With --kv-window: first tokens always kept (4)."),
) -> None:
    """The terminal app: chat, live profiling, artifacts, conversion, devices (F1 for help).

    Examples:
      edgekit tui
      edgekit tui --dir ~/models --screen convert
      edgekit tui --kv-window 1024 --speculative ngram
    """
    from edgekit.errors import InputError

    if screen not in ("chat", "artifacts", "convert", "profile", "devices"):
        raise InputError(f"--screen {screen!r}: choose chat, artifacts, convert, profile or devices")
    _run_app(folder, None, screen, ctx, threads, offload, decoding_options(None, speculative, None, kv_window, kv_sinks))


@handle_errors
def chat(
    artifact: Path = typer.Argument(..., help="Artifact folder or model file."),
    folder: Path | None = typer.Option(None, "--dir", "-d", help="Folder the Artifacts screen lists (default: the "
                                       "model library, see 'edgekit ls').", show_default=False),
    ctx: int = typer.Option(2048, "--ctx", "-c", help="Context length."),
    threads: int | None = typer.Option(None, "--threads", "-t", help=THREADS_HELP),
    offload: str = typer.Option("none", "--offload", help="'auto': GPU layers and overrides from `edgekit plan`."),
    draft: Path | None = typer.Option(None, "--draft", help="A smaller model with the same tokenizer, in the "
                                      "target's format (GGUF or ONNX): speculative decoding (lossless, faster)."),
    speculative: str | None = typer.Option(None, "--speculative", help="'ngram': draft from the conversation itself."),
    kv_window: int | None = typer.Option(None, "--kv-window", help="Keep at most this many tokens in the KV cache "
                                         "(attention sinks + recent): an unbounded chat in bounded memory."),
    kv_sinks: int | None = typer.Option(None, "--kv-sinks", help="With --kv-window: first tokens always kept (4)."),
    experts: str | None = typer.Option(None, "--experts", help=EXPERTS_HELP, show_default=False, metavar="<n|all>"),
) -> None:
    """Chat with an artifact in the terminal app (streaming, Esc stops, history kept per artifact).

    Examples:
      edgekit chat smollm2-135m-gguf-q4_k_m
      edgekit chat ./smol-q8_0 --draft ./smol-draft              # speculative decoding
      edgekit chat ./smol-q4 --kv-window 1024 --kv-sinks 4       # unbounded chat in bounded memory
      edgekit chat ./smol-q4-sparse --experts 8                  # 8 cold clusters a token
    """
    decoding = decoding_options(draft, speculative, None, kv_window, kv_sinks)
    if experts is not None:
        from edgekit.runtime.llamacpp_decoding import experts_options

        experts_options(artifact, experts)  # a bad value or a file without experts: one line, before the screen
        decoding["experts"] = experts
    _run_app(folder, artifact, "chat", ctx, threads, offload, decoding)


def register(app: typer.Typer) -> None:
    app.command("tui")(tui)
    app.command("chat")(chat)
