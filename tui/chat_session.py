"""A conversation with one artifact: history kept per artifact on disk, the backend loaded lazily,
generation streamed with cancel (no Textual here; the chat screen drives it from a worker thread).

The backend is not thread-safe (one call at a time), so every use goes through ``_lock``; a crash
drops the backend and the next message loads it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.artifact import Artifact
from edgekit.errors import BackendCrashed, DiskFullError, EdgekitError
from edgekit.fslimits import is_disk_full
from edgekit.fsutil import atomic_file
from edgekit.library import chat_file
from edgekit.runtime.base import Backend, GenerationStats, SamplingConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves are not serialized
    fcntl = None  # type: ignore[assignment]

# Empty: the model's chat template then puts in its own default system prompt (SmolLM2 names itself),
# which a pre-filled one silently replaced.
DEFAULT_SYSTEM = ""
#: conversations kept per artifact besides the newest: those of other chats with it that went their own way
KEEP_OTHERS = 8


def history_path(artifact: Path) -> Path:
    """Where the conversation with ``artifact`` is kept: one JSON file per artifact path."""
    path = chat_file(artifact)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the chats folder's lock: two chats saving at once then each see what the other wrote."""
    fd = -1
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # closing lets go of the lock


def _merged(data: Any, mine: dict[str, Any]) -> dict[str, Any]:
    """The history file after ``mine`` (one chat's conversation, with its ``session``) is saved into ``data``
    (what the file held): ``mine`` at the top, which the next chat opens with; under ``others`` the
    conversations other chats with the artifact saved meanwhile, newest first, less those ``mine`` continues
    (its messages start with all of theirs)."""
    data = data if isinstance(data, dict) else {}
    found = [data, *(o for o in data.get("others") or [] if isinstance(o, dict))]
    others = []
    for conv in found:
        msgs = conv.get("messages")
        if conv.get("session") == mine["session"] or not isinstance(msgs, list):
            continue
        if mine["messages"][:len(msgs)] == msgs:
            continue  # nothing in it that mine lacks
        others.append({k: conv.get(k) for k in ("session", "system", "messages")})
    return {**mine, "others": others[:KEEP_OTHERS]}


def _turns(messages: Any) -> list[dict[str, str]]:
    """The user and assistant turns of a saved conversation (anything else in the file is left out)."""
    return [{"role": m["role"], "content": str(m.get("content", ""))} for m in messages or []
            if isinstance(m, dict) and m.get("role") in ("user", "assistant")] if isinstance(messages, list) else []


@dataclass
class LiveStats:
    """What the screen shows while tokens stream: counts, tokens/s so far, context use."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0
    n_ctx: int = 0
    stop_reason: str = ""
    template: str = ""
    #: speculative decoding: share of drafted tokens the target kept (None: no drafting), and how many
    acceptance: float | None = None
    drafted: int = 0
    #: the attention-sink KV window: its size (0: none), tokens it holds, tokens it has evicted
    kv_window: int = 0
    kv_cells: int = 0
    kv_evicted: int = 0

    @property
    def context_used(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    def take_decoding(self, extra: dict[str, Any]) -> None:
        """Acceptance and KV-window figures from a finished generation's ``GenerationStats.extra``."""
        spec = extra.get("speculative") or {}
        if spec.get("mode") not in (None, "none"):
            self.acceptance, self.drafted = spec.get("acceptance"), int(spec.get("drafted") or 0)
        kv = extra.get("kv") or {}
        if kv.get("window"):
            self.kv_window, self.kv_cells, self.kv_evicted = int(kv["window"]), int(kv["cells"]), int(kv["evicted"])


