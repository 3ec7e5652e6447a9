"""Artifacts: a folder holding the model file(s) and ``edgekit.json``, the versioned manifest.

The manifest records where the model came from (path and sha256), the recipe, tool versions,
per-tensor types, size, bits per weight, the sha256 of each file written (checked before the files
are used), and evaluation results once measured. A bare model file (``model.gguf``) is accepted
wherever an artifact is, with a manifest derived on the fly.

A manifest is data from disk, perhaps from someone else: every name in it must stay inside its folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeVar

from edgekit.errors import CorruptFileError, InputError
from edgekit.fsutil import atomic_file
from edgekit.hashing import remember_sha256, sha256_file, sha256_file_cached
from edgekit.library import SCHEMA

T = TypeVar("T")

MANIFEST_NAME = "edgekit.json"

# File suffix -> artifact format, for model files given without a manifest.
FORMAT_SUFFIXES = {".gguf": "gguf", ".onnx": "onnx", ".mlpackage": "coreml"}

_RECONVERT = "re-run 'edgekit convert' to rebuild it"


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
    """An artifact on disk: ``path`` is its folder, ``manifest`` the parsed ``edgekit.json``; ``notes``: what
    writing it did besides (an earlier artifact replaced, leftovers of killed conversions removed)."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    bare_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> Artifact:
        """Open an artifact folder, or a bare model file; errors say what was expected. With ``verify`` the
        files must also match the checksums in the manifest (see :meth:`verify`; loading a backend does it)."""
        from edgekit import library

        p = library.resolve(path)  # a bare name is looked up in the model library
        if not p.exists():
            raise InputError(f"{p} does not exist; give an artifact folder (made by 'edgekit convert'), a .gguf "
                             f"file or an artifact's name{library.not_found_hint(path)}")
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
            raise CorruptFileError(f"{mpath} is not valid JSON ({exc}); {_RECONVERT}") from exc
        except OSError as exc:
            raise InputError(f"cannot read {mpath}: {exc.strerror or exc}; check its permissions") from exc
        check_manifest(manifest, mpath)
        art = cls(path=p, manifest=manifest)
        for name in art.manifest["files"].values():
            member(p, name, mpath)
        if not art.model_file.exists():
            raise CorruptFileError(f"{art.model_file} is missing from the artifact; {_RECONVERT}")
        if verify:
            art.verify()
        return art

    def verify(self) -> None:
        """Check each file against the sha256 the manifest recorded when it was written (a bare file or an
        older manifest records none). Hashes are remembered by size and mtime, so only a changed file is
        read again; one that no longer matches is a :class:`CorruptFileError` naming it."""
        mpath = self.path / MANIFEST_NAME
        for name, want in (self.manifest.get("sha256") or {}).items():
            f = member(self.path, name, mpath)
            if not f.is_file():
                raise CorruptFileError(f"{f} is missing from the artifact; {_RECONVERT}")
            if sha256_file_cached(f) != want:
                raise CorruptFileError(f"{f} changed since it was converted (its sha256 no longer matches "
                                       f"{MANIFEST_NAME}): it is corrupt or was edited; {_RECONVERT}")

    def to_dict(self) -> dict[str, Any]:
        """The artifact as plain JSON types (``json.dumps`` takes it as is): ``name``, ``format``, ``path`` (its
        folder) and ``model_file`` as str, ``bare_file`` (the model file given without a manifest, or None),
        the ``manifest`` (see :func:`plain_json`) and the ``notes``."""
        files = self.manifest.get("files")
        model = self.model_file if self.bare_file or (isinstance(files, dict) and "model" in files) else None
        return plain_json({"name": self.name, "format": self.manifest.get("format"), "path": self.path,
                           "model_file": model, "bare_file": self.bare_file, "manifest": self.manifest,
                           "notes": self.notes})

    @property
    def format(self) -> str:
        return str(self.manifest["format"])

    @property
    def model_file(self) -> Path:
        if self.bare_file is not None:
            return self.bare_file
        return member(self.path, self.manifest["files"]["model"], self.path / MANIFEST_NAME)

    @property
    def name(self) -> str:
        return self.bare_file.stem if self.bare_file else self.path.name

    def save_manifest(self) -> None:
        """Write the manifest atomically (a bare model file has none to write)."""
        if self.bare_file is not None:
            return
        write_manifest(self.path, self.manifest)

    def record_eval(self, results: dict[str, Any]) -> None:
        """Add evaluation results to the manifest on disk, keyed by what was measured, under a lock on the
        folder (evaluations that end at once all land). The folder must still hold this artifact: one that
        another ``convert --force`` replaced since this was opened is an :class:`ArtifactReplaced` (a result of
        the earlier model must not be written into the later one's manifest)."""
        if self.bare_file is not None:
            return
        import fcntl

        mpath = self.path / MANIFEST_NAME
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = json.loads(mpath.read_text())
            except (OSError, ValueError) as exc:
                raise ArtifactReplaced(f"{self.path} changed while it was measured ({exc})") from exc
            if not self.same_build(current):
                raise ArtifactReplaced(f"{self.path} was replaced by another conversion while it was measured (the "
                                       "result is of the model it held before)")
            current.setdefault("eval", []).append({**results, "measured": now_iso()})
            write_manifest(self.path, current)
            self.manifest = current
        finally:
            os.close(fd)  # and the lock with it

    def on_disk(self) -> bool:
        """Whether the folder still holds this artifact (see :meth:`same_build`); a bare file always does."""
        if self.bare_file is not None:
            return True
        try:
            return self.same_build(json.loads((self.path / MANIFEST_NAME).read_text()))
        except (OSError, ValueError):
            return False

    def same_build(self, manifest: Any) -> bool:
        """Whether ``manifest`` (read from disk again) describes the artifact this one was opened as: the same
        files, written at the same time (evaluations recorded since do not count)."""
        return (isinstance(manifest, dict) and manifest.get("sha256") == self.manifest.get("sha256")
                and manifest.get("created") == self.manifest.get("created"))


