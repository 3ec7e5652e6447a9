"""A backend's blocking token stream, run in its own thread and read from asyncio.

Backends generate with a plain iterator that blocks between tokens (the llama.cpp one waits on its worker's
pipe), so each generation runs in a thread of its own and hands pieces to the event loop through an
``asyncio.Queue``. :meth:`Generation.cancel` makes the thread stop at the next token and close the
iterator, which stops the backend's generation and leaves it ready for the next one; ``on_done`` runs (in
the thread) once the backend is free again, with the exception the generation ended with, if any.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from edgekit.runtime.base import Backend, GenerationStats, SamplingConfig

_END = object()


class Generation:
    """One generation on one backend. Iterate it (``async for piece in gen``) from the event loop that
    created it; exceptions the backend raised come out of the iteration."""

    def __init__(self, backend: Backend, prompt: str | list[dict[str, str]], sampling: SamplingConfig,
                 on_done: Callable[[BaseException | None], None]) -> None:
        self.stats = GenerationStats()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, args=(backend, prompt, sampling), daemon=True,
                                        name="edgekit-serve-generation")
        self._thread.start()

    def cancel(self) -> None:
        """Stop at the next token (thread-safe; idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (from a thread, not the loop); True when it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is reading any more
            self._cancelled.set()

    def _run(self, backend: Backend, prompt: str | list[dict[str, str]], sampling: SamplingConfig) -> None:
        failure: BaseException | None = None
        pieces = None
        try:
            pieces = backend.generate(prompt, sampling, self.stats)
            for piece in pieces:
                if self._cancelled.is_set():
                    break
                self._put(piece)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which reports it
            failure = exc
        finally:
            if pieces is not None:
                try:
                    pieces.close()  # type: ignore[attr-defined]  # stops the backend's generation
                except Exception as exc:  # noqa: BLE001
                    failure = failure or exc
            self._on_done(failure)
            self._put(failure if failure is not None else _END)
