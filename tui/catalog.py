"""The artifacts under a folder, as rows the artifacts screen shows (no Textual here).

An artifact is a folder with ``edgekit.json`` (made by ``edgekit convert``) or a bare model file; a diffusers
pipeline folder (``model_index.json``) is listed too.
The scan is shallow (``depth`` levels) and skips hidden folders, so the temporary ``.NAME.partial-``
folders of a conversion still running never show up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.artifact import FORMAT_SUFFIXES, MANIFEST_NAME, Artifact
from edgekit.errors import EdgekitError, InputError
from edgekit.evaluate import text_name

PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder
# Folders that hold thousands of files and never artifacts.
_SKIP = {"node_modules", "__pycache__", ".git", ".venv", "site-packages"}


@dataclass(frozen=True)
class ArtifactRow:
    """One artifact as listed: ``path`` is what :meth:`Artifact.open` takes (folder or bare file)."""

    path: Path
    name: str
    format: str
    method: str
    quant: str
    size_bytes: int
    bpw: float | None
    ppl: float | None
    kl: float | None
    bare: bool
    problem: str = ""
    ppl_text: str = ""  # the name of the text the perplexity was measured on  # why the manifest could not be read (shown instead of hiding the folder)
    task: str = ""  # "diffusion" for an image model (a pipeline folder or a diffusion artifact)

    @property
    def size_text(self) -> str:
        return human_bytes(self.size_bytes)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def middle_ellipsis(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters: its start and its end kept, a ``…`` between them
    (artifact names differ at their end as often as at their start: ``-q4``, ``-q8``)."""
    if len(text) <= width:
        return text
    head = width // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _quant(manifest: dict[str, Any]) -> str:
    recipe = manifest.get("recipe") or {}
    if manifest.get("preset"):
        return str(manifest["preset"])
    if recipe.get("bpw"):
        return f"{recipe['bpw']:g} bpw"
    if recipe.get("bits"):
        return f"{recipe['bits']}-bit"
    return "-"


def row_for(path: Path) -> ArtifactRow:
    """Describe one artifact folder or model file; a broken manifest gives a row with ``problem`` set."""
    try:
        art = Artifact.open(path)
    except EdgekitError as exc:
        return ArtifactRow(path=path, name=path.name, format="?", method="-", quant="-", size_bytes=0,
                           bpw=None, ppl=None, kl=None, bare=path.is_file(), problem=str(exc))
    m = art.manifest
    evals = m.get("eval") or []
    last = evals[-1] if evals else {}
    size = int(m.get("size_bytes") or art.model_file.stat().st_size)
    return ArtifactRow(
        path=art.bare_file or art.path,
        name=art.name,
        format=art.format,
        method=str((m.get("recipe") or {}).get("method") or "-"),
        quant=_quant(m),
        size_bytes=size,
        bpw=m.get("bpw"),
        ppl=last.get("ppl"),
        kl=last.get("kl_mean"),
        bare=art.bare_file is not None,
        ppl_text=text_name(last) if last.get("ppl") is not None else "",
        task=str(m.get("task") or ""),
    )


def pipeline_row(path: Path) -> ArtifactRow:
    """A diffusers pipeline folder as a row (format "diffusers", method: the sampler it wants)."""
    from edgekit.converters.diffusion.pipeline import open_pipeline
    from edgekit.library import folder_bytes

    try:
        pipe = open_pipeline(path)
    except EdgekitError as exc:
        return ArtifactRow(path=path, name=path.name, format="diffusers", method="-", quant="-", size_bytes=0,
                           bpw=None, ppl=None, kl=None, bare=False, problem=str(exc), task="diffusion")
    return ArtifactRow(path=path, name=path.name, format="diffusers", method=f"{pipe.sampler} {pipe.default_steps}",
                       quant="-", size_bytes=folder_bytes(path), bpw=None, ppl=None, kl=None, bare=False,
                       task="diffusion")


def find_artifacts(folder: str | Path, depth: int = 3) -> list[ArtifactRow]:
    """Artifacts under ``folder`` (itself included), sorted by path."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give the folder that holds your artifacts")
    rows: list[ArtifactRow] = []
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP)
        if MANIFEST_NAME in filenames:
            rows.append(row_for(here))
            dirnames[:] = []  # an artifact's folder holds no further artifacts
            continue
        if PIPELINE_INDEX in filenames:
            rows.append(pipeline_row(here))
            dirnames[:] = []
            continue
        rows.extend(row_for(here / f) for f in sorted(filenames)
                    if Path(f).suffix.lower() in FORMAT_SUFFIXES and not f.startswith("."))
        if len(here.parts) - base_depth >= depth:
            dirnames[:] = []
    return sorted(rows, key=lambda r: str(r.path))


def delete_artifact(row: ArtifactRow) -> None:
    """Remove an artifact: its folder (only when it holds ``edgekit.json``) or its bare model file."""
    if row.bare or row.path.is_file():
        row.path.unlink()
        return
    if not (row.path / MANIFEST_NAME).exists():
        raise InputError(f"{row.path} has no {MANIFEST_NAME}; edgekit only deletes folders it made")
    from edgekit.library import remove

    remove(row.path)  # rm's checks: another user's artifact is refused untouched, a failed delete put back
