"""``edgekit serve``: the OpenAI-compatible HTTP server. The web stack is imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.flags import beyond_trained_note, typed_flags
from edgekit.cli.ui import (
    DRAFT_HELP,
    EXPERTS_HELP,
    NDRAFT_HELP,
    SINKS_HELP,
    SPEC_HELP,
    WINDOW_HELP,
    Terminated,
    decoding_options,
    err,
    handle_errors,
    say,
)


@handle_errors
def serve(
    cli: typer.Context,
    artifacts: list[Path] = typer.Argument(..., metavar="ART...", help="Artifact folders (or model files) to serve; clients pick one "
                                           "by folder name as 'model'.", show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; only "
                             "with --api-key on a network you trust)."),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free one, printed at start)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="EDGEKIT_API_KEY", show_default=False,
                                       help="Require 'Authorization: Bearer KEY' on every request."),
    cors: list[str] | None = typer.Option(None, "--cors", metavar="<origin>", show_default=False,
                                          help="Let web pages from this origin (e.g. http://localhost:3000; repeatable; "
                                          "'*': any site) call the server from a browser: CORS preflights are "
                                          "answered and answers carry Access-Control-Allow-Origin. Off by default, "
                                          "so no website you visit can use the server; --api-key still applies."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens one request may generate (and the "
                                   "default when it asks for none); at most --ctx, which it defaults to where "
                                   "smaller."),
    parallel: int = typer.Option(1, "--parallel", "-np", help="Generations at once per model, decoded together in "
                                 "one batch (llama.cpp) or each on its own instance; further requests queue."),
    no_batch: bool = typer.Option(False, "--no-batch", help="Give each of the --parallel generations its own "
                                  "instance and threads instead of one batch (llama.cpp)."),
    exact_batch: bool = typer.Option(False, "--exact-batch", help="Keep each batched sequence in a KV-cache stream of "
                                     "its own: a greedy answer is then what it would be alone, at about half the "
                                     "throughput of the shared cache (llama.cpp)."),
    idle_unload: float = typer.Option(300, "--idle-unload", help="Seconds before an unused model instance is "
                                      "unloaded (0: never)."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds a request may take, queueing included (then 504)."),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes (then 413)."),
    grace: float = typer.Option(10, "--grace", help="On Ctrl-C/SIGTERM, seconds running answers get to finish; "
                                "then each ends with an error event."),
    ctx: int = typer.Option(2048, "--ctx", "-c", help="Context length of each instance."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads in all, shared among the --parallel "
                                       "instances (default: the physical cores; with --parallel 1, the "
                                       "backend's own default).", show_default=False),
    backend: str | None = typer.Option(None, "--backend", help="Runtime to use (default: the preferred one for "
                                       "each artifact's format).", show_default=False),
    draft: Path | None = typer.Option(None, "--draft", help=DRAFT_HELP + " With one artifact.", show_default=False),
    speculative: str | None = typer.Option(None, "--speculative", help=SPEC_HELP, show_default=False),
    n_draft: int | None = typer.Option(None, "--n-draft", help=NDRAFT_HELP, show_default=False),
    kv_window: int | None = typer.Option(None, "--kv-window", help=WINDOW_HELP + " A conversation may then grow "
                                         "past --ctx.", show_default=False),
    kv_sinks: int | None = typer.Option(None, "--kv-sinks", help=SINKS_HELP, show_default=False),
    experts: str | None = typer.Option(None, "--experts", help=EXPERTS_HELP + " The served mixture-of-experts "
                                       "files run this many; the others as they are.", show_default=False,
                                       metavar="<n|all>"),
) -> None:
    """Serve artifacts over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Models load on the first request that names them and unload after --idle-unload seconds unused (with
    --draft, --speculative or --kv-window they load at start, so a bad pairing is refused before clients come).
    Ctrl-C (or SIGTERM) lets running answers finish for a few seconds, then stops.

    Examples:
      edgekit serve smollm2-135m-gguf-q4_k_m
      edgekit serve ./smol-q4 ./smol-onnx --port 8000 --parallel 4 --api-key secret
      edgekit serve ./smol-q8_0 --draft ./smol-draft --kv-window 1024   # speculative, long chats
      edgekit serve ./smol-q4-sparse --experts 8                      # a hot/cold file, 8 clusters a token
      edgekit serve ./smol-q4 --api-key secret --cors http://localhost:3000  # a web UI's origin
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m-gguf-q4_k_m", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from edgekit import api
    from edgekit.artifact import Artifact
    from edgekit.errors import require
    from edgekit.runtime.base import Backend, backend_for_format, backend_options, is_checkpoint_folder
    from edgekit.runtime.hostinfo import check_threads
    from edgekit.runtime.serve.config import ServeConfig, model_ids

    _check_env_key(cli)
    check_threads(threads)  # instances load on the first request: a bad -t would fail there, not now
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        say(err, f"--host {host} serves beyond this machine with no --api-key: anyone who reaches the port can "
                 "use the models; give --api-key (or EDGEKIT_API_KEY)", "warning:", "yellow")
    require("starlette", "serve")
    require("uvicorn", "serve")
    models = model_ids(artifacts)
    per_model: dict[str, dict[str, object]] = {}
    # a wrong path or an unrunnable format fails now, not on the first request; a Hugging Face folder runs on
    # the PyTorch reference, one sequence per instance
    formats = {mid: "hf" if is_checkpoint_folder(path) else Artifact.open(path).format for mid, path in models.items()}
    for mid in models:
        if "ctx" in typed_flags(cli, "ctx") and not kv_window and (
                note := beyond_trained_note(models[mid], ctx, "replies that reach past it may lose coherence")):
            say(err, f"{mid}: {note}", "note:", "dim")
        if formats[mid] == "hf":
            continue
        cls = backend_for_format(formats[mid], backend)
        if parallel > 1 and not no_batch and "n_seq" in backend_options(cls):
            per_model[mid] = {"n_seq": parallel, "n_threads": threads}  # one instance batches them all
            if exact_batch:
                per_model[mid]["exact_batch"] = True
        elif "n_seq" in backend_options(cls):
            # one sequence per llama.cpp instance: flash attention (llama.cpp's own default today, as fast
            # here), so a request's predicted output is verified in batches as one-token steps would decode it
            per_model[mid] = {"flash_attn": True}
    if experts is not None:  # checked now, for each mixture-of-experts file served; the others are left as they are
        from edgekit.runtime.llamacpp_decoding import experts_options
        from edgekit.runtime.memory import read_shape

        moe = [m for m in models if formats[m] == "gguf" and read_shape(Artifact.open(models[m]).model_file).n_expert]
        if not moe:
            experts_options(next(iter(models.values())), experts)  # raises, saying why
        for mid in moe:
            per_model.setdefault(mid, {}).update(experts_options(models[mid], experts))
    decoding = decoding_options(draft, speculative, n_draft, kv_window, kv_sinks)
    _check_decoding(decoding, formats, backend, per_model)
    if "max_tokens" not in typed_flags(cli, "max_tokens") and not kv_window and ctx > 0:
        max_tokens = min(max_tokens, ctx)  # the default fits a small --ctx; a typed one above it is refused
    options: dict[str, object] = {"n_ctx": ctx, "n_threads": _threads_each(threads, parallel), **decoding}
    if backend:
        options["backend"] = backend
    config = ServeConfig(models=models, host=host, port=port, api_key=api_key, max_tokens=max_tokens,
                         parallel=parallel, idle_unload=idle_unload, timeout=timeout, max_body=max_body,
                         shutdown_timeout=grace, backend_options=options, model_options=per_model,
                         cors=tuple(cors or ()))
    from contextlib import ExitStack

    from edgekit.runtime.processes import announce_server
    from edgekit.runtime.serve.app import serve as run_server

    listed = ExitStack()  # `edgekit ps` lists the server while it listens
    started: list[str] = []  # the server listened: only then is "stopped" said (a port in use stops nothing)

    def ready(url: str) -> None:
        started.append(url)
        listed.enter_context(announce_server(url, {m: str(p) for m, p in models.items()}))
        say(err, f"{url}/v1  ({', '.join(models)}; {parallel} at once per model; Ctrl-C stops)", "serving",
            "green")

    preloaded: dict[str, Backend] = {}
    try:  # with drafting or a window every model loads now: a bad pairing is refused before clients come
        for mid, path in models.items() if decoding else ():
            what = f" with the draft {draft}" if draft else (f" ({speculative} drafting)" if speculative else "")
            say(err, f"{mid}{what}", "loading")
            preloaded[mid] = api.open_backend(path, **config.options_for(mid))
    except BaseException:
        for instance in preloaded.values():
            instance.close()
        raise
    try:
        run_server(config, api.open_backend, on_ready=ready, preloaded=preloaded)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C once it has shut down: for a server that is the normal way to stop
    except Terminated as exc:  # SIGTERM / SIGHUP, re-raised by uvicorn once it has shut down: exits 143 / 129,
        exc.said = bool(started)  # and "stopped; every model unloaded" below is the last line, as for Ctrl-C
        raise
    finally:  # also when it re-raises SIGTERM, which exits through main's handler (status 143)
        for instance in preloaded.values():
            instance.close()  # already closed by the pool, unless the server never started
        listed.close()
        if started:
            say(err, "stopped; every model unloaded", "serve", "green")


