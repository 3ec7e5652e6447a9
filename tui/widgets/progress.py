"""Ending a job's progress bar: a bar left indeterminate keeps animating as if work still ran."""

from __future__ import annotations

from textual.widgets import ProgressBar


def settle(bar: ProgressBar, finished: bool) -> None:
    """Full when the job ``finished``; otherwise empty if the job never learnt its size, else left
    where it stopped (how far a cancelled or failed job got)."""
    if finished:
        bar.update(total=bar.total or 1, progress=bar.total or 1)
    elif bar.total is None:
        bar.update(total=1, progress=0)
