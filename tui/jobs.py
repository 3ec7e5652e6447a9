"""Background jobs the screens run: a progress callback that can be cancelled (no Textual here).

edgekit's long operations report through ``progress(description, done, total)``; raising from that
callback is how a job is stopped from outside its thread. ``atomic_dir`` removes the partial output
on any exception, so a cancelled conversion leaves nothing behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from edgekit.errors import EdgekitError


class Cancelled(EdgekitError):
    """The user stopped the job; nothing half-written is kept."""

    exit_code = 130


class CancellableProgress:
    """A ``ProgressFn`` that forwards to ``report`` and raises :class:`Cancelled` once :meth:`cancel` ran."""

    def __init__(self, report: Callable[[str, int, int], None], what: str = "the job") -> None:
        self.report = report
        self.what = what
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(f"{self.what} was cancelled; nothing half-written was kept")

    def __call__(self, desc: str, done: int, total: int) -> None:
        self.check()
        self.report(desc, done, total)
