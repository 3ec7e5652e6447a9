"""Models loaded on demand, each generation on an instance with a free slot, idle instances unloaded.

A model id runs at most ``parallel`` generations at once; more requests wait in a FIFO. An instance has
``slots`` places (what the backend decodes at once: llama.cpp with ``n_seq`` batches that many sequences
in one context, so ``--parallel N`` is one instance with N slots; a backend that holds one sequence gets
one instance per generation). A request takes a free slot of a loaded instance, else waits for an instance
being loaded that will have room, else loads one. A slot is given back when its generation has stopped in
the backend (not merely when its client went away); an instance with no generation for ``idle_unload``
seconds is unloaded. All bookkeeping runs on the event loop; backends load in a thread.
"""

from __future__ import annotations

import asyncio
import time
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
class _Instance:
    backend: Backend
    slots: int
    leases: int = 0
    since: float = field(default_factory=time.monotonic)  # when it last became unused


@dataclass
class _Model:
    path: Path
    options: dict[str, Any]
    free: asyncio.Semaphore
    instances: list[_Instance] = field(default_factory=list)
    load: asyncio.Future[Backend] | None = None  # an instance on its way
    waiting: int = 0

    @property
    def slots(self) -> int:
        """Slots of one instance of this model."""
        return max(1, int(self.options.get("n_seq") or 1))


class ModelPool:
    """``lease(model_id)`` waits for a free slot (loading an instance if none has one) and returns its
    backend; ``give_back`` returns it from any thread. ``opener(path, **options)`` loads a backend (the CLI
    passes ``edgekit.api.open_backend``, which checks the artifact's checksums first); ``preloaded``: model
    id -> an instance loaded before the server started, the pool's first (unloaded when idle like any)."""

    def __init__(self, config: ServeConfig, opener: Opener, preloaded: dict[str, Backend] | None = None) -> None:
        self.config = config
        self._opener = opener
        self._models = {mid: _Model(path, config.options_for(mid), asyncio.Semaphore(config.parallel))
                        for mid, path in config.models.items()}
        for mid, backend in (preloaded or {}).items():  # loaded before the server listened (checked options)
            m = self._entry(mid)
            m.instances.append(_Instance(backend, m.slots))
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
        """Per model: instances loaded, generations running (busy), instances loading, requests waiting."""
        return {mid: {"loaded": len(m.instances), "busy": sum(i.leases for i in m.instances),
                      "loading": int(m.load is not None), "waiting": m.waiting}
                for mid, m in self._models.items()}

    def _entry(self, model_id: str) -> _Model:
        try:
            return self._models[model_id]
        except KeyError:
            raise RequestError(f"model {model_id!r} is not served here; GET /v1/models lists the ids "
                               f"({', '.join(self._models)})", status=404, param="model",
                               code="model_not_found") from None

    async def lease(self, model_id: str) -> Backend:
        """A loaded backend of ``model_id`` with a slot for this generation (FIFO among waiting requests)."""
        m = self._entry(model_id)
        m.waiting += 1
        try:
            await m.free.acquire()
        finally:
            m.waiting -= 1
        try:
            while True:
                open_ = [i for i in m.instances if i.leases < i.slots]
                if open_:
                    inst = max(open_, key=lambda i: (i.leases, i.since))  # fill one, let the others idle out
                    inst.leases += 1
                    return inst.backend
                if m.load is None:
                    m.load = asyncio.ensure_future(asyncio.to_thread(self._opener, m.path, **m.options))
                    m.load.add_done_callback(lambda done, m=m: self._loaded(m, done))
                # shielded: a request that goes away while the model loads leaves the load running
                await asyncio.shield(m.load)
        except BaseException:
            m.free.release()
            raise

    def _loaded(self, m: _Model, load: asyncio.Future[Backend]) -> None:
        m.load = None
        if load.cancelled() or load.exception() is not None:
            return
        backend = load.result()
        if self._closed:
            backend.close()
        else:
            m.instances.append(_Instance(backend, m.slots))

    def give_back(self, model_id: str, backend: Backend, failure: BaseException | None = None) -> None:
        """Return a slot (thread-safe). An instance whose worker crashed is closed, not reused."""
        if not self._on_loop():
            try:
                self._loop.call_soon_threadsafe(self.give_back, model_id, backend, failure)
            except RuntimeError:  # the loop is gone: the process is exiting
                backend.close()
            return
        m = self._models[model_id]
        inst = next((i for i in m.instances if i.backend is backend), None)
        if inst is not None:
            inst.leases -= 1
            inst.since = time.monotonic()
            if isinstance(failure, BackendCrashed) or (self._closed and inst.leases == 0):
                m.instances.remove(inst)
                backend.close()
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
                for inst in [i for i in m.instances if i.leases == 0 and now - i.since >= self.config.idle_unload]:
                    m.instances.remove(inst)
                    await asyncio.to_thread(inst.backend.close)

    async def close(self) -> None:
        """Unload every unused instance; busy ones are closed as their last slot is given back."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for m in self._models.values():
            for inst in [i for i in m.instances if i.leases == 0]:
                m.instances.remove(inst)
                await asyncio.to_thread(inst.backend.close)


def describe(pool: ModelPool) -> list[dict[str, Any]]:
    """``GET /v1/models``'s list: every served id (loaded or not)."""
    return [{"id": mid, "object": "model", "created": int(pool.path(mid).stat().st_mtime), "owned_by": "edgekit"}
            for mid in pool.ids()]
