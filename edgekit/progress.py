"""The one progress callback type of the SDK: ``progress(description, done, total)``.

Conversions, imports, evaluations, profiles and pushes all report through it; the CLI draws it as rich
bars, the TUI as progress widgets. A callback may raise (Ctrl-C, a cancel button) to stop the work.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


def no_progress(desc: str, done: int, total: int) -> None:
    return None
