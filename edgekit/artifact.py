"""Artifacts: a folder holding the model file(s) and ``edgekit.json``, the versioned manifest.

The manifest records where the model came from (path and sha256), the recipe, tool versions,
per-tensor types, size, bits per weight, and evaluation results once measured. A bare model
file (``model.gguf``) is accepted wherever an artifact is, with a manifest derived on the fly.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError, InputError
from edgekit.fsutil import atomic_file

MANIFEST_NAME = "edgekit.json"
SCHEMA = "edgekit.artifact/1"

# File suffix -> artifact format, for model files given without a manifest.
FORMAT_SUFFIXES = {".gguf": "gguf", ".onnx": "onnx", ".mlpackage": "coreml"}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of edgekit and ``packages`` (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("edgekit", *packages):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@dataclass
class Artifact:
    """An artifact on disk: ``path`` is its folder, ``manifest`` the parsed ``edgekit.json``."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    bare_file: Path | None = None

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        """Open an artifact folder, or a bare model file; errors say what was expected."""
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"{p} does not exist; give an artifact folder (made by 'edgekit convert') or a .gguf file")
        if p.is_file():
            fmt = FORMAT_SUFFIXES.get(p.suffix.lower())
            if fmt is None:
                raise InputError(f"{p} is not a model file edgekit knows ({', '.join(FORMAT_SUFFIXES)})")
            manifest = {"schema": SCHEMA, "format": fmt, "files": {"model": p.name}}
            return cls(path=p.parent, manifest=manifest, bare_file=p)
        mpath = p / MANIFEST_NAME
        if not mpath.exists():
            models = [f for f in sorted(p.iterdir()) if f.suffix.lower() in FORMAT_SUFFIXES]
            if len(models) == 1:
                return cls.open(models[0])
            raise InputError(
                f"{p} has no {MANIFEST_NAME}; give a folder made by 'edgekit convert' or a model file directly"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{mpath} is not valid JSON ({exc}); re-run 'edgekit convert' to rebuild it") from exc
        schema = str(manifest.get("schema", ""))
        if not schema.startswith("edgekit.artifact/"):
            raise CorruptFileError(f"{mpath} is not an edgekit manifest; re-run 'edgekit convert'")
        if int(schema.rsplit("/", 1)[1]) > int(SCHEMA.rsplit("/", 1)[1]):
            raise InputError(f"{mpath} was written by a newer edgekit ({schema}); upgrade edgekit to read it")
        art = cls(path=p, manifest=manifest)
        if not art.model_file.exists():
            raise CorruptFileError(f"{art.model_file} is missing from the artifact; re-run 'edgekit convert'")
        return art

    @property
    def format(self) -> str:
        return str(self.manifest["format"])

    @property
    def model_file(self) -> Path:
        if self.bare_file is not None:
            return self.bare_file
        return self.path / self.manifest["files"]["model"]

    @property
    def name(self) -> str:
        return self.bare_file.stem if self.bare_file else self.path.name

    def save_manifest(self) -> None:
        """Write the manifest atomically (a bare model file has none to write)."""
        if self.bare_file is not None:
            return
        write_manifest(self.path, self.manifest)

    def record_eval(self, results: dict[str, Any]) -> None:
        """Add evaluation results to the manifest, keyed by what was measured."""
        evals = self.manifest.setdefault("eval", [])
        evals.append({**results, "measured": now_iso()})
        self.save_manifest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(folder / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
