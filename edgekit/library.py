"""The model library: a folder of artifacts under edgekit's home that ``convert`` writes into and that
``ls``, ``show``, ``rm``, ``run NAME`` and every other command taking an artifact read by name.

The store is ``$EDGEKIT_MODELS``, else ``<edgekit home>/models`` (``$EDGEKIT_HOME`` or ``~/.cache/edgekit``);
commands take ``--dir`` for another one. Artifact names follow one scheme for every format,
``<model>-<format>-<quantization>`` in lower case (``smollm2-135m-instruct-gguf-q4_k_m``,
``smollm2-135m-instruct-onnx-uint4_b32``), so a name says what is inside and sorts by model.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.fsutil import edgekit_home, is_edgekit_output

MANIFEST = "edgekit.json"
_UNSAFE = re.compile(r"[^a-z0-9._+-]+")


def store_dir(folder: str | Path | None = None, create: bool = False) -> Path:
    """The library folder: ``folder`` when given, else ``$EDGEKIT_MODELS``, else ``<home>/models``."""
    if folder is None and os.environ.get("EDGEKIT_MODELS"):
        folder = os.environ["EDGEKIT_MODELS"]
    path = Path(folder).expanduser() if folder is not None else edgekit_home() / "models"
    if path.exists() and not path.is_dir():
        what = "EDGEKIT_MODELS" if folder == os.environ.get("EDGEKIT_MODELS") else "the library"
        raise InputError(f"{what} is {path}, a file, not a folder; point EDGEKIT_MODELS at a folder (or move the file)")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_name(model: str, *parts: str) -> str:
    """``("SmolLM2-135M-Instruct", "gguf-Q4_K_M")`` -> ``smollm2-135m-instruct-gguf-q4_k_m``: lower case,
    anything but letters, digits, ``.``, ``_``, ``+`` and ``-`` made a dash."""
    text = "-".join(p for p in (model, *parts) if p)
    return re.sub(r"-{2,}", "-", _UNSAFE.sub("-", text.lower())).strip("-.") or "model"


def is_name(ref: str | Path) -> bool:
    """Whether ``ref`` is a bare name (no folder part) that may name an artifact in the store."""
    s = str(ref)
    return bool(s) and "/" not in s and os.sep not in s and s not in (".", "..") and not s.startswith("~")


def resolve(ref: str | Path, folder: str | Path | None = None) -> Path:
    """The path ``ref`` stands for: itself when it exists (a folder or file given by path wins), else the
    artifact of that name in the store; a name found nowhere comes back unchanged for the caller's error."""
    from edgekit.validate import check_path

    check_path(ref)
    p = Path(ref).expanduser()
    if p.exists() or not is_name(ref):
        return p
    candidate = store_dir(folder) / str(ref)
    return candidate if candidate.is_dir() else p


def not_found_hint(ref: str | Path, folder: str | Path | None = None) -> str:
    """What to say about a bare name that is neither a path nor in the store: the closest names there."""
    if not is_name(ref):
        return ""
    names = [e.name for e in entries(folder)]
    close = difflib.get_close_matches(str(ref).lower(), names, n=3, cutoff=0.5)
    where = store_dir(folder)
    if close:
        return f"; no artifact of that name in {where} either (did you mean {', '.join(close)}?)"
    return f"; no artifact of that name in {where} either ('edgekit ls' lists them)"


@dataclass(frozen=True)
class Entry:
    """One artifact of the store, from its manifest (``eval``: the latest recorded evaluation, if any)."""

    name: str
    path: Path
    format: str
    preset: str
    size_bytes: int
    bpw: float | None
    source: str
    created: str
    eval: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "format": self.format, "preset": self.preset,
                "size_bytes": self.size_bytes, "bpw": self.bpw, "source": self.source, "created": self.created,
                "eval": self.eval}


def folder_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take (links not followed)."""
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def read_entry(folder: Path) -> Entry | None:
    """The store entry for ``folder``, or None when it holds no readable edgekit manifest."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not str(m.get("schema", "")).startswith("edgekit.artifact/"):
        return None
    src = m.get("source") if isinstance(m.get("source"), dict) else {}
    evals = [e for e in m.get("eval") or [] if isinstance(e, dict)]
    bpw = m.get("bpw")
    return Entry(name=folder.name, path=folder, format=str(m.get("format", "?")), preset=str(m.get("preset") or "-"),
                 size_bytes=folder_bytes(folder), bpw=float(bpw) if isinstance(bpw, (int, float)) else None,
                 source=Path(str(src.get("path", ""))).name or "-", created=str(m.get("created", ""))[:19],
                 eval=evals[-1] if evals else None)


def entries(folder: str | Path | None = None) -> list[Entry]:
    """Every artifact in the store, by name (hidden and temporary folders left out)."""
    root = store_dir(folder)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
            continue
        entry = read_entry(child)
        if entry is not None:
            found.append(entry)
    return found


def remove(path: Path) -> int:
    """Delete an artifact folder (or a checkpoint edgekit imported); returns the bytes freed. Anything
    else is refused untouched. The folder is first renamed to a hidden temporary name, so an interrupted
    removal leaves no half artifact under the real name (the next write into the store sweeps it)."""
    if path.is_symlink() or not path.is_dir() or not is_edgekit_output(path):
        raise InputError(f"{path} is not an edgekit artifact (no {MANIFEST}); rm only deletes what edgekit "
                         "wrote, so nothing was touched")
    size = folder_bytes(path)
    tmp = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    path.rename(tmp)
    shutil.rmtree(tmp)
    return size
