"""Models loaded on demand, one generation at a time per loaded instance, idle instances unloaded.

Each model id has up to ``parallel`` loaded instances (a llama.cpp context here holds one sequence, so
two streams never share one) and a FIFO of requests waiting for a free instance. An instance is loaded
by the first request that finds none free, lent to exactly one generation at a time, given back when that
generation has stopped in the backend (not merely when its client went away), and unloaded after
``idle_unload`` seconds unused. All bookkeeping runs on the event loop; backends load in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import BackendCrashed
from edgekit.runtime.base import Backend
from edgekit.runtime.serve.config import ServeConfig
from edgekit.runtime.serve.protocol import RequestError

Opener = Callable[..., Backend]


@dataclass
class _Model:
    path: Path
    free: asyncio.Semaphore
    idle: deque[tuple[Backend, float]] = field(default_factory=deque)  # (instance, when it was given back)
    busy: int = 0
    loading: int = 0
    waiting: int = 0


class ModelPool:
    """``lease(model_id)`` waits for a free instance (loading one if none is loaded) and returns it;
    ``give_back`` returns it from any thread. ``opener(path, **options)`` loads a backend (the CLI passes
    ``edgekit.api.open_backend``, which checks the artifact's checksums first)."""

    def __init__(self, config: ServeConfig, opener: Opener) -> None:
        self.config = config
        self._opener = opener
        self._models = {mid: _Model(path, asyncio.Semaphore(config.parallel)) for mid, path in config.models.items()}
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        if config.idle_unload > 0:
            self._reaper = self._loop.create_task(self._unload_idle())

    def ids(self) -> list[str]:
        return list(self._models)

    def path(self, model_id: str) -> Path:
        return self._entry(model_id).path

    def state(self) -> dict[str, dict[str, int]]:
        """Per model: instances loaded (idle + busy), busy, loading and requests waiting."""
        return {mid: {"loaded": len(m.idle) + m.busy, "busy": m.busy, "loading": m.loading, "waiting": m.waiting}
                for mid, m in self._models.items()}

    def _entry(self, model_id: str) -> _Model:
        try:
            return self._models[model_id]
        except KeyError:
            raise RequestError(f"model {model_id!r} is not served here; GET /v1/models lists the ids "
                               f"({', '.join(self._models)})", status=404, param="model",
                               code="model_not_found") from None

    async def lease(self, model_id: str) -> Backend:
        """A loaded instance of ``model_id`` that no one else is using (FIFO among waiting requests)."""
        m = self._entry(model_id)
        m.waiting += 1
        try:
            await m.free.acquire()
        finally:
            m.waiting -= 1
        if m.idle:
            m.busy += 1
            return m.idle.pop()[0]  # the most recently used: the others may get unloaded
        m.loading += 1
        load = asyncio.ensure_future(asyncio.to_thread(self._opener, m.path, **self.config.backend_options))
        try:
            backend = await asyncio.shield(load)
        except asyncio.CancelledError:
            # the request went away (client gone, timeout) while the model loads: keep what loads as idle
            load.add_done_callback(lambda done: self._park(m, done))
            raise
        except BaseException:
            m.loading -= 1
            m.free.release()
            raise
        m.loading -= 1
        m.busy += 1
        return backend

    def _park(self, m: _Model, load: asyncio.Future[Backend]) -> None:
        m.loading -= 1
        if not load.cancelled() and load.exception() is None:
            backend = load.result()
            if self._closed:
                backend.close()
            else:
                m.idle.append((backend, time.monotonic()))
        m.free.release()

    def give_back(self, model_id: str, backend: Backend, failure: BaseException | None = None) -> None:
        """Return an instance (thread-safe). One whose worker crashed is closed, not reused."""
        if not self._on_loop():
            try:
                self._loop.call_soon_threadsafe(self.give_back, model_id, backend, failure)
            except RuntimeError:  # the loop is gone: the process is exiting
                backend.close()
            return
        m = self._models[model_id]
        m.busy -= 1
        if self._closed or isinstance(failure, BackendCrashed):
            backend.close()
        else:
            m.idle.append((backend, time.monotonic()))
        m.free.release()

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _unload_idle(self) -> None:
        period = min(max(self.config.idle_unload / 4, 0.1), 5.0)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for m in self._models.values():
                # oldest first: the deque's left end was given back longest ago
                while m.idle and now - m.idle[0][1] >= self.config.idle_unload:
                    backend = m.idle.popleft()[0]
                    await asyncio.to_thread(backend.close)

    async def close(self) -> None:
        """Unload every idle instance; busy ones are closed as they are given back."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for m in self._models.values():
            while m.idle:
                await asyncio.to_thread(m.idle.pop()[0].close)


def describe(pool: ModelPool) -> list[dict[str, Any]]:
    """``GET /v1/models``'s list: every served id (loaded or not)."""
    return [{"id": mid, "object": "model", "created": int(pool.path(mid).stat().st_mtime), "owned_by": "edgekit"}
            for mid in pool.ids()]
