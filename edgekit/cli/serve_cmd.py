"""``edgekit serve``: the OpenAI-compatible HTTP server. The web stack is imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.ui import err, handle_errors, say


@handle_errors
def serve(
    artifacts: list[Path] = typer.Argument(..., metavar="ART...", help="Artifact folders (or model files) to serve; clients pick one "
                                           "by folder name as 'model'.", show_default=False),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; only "
                             "with --api-key on a network you trust)."),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free one, printed at start)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="EDGEKIT_API_KEY", show_default=False,
                                       help="Require 'Authorization: Bearer KEY' on every request."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", help="Most tokens one request may generate (and the "
                                   "default when it asks for none)."),
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
) -> None:
    """Serve artifacts over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Models load on the first request that names them and unload after --idle-unload seconds unused.
    Ctrl-C (or SIGTERM) lets running answers finish for a few seconds, then stops.

    Examples:
      edgekit serve smollm2-135m-gguf-q4_k_m
      edgekit serve ./smol-q4 ./smol-onnx --port 8000 --parallel 4 --api-key secret
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m-gguf-q4_k_m", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from edgekit import api
    from edgekit.artifact import Artifact
    from edgekit.errors import require
    from edgekit.runtime.base import backend_for_format, backend_options
    from edgekit.runtime.serve.config import ServeConfig, model_ids

    require("starlette", "serve")
    require("uvicorn", "serve")
    models = model_ids(artifacts)
    per_model: dict[str, dict[str, object]] = {}
    for mid, path in models.items():  # a wrong path or an unrunnable format fails now, not on the first request
        if path.is_dir() and (path / "config.json").exists() and not (path / "edgekit.json").exists():
            continue  # a Hugging Face folder: the PyTorch reference, one sequence per instance
        cls = backend_for_format(Artifact.open(path).format, backend)
        if parallel > 1 and not no_batch and "n_seq" in backend_options(cls):
            per_model[mid] = {"n_seq": parallel, "n_threads": threads}  # one instance batches them all
            if exact_batch:
                per_model[mid]["exact_batch"] = True
    options: dict[str, object] = {"n_ctx": ctx, "n_threads": _threads_each(threads, parallel)}
    if backend:
        options["backend"] = backend
    config = ServeConfig(models=models, host=host, port=port, api_key=api_key, max_tokens=max_tokens,
                         parallel=parallel, idle_unload=idle_unload, timeout=timeout, max_body=max_body,
                         shutdown_timeout=grace, backend_options=options, model_options=per_model)
    from contextlib import ExitStack

    from edgekit.runtime.processes import announce_server
    from edgekit.runtime.serve.app import serve as run_server

    listed = ExitStack()  # `edgekit ps` lists the server while it listens

    def ready(url: str) -> None:
        listed.enter_context(announce_server(url, {m: str(p) for m, p in models.items()}))
        say(err, f"{url}/v1  ({', '.join(models)}; {parallel} at once per model; Ctrl-C stops)", "serving",
            "green")

    try:
        run_server(config, api.open_backend, on_ready=ready)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C once it has shut down: for a server that is the normal way to stop
    finally:  # also when it re-raises SIGTERM, which exits through main's handler (status 143)
        listed.close()
        say(err, "stopped; every model unloaded", "serve", "green")


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