class ArtifactReplaced(InputError):
    """The folder now holds another artifact than the one opened (``convert --force`` replaced it)."""


def folder_identity(path: Path) -> tuple[int, int] | None:
    """What tells one folder at ``path`` from the next: ``convert --force`` renames a new folder into place."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def while_not_replaced(path: Path, attempt: Callable[[bool], T], tries: int = 3) -> T:
    """``attempt(again)``, run again on the folder's new contents when it fails with a
    :class:`CorruptFileError` because another ``edgekit convert --force`` replaced the folder at ``path`` while
    it read it (files of two artifacts read as one look corrupt); ``again`` is True on such a rerun. A folder
    replaced ``tries`` times running is a one-line error that says to wait for the writer."""
    for i in range(tries):
        before = folder_identity(path)
        try:
            return attempt(i > 0)
        except CorruptFileError:
            if folder_identity(path) == before:
                raise
    raise CorruptFileError(f"{path} was replaced {tries} times while it was read: another 'edgekit convert "
                           "--force' keeps writing it; retry when that has finished")


def plain_json(value: Any) -> Any:
    """``value`` in JSON's own types, for ``to_dict`` methods: mappings as dicts with str keys, dataclasses as
    dicts (by their own ``to_dict`` or ``to_json`` where they have one), tuples, lists and sets as lists, paths
    as str, numpy scalars and arrays (anything with ``dtype`` and ``tolist``) as Python numbers and lists. A
    NaN or an infinity, which JSON cannot hold, is None; anything else is its ``str``."""
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy (and torch) without importing them
        value = value.tolist()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum, say, as the number
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own = getattr(value, "to_dict", None) or getattr(value, "to_json", None)
        if callable(own):
            return plain_json(own())
        return {f.name: plain_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (set, frozenset)):
        return sorted((plain_json(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return str(value)


def check_manifest(manifest: Any, mpath: Path) -> None:
    """Refuse a manifest whose shape edgekit cannot use, with a one-line error that says to rebuild it."""
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"{mpath} is not an edgekit manifest (a JSON object); {_RECONVERT}")
    schema = manifest.get("schema")
    if not isinstance(schema, str) or not schema.startswith("edgekit.artifact/"):
        raise CorruptFileError(f"{mpath} is not an edgekit manifest; {_RECONVERT}")
    version = schema.rsplit("/", 1)[1]
    if not version.isdigit():
        raise CorruptFileError(f"{mpath} has an unknown schema {schema!r}; {_RECONVERT}")
    if int(version) > int(SCHEMA.rsplit("/", 1)[1]):
        raise InputError(f"{mpath} was written by a newer edgekit ({schema}); upgrade edgekit to read it")
    if not isinstance(manifest.get("format"), str) or not manifest["format"]:
        raise CorruptFileError(f"{mpath} names no format (a string such as \"gguf\"); {_RECONVERT}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(files.get("model"), str):
        raise CorruptFileError(f"{mpath} lists no model file (\"files\": {{\"model\": NAME}}); {_RECONVERT}")
    if not all(isinstance(v, str) for v in files.values()):
        raise CorruptFileError(f"{mpath}: every entry of \"files\" must be a file name; {_RECONVERT}")
    sums = manifest.get("sha256", {})
    if not isinstance(sums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in sums.items()):
        raise CorruptFileError(f"{mpath}: \"sha256\" must map file names to hex digests; {_RECONVERT}")


def member(folder: Path, name: str, mpath: Path) -> Path:
    """``folder / name`` for a name read from ``mpath``, refused unless it stays inside ``folder`` (no absolute
    path, no '..', no symbolic link leading out)."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or any(ord(c) < 32 for c in name):
        raise CorruptFileError(f"{mpath} names {name!r}, which is not a file inside {folder}; {_RECONVERT}")
    path = folder / name
    if path.resolve() == folder.resolve():
        raise CorruptFileError(f"{mpath} names {name!r}, which is not a file inside {folder}; {_RECONVERT}")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CorruptFileError(f"{path} is a link leading out of {folder}; an artifact holds its own files: "
                               f"replace the link with the file, or {_RECONVERT}")
    return path


def is_artifact_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a well-formed edgekit manifest (what ``convert --force`` may replace)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        check_manifest(json.loads((folder / MANIFEST_NAME).read_text()), folder / MANIFEST_NAME)
    except InputError:  # a newer edgekit's artifact is still an artifact
        return True
    except (OSError, ValueError, CorruptFileError):
        return False
    return True


def checksum_files(folder: Path) -> dict[str, str]:
    """sha256 of every file just written into ``folder`` (but the manifest), by name, for its manifest."""
    sums = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME:
            sums[p.relative_to(folder).as_posix()] = sha256_file(p)
    return sums


def remember_checksums(art: Artifact) -> None:
    """Seed the sha256 cache with a fresh artifact's sums, so its first run does not hash it again."""
    for name, digest in (art.manifest.get("sha256") or {}).items():
        remember_sha256(art.path / name, digest)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(folder / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