def _check_env_key(cli: typer.Context) -> None:
    """An EDGEKIT_API_KEY that is set but blank (a script's unset ``$SECRET``) is refused as ``--api-key ""`` is:
    Click reads an empty variable as no key at all, which would serve with no key."""
    import os

    from edgekit.errors import InputError

    key = os.environ.get("EDGEKIT_API_KEY")
    given = getattr(cli.get_parameter_source("api_key"), "name", "") == "COMMANDLINE"  # Typer vendors Click's enum
    if key is not None and not key.strip() and not given:
        raise InputError("EDGEKIT_API_KEY is set but empty; set it to a secret, or unset it to serve without one")


def _check_decoding(decoding: dict[str, object], formats: dict[str, str], backend: str | None,
                    per_model: dict[str, dict[str, object]]) -> None:
    """Drafting and KV windows only where every served model's backend takes them, one sequence per
    instance (a one-line error with the fix before anything loads)."""
    if not decoding:
        return
    from edgekit.errors import InputError
    from edgekit.runtime.base import backend_for_format, backend_options
    from edgekit.runtime.speculative import drafting_mode

    drafting_mode(decoding.get("draft"), decoding.get("speculative"), decoding.get("n_draft"))  # a bad mode, now
    flags = "/".join("--" + k.replace("_", "-") for k in decoding)
    if "draft" in decoding and len(formats) > 1:
        raise InputError("--draft drafts for one model: serve that artifact alone with it (and the others from "
                         "another edgekit serve)")
    for mid, fmt in formats.items():
        if per_model.get(mid, {}).get("n_seq"):
            raise InputError(f"with {flags} an instance decodes one sequence, and --parallel batches them in one: "
                             "add --no-batch (an instance per generation) or serve with --parallel 1")
        cls = backend_for_format(fmt, backend)
        missing = [k for k in decoding if k not in backend_options(cls)]
        if missing:
            raise InputError(f"{mid} runs on the {cls.name} backend, which has no "
                             f"{'/'.join('--' + k.replace('_', '-') for k in missing)}; serve it without them, "
                             "or convert it to GGUF or ONNX (edgekit convert MODEL --to gguf)")


def _threads_each(threads: int | None, parallel: int) -> int | None:
    """Each instance's share of the threads, so that --parallel instances do not oversubscribe the cores."""
    if parallel <= 0:
        return threads  # ServeConfig refuses it with the message
    if threads is None and parallel == 1:
        return None  # the backend's own default
    if threads is None:
        import psutil

        threads = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return max(1, threads // parallel)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
