"""What every benchmark here shares: a timestamped log line, the real model (SmolLM2-135M-Instruct imported once
into edgekit's cache), versions and CPU for the report, and printing the table and writing the results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgekit.fsutil import edgekit_home
from edgekit.importer import import_gguf
from edgekit.quickstart import fetch_default_gguf
from edgekit.runtime.hostinfo import cpu_name


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def publish(report: dict[str, Any], table: Table, lines: list[str], out: Path) -> None:
    """Print ``table`` and ``lines`` (plus the run's time, CPU and load) and write ``out``.json (the report)
    and ``out``.txt (what was printed)."""
    console = Console(record=True, width=200)
    console.print(table)
    m = report["machine"]
    for line in [*lines, f"total {report['total_s'] / 60:.1f} min; {m['cpu']}, load average at start "
                         f"{m['loadavg_start'][0]:.1f}"]:
        console.print(line, highlight=False, markup=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".txt").write_text(console.export_text())
    print(f"wrote {out.with_suffix('.json')}, .txt")


#: repeated measurements of one configuration further apart than this, relative to their mean, are noisy
NOISY_SPREAD = 0.05


def noise_flag(speeds: list[float], loads: list[float], cores: int, limit: float = NOISY_SPREAD) -> str:
    """Why one configuration's timings are noisy, or "" when nothing says so: a 1-minute load average above
    the ``cores`` while it ran (``loads``: sampled after each measurement; more runnable threads than cores,
    so other programs took CPU time from it), or its repeated measurements ``speeds`` (one per round)
    further apart than ``limit`` of their mean."""
    why = []
    top = max(loads, default=0.0)
    if top > cores:
        why.append(f"load {top:.1f} > {cores} cores")
    mean = statistics.mean(speeds) if speeds else 0.0
    if len(speeds) > 1 and mean > 0 and (spread := (max(speeds) - min(speeds)) / mean) > limit:
        why.append(f"rounds {100 * spread:.0f}% apart")
    return "; ".join(why)


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    return cpu_name()


def machine_info() -> dict[str, Any]:
    """The report's ``machine``: CPU, cores, platform, Python and the load average at the start."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def get_model() -> Path:
    """The imported float checkpoint of SmolLM2-135M-Instruct in edgekit's cache (imported once)."""
    hf = edgekit_home() / "SmolLM2-135M-Instruct"
    if not (hf / "edgekit_import.json").exists():
        src = fetch_default_gguf()
        log(f"importing {src} -> {hf}")
        import_gguf(src, hf, force=True)
    return hf
