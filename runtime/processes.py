"""What edgekit is running on this machine (``edgekit ps``): ``edgekit serve`` servers and llama.cpp workers.

A server announces itself once it listens: a small JSON file ``<home>/run/serve-PID.json`` (its URL and
models), removed when it stops; one left by a killed server is recognised by its pid (gone, or reused by
another program: the start time differs) and swept. Workers are found by their command line (the
``_llamacpp_worker.py`` script), and the model each holds by the GGUF it has mapped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.fsutil import atomic_file, edgekit_home

WORKER_SCRIPT = "_llamacpp_worker.py"


def _run_dir() -> Path:
    return edgekit_home() / "run"


@contextlib.contextmanager
def announce_server(url: str, models: dict[str, str]) -> Iterator[Path]:
    """Record this process as a server at ``url`` serving ``models`` (id -> path) while the block runs."""
    import psutil

    folder = _run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"serve-{os.getpid()}.json"
    record = {"pid": os.getpid(), "started": psutil.Process().create_time(), "url": url, "models": models}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Running:
    """One running process: ``kind`` is "server" or "worker"; ``parent``: the pid of the server or CLI
    that started a worker; ``rss``: resident bytes; ``port``: a server's TCP port."""

    kind: str
    pid: int
    models: tuple[str, ...]
    rss: int
    port: int | None = None
    url: str | None = None
    parent: int | None = None
    owner: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "pid": self.pid, "models": list(self.models), "rss": self.rss, "port": self.port,
                "url": self.url, "parent": self.parent, "owner": self.owner}


def servers() -> list[Running]:
    """Servers that announced themselves and still run (stale records are removed)."""
    import psutil

    found = []
    folder = _run_dir()
    for f in sorted(folder.glob("serve-*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
            proc = psutil.Process(int(rec["pid"]))
            if abs(proc.create_time() - float(rec["started"])) > 1:
                raise psutil.NoSuchProcess(int(rec["pid"]))  # the pid was reused by another program
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                f.unlink()
            continue
        except psutil.AccessDenied:
            rss = 0
        url = str(rec.get("url", ""))
        port = url.rsplit(":", 1)[-1].split("/")[0]
        found.append(Running("server", proc.pid, tuple(rec.get("models") or {}), rss,
                             port=int(port) if port.isdigit() else None, url=url))
    return found


def workers() -> list[Running]:
    """llama.cpp worker processes of this user, with the GGUF each has mapped."""
    import psutil

    found = []
    me = psutil.Process().username()
    for proc in psutil.process_iter(["pid", "cmdline", "ppid", "username"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info.get("username") != me or not any(str(a).endswith(WORKER_SCRIPT) for a in cmd):
            continue
        try:
            rss = proc.memory_info().rss
            models = tuple(sorted({Path(m.path).name if Path(m.path).name != "model.gguf" else Path(m.path).parent.name
                                   for m in proc.memory_maps(grouped=True) if m.path.endswith(".gguf")}))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            rss, models = 0, ()
        parent = proc.info.get("ppid")
        owner = ""
        with contextlib.suppress(psutil.Error):
            pcmd = psutil.Process(parent).cmdline()
            owner = " ".join(Path(a).name for a in pcmd[:3])
        found.append(Running("worker", proc.pid, models, rss, parent=parent, owner=owner))
    return found


def running() -> list[Running]:
    """Servers first, then workers."""
    return servers() + workers()
