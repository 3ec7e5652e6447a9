"""What an ``edgekit serve`` process allows: one frozen config, built by the CLI, taken by the app."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import InputError


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs.

    models: model id -> artifact path (the id is the artifact folder's name; clients send it as ``model``).
    host / port: where to listen; loopback by default, so nothing outside this machine can reach it.
    api_key: when set, every request needs ``Authorization: Bearer <api_key>`` (else 401).
    max_tokens: the most tokens one request may generate, and the default when a request names none; at most
    the context (``backend_options``' ``n_ctx``) unless a KV window lets answers run past it. A request whose
    prompt leaves less room than it asks for is answered up to the context's end (finish_reason ``length``).
    parallel: generations that run at once per model (decoded in one batch where the backend batches
    sequences, else each on its own loaded instance); more requests wait in a queue, first come first served.
    idle_unload: seconds an instance may sit unused before it is unloaded (0: never).
    timeout: seconds a request may take, waiting in the queue included (then 504, or an error event).
    max_body: the largest request body in bytes (then 413).
    shutdown_timeout: on SIGINT/SIGTERM, seconds streams get to finish before they are cancelled.
    backend_options: passed to every backend as it loads (n_ctx, n_threads, ...).
    model_options: per model id, options over ``backend_options`` (``n_seq``: sequences one instance
    batches, so it takes that many generations at once).
    cors: origins (``scheme://host[:port]``, or ``*`` for any) whose browser pages may call the server; none by
    default, so that no website the user visits can use a server on their machine.
    """

    models: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_tokens: int = 2048
    parallel: int = 1
    idle_unload: float = 300.0
    timeout: float = 600.0
    max_body: int = 1 << 20
    shutdown_timeout: float = 10.0
    backend_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cors: tuple[str, ...] = ()

    def options_for(self, model_id: str) -> dict[str, Any]:
        return {**self.backend_options, **self.model_options.get(model_id, {})}
    def __post_init__(self) -> None:
        if not self.models:
            raise InputError("serve needs at least one artifact: edgekit serve smollm2-135m-gguf-q4_k_m")
        if not 0 <= self.port < 65536:
            raise InputError(f"--port {self.port} is not a TCP port; use 1..65535, or 0 for any free one")
        if self.max_tokens <= 0 or self.parallel <= 0:
            raise InputError("--max-tokens and --parallel must be > 0")
        from edgekit.validate import check_number

        # seconds: NaN and infinities slip past `x <= 0` and then every request times out at once (or never)
        check_number(self.timeout, "--timeout", above=0, note=" (seconds a request may take)")
        check_number(self.idle_unload, "--idle-unload", at_least=0, note=" (seconds; 0 never unloads)")
        check_number(self.shutdown_timeout, "--grace", at_least=0, note=" (seconds)")
        ctx = self.backend_options.get("n_ctx")
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1):
            raise InputError(f"--ctx must be a whole number of tokens >= 1, got {ctx!r}")
        self._check_max_tokens()
        if self.max_body <= 0:
            raise InputError(f"--max-body must be > 0, got {self.max_body}")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("--api-key is empty; give a secret, or drop the option to serve without one")
        # browsers send the scheme and host in lower case
        object.__setattr__(self, "cors", tuple(origin.lower() for origin in self.cors))
        for origin in self.cors:
            _check_origin(origin)

    def _check_max_tokens(self) -> None:
        """A limit above the context can never be reached: the prompt and the answer share it. One equal to it
        (the defaults, 2048 each) is let through: a request whose prompt leaves less room is cut at the
        context's end, with finish_reason "length", as one cut at its own max_tokens is."""
        for mid in self.models:
            options = self.options_for(mid)
            ctx = options.get("n_ctx")
            if isinstance(ctx, int) and not options.get("kv_window") and self.max_tokens > ctx:
                raise InputError(f"--max-tokens {self.max_tokens} can never be reached with --ctx {ctx}, which holds "
                                 f"the prompt and the answer together; give --max-tokens {ctx} or less, a larger "
                                 "--ctx, or --kv-window to let answers run past the context")


def _check_origin(origin: str) -> None:
    """A browser sends its page's origin as ``scheme://host[:port]``, nothing after: one written with a path or
    a trailing slash would never match, and the pages it was meant for would fail with no hint why."""
    if origin == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", origin):
        return
    head = re.match(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", origin)
    fix = f"--cors {head[0]}" if head else "--cors http://localhost:3000 (the page's scheme, host and port)"
    raise InputError(f"--cors {origin!r} is not an origin as browsers send it (scheme://host[:port], no path or "
                     f"trailing slash); give {fix}, or --cors '*' for any page")


def model_ids(paths: list[Path]) -> dict[str, Path]:
    """Each artifact under its folder name (a model file under its stem); two with one name are refused."""
    ids: dict[str, Path] = {}
    from edgekit import library

    for given in paths:
        p = library.resolve(given)  # a bare name is an artifact of the model library
        if not p.exists():
            raise InputError(f"{p} does not exist; give an artifact folder (edgekit convert writes one) or an "
                             f"artifact's name{library.not_found_hint(given)}")
        name = p.stem if p.is_file() else p.resolve().name
        if name in ids:
            raise InputError(f"two artifacts are both named {name!r} ({ids[name]} and {p}); clients pick a model by "
                             "folder name, so rename or copy one of them")
        ids[name] = p
    return ids