@dataclass
class ChatSession:
    """The conversation with one artifact. ``options`` go to the backend (n_ctx, n_threads...);
    ``offload="auto"`` among them adds the offload planner's GPU layers and overrides for this host."""

    artifact: Artifact
    options: dict[str, Any] = field(default_factory=dict)
    system: str = DEFAULT_SYSTEM
    messages: list[dict[str, str]] = field(default_factory=list)
    backend: Backend | None = None
    #: Why the offload planner split the model as it did (``offload="auto"``), once loaded.
    offload_reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: False once the artifact is deleted: nothing is written for it any more (a reply ending later included)
    keep_history: bool = True
    #: why the history could not be saved (a full or read-only home): the chat goes on without it
    history_error: str = ""
    _history_told: bool = field(default=False, repr=False)
    #: tells this chat's conversation in the history file from another chat's with the same artifact
    _session: str = field(default_factory=lambda: secrets.token_hex(6), repr=False)

    @classmethod
    def open(cls, target: str | Path, **options: Any) -> ChatSession:
        """Open ``target`` (artifact folder or model file) and its saved history, if any."""
        art = Artifact.open(target)
        session = cls(artifact=art, options=options)
        session._load_history()
        return session

    @property
    def key_path(self) -> Path:
        return self.artifact.bare_file or self.artifact.path

    # -- history ------------------------------------------------------------------------------

    def _read_history(self) -> dict[str, Any]:
        try:
            data = json.loads(history_path(self.key_path).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _load_history(self) -> None:
        data = self._read_history()
        self.system = str(data.get("system", self.system))
        self.messages = _turns(data.get("messages"))

    def conversations(self) -> list[dict[str, Any]]:
        """The other conversations kept with this artifact, newest first: those other chats with it saved and
        those this chat left (:meth:`switch_to`), less any this one continues. Each is a dict with ``system``
        and ``messages`` (user and assistant turns), to give to :meth:`switch_to`."""
        mine = {"session": self._session, "system": self.system, "messages": self.messages}
        return [{"session": c.get("session"), "system": str(c.get("system") or ""), "messages": _turns(c["messages"])}
                for c in _merged(self._read_history(), mine)["others"] if _turns(c["messages"])]

    def switch_to(self, conversation: dict[str, Any] | None) -> None:
        """Keep this conversation among the others and go on with ``conversation`` (one of
        :meth:`conversations`), or with a new, empty one (None; the system prompt stays). The conversation
        taken up is not kept twice: saved under a new session, it continues the kept copy, which goes."""
        self.save()
        self._session = secrets.token_hex(6)
        if conversation is None:
            self.messages = []
        else:
            self.system = str(conversation.get("system") or "")
            self.messages = _turns(conversation.get("messages"))
        self.save()

    def save(self) -> None:
        """Write the history atomically, keeping what another chat with the same artifact saved (see
        :func:`_merged`). A full or read-only home only loses the history: the reason is kept in
        ``history_error`` (for :meth:`history_notice`), and the chat goes on."""
        if not self.keep_history:
            return
        mine = {"artifact": str(self.key_path.resolve()), "session": self._session, "system": self.system,
                "messages": self.messages}
        try:
            dest = history_path(self.key_path)
            with _locked(dest.parent):
                try:
                    data = json.loads(dest.read_text())
                except (OSError, ValueError):
                    data = {}
                with atomic_file(dest) as tmp:
                    tmp.write_text(json.dumps(_merged(data, mine), indent=1))
        except (OSError, EdgekitError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            full = isinstance(exc, DiskFullError) or is_disk_full(exc)
            why = "the disk is full" if full else getattr(cause, "strerror", None) or str(exc)
            self.history_error = (f"the chat history is not being saved ({why}); the chat goes on without it: free "
                                  "space in edgekit's home, or set EDGEKIT_HOME to a writable folder")

    def history_notice(self) -> str:
        """Why the history is not being saved, the first time it is asked after a failed save; then empty (the
        chat says it once, not at every message)."""
        if not self.history_error or self._history_told:
            return ""
        self._history_told = True
        return self.history_error

    def clear(self) -> None:
        self.messages = []
        self.save()

    def prompt_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system.strip() else []
        return system + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    # -- the model ----------------------------------------------------------------------------

    def ensure_loaded(self) -> Backend:
        """Load the backend for the artifact's format (slow the first time; call from a worker thread)."""
        if self.backend is None:
            from edgekit import api

            opts = dict(self.options)
            offload = opts.pop("offload", None) or "none"
            n_ctx = int(opts.get("kv_window") or opts.get("n_ctx") or 4096)  # a KV window bounds the cache
            planned, self.offload_reason = api.offload_options(self.artifact, offload, n_ctx,
                                                               draft=opts.get("draft"), experts=opts.get("experts"))
            from edgekit.runtime.llamacpp_decoding import interactive_defaults

            self.backend = api.open_backend(self.artifact, **{**interactive_defaults(self.artifact), **opts, **planned})
        return self.backend

    @property
    def n_ctx(self) -> int:
        return int(getattr(self.backend, "n_ctx", 0) or self.options.get("n_ctx", 0) or 0)

    def reply(
        self,
        user_text: str,
        sampling: SamplingConfig,
        cancel: threading.Event,
        on_text: Callable[[str, LiveStats], None],
        flush_every: float = 0.03,
    ) -> LiveStats:
        """Add ``user_text``, stream the reply to ``on_text(chunk, stats)`` (chunks batched every
        ``flush_every`` seconds) until done or ``cancel`` is set; the reply (even partial) joins the
        history. Errors propagate; a crashed backend is dropped so the next call reloads it. A turn that
        fails before any reply (a prompt past the context...) leaves the history as it was, so the next
        message is not refused for the same reason."""
        self.messages.append({"role": "user", "content": user_text})
        self.save()
        with self._lock:
            live = LiveStats()
            text: list[str] = []
            try:
                backend = self.ensure_loaded()
                live.n_ctx = self.n_ctx
                stats = GenerationStats()
                self._stream(backend.generate(self.prompt_messages(), sampling, stats),
                             stats, live, cancel, on_text, flush_every, text)
                live.stop_reason = "cancelled" if cancel.is_set() else stats.stop_reason
            except BaseException as exc:
                if isinstance(exc, BackendCrashed):
                    self._drop_backend()
                if not text and self.messages[-1:] == [{"role": "user", "content": user_text}]:
                    self.messages.pop()
                    self.save()
                raise
            finally:
                if text:
                    self.messages.append({"role": "assistant", "content": "".join(text)})
                    self.save()
            return live

    def _stream(self, gen: Iterator[str], stats: GenerationStats, live: LiveStats, cancel: threading.Event,
                on_text: Callable[[str, LiveStats], None], flush_every: float, text: list[str]) -> None:
        """Stream ``gen`` into ``text`` (kept by the caller: a failure mid-reply keeps what came)."""
        pending: list[str] = []
        t_first = last_flush = 0.0
        with contextlib.closing(gen):  # closing stops the generation in the backend
            for piece in gen:
                now = time.perf_counter()
                if not t_first:
                    t_first = now
                text.append(piece)
                pending.append(piece)
                live.prompt_tokens = stats.prompt_tokens
                live.generated_tokens = stats.generated_tokens
                live.template = str(stats.extra.get("chat_template", ""))
                if live.generated_tokens > 1 and now > t_first:
                    live.tokens_per_second = (live.generated_tokens - 1) / (now - t_first)
                if cancel.is_set():
                    break
                if now - last_flush >= flush_every:
                    on_text("".join(pending), live)
                    pending.clear()
                    last_flush = now
        live.generated_tokens = stats.generated_tokens
        live.prompt_tokens = stats.prompt_tokens or live.prompt_tokens
        live.take_decoding(stats.extra)
        if stats.tokens_per_second:
            live.tokens_per_second = stats.tokens_per_second
        on_text("".join(pending), live)

    def _drop_backend(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.close()

    def close(self) -> None:
        with self._lock:
            self._drop_backend()
