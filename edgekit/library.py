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
import hashlib
import json
import os
import re
import secrets
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, InputError
from edgekit.fslimits import NAME_MAX, deletion_blocker
from edgekit.fsutil import (
    OUTPUT_MARKERS,
    TEMP_NAME_RE,
    abandoned,
    edgekit_home,
    hold_lock,
    home_problem,
    is_edgekit_output,
    make_dir,
    rename_noreplace,
)

MANIFEST = "edgekit.json"
SCHEMA = "edgekit.artifact/1"  # the manifest schema this edgekit writes (edgekit.artifact uses it from here)
_UNSAFE = re.compile(r"[^a-z0-9._+-]+")
BROKEN = f"unreadable {MANIFEST}: rm it, or re-convert with --force"
NEWER = "written by a newer edgekit"  # how damage() starts for a manifest of a later schema


def store_dir(folder: str | Path | None = None, create: bool = False) -> Path:
    """The library folder: ``folder`` when given, else ``$EDGEKIT_MODELS``, else ``<home>/models``; made only
    when ``create`` (``ls`` of a library that does not exist, or cannot be made, finds it empty, and leaves the
    home unmade). A library that can be no folder (a file, a broken link) is the one-line error either way."""
    env = os.environ.get("EDGEKIT_MODELS", "")
    if folder is None and env:
        if not env.strip():  # a folder named " " in every working directory
            raise InputError(f"EDGEKIT_MODELS is {env!r}, blank; set it to an absolute folder, or unset it "
                             "(the library is then models/ in edgekit's home)")
        path, what = Path(env).expanduser(), "EDGEKIT_MODELS"
        if not path.is_absolute():  # a library that moves with the working directory: never what was meant
            raise InputError(f"EDGEKIT_MODELS is {env!r}, a relative path; set it to an absolute one "
                             f"(e.g. {path.absolute()})")
        fix = "point EDGEKIT_MODELS at a folder"
    elif folder is not None:
        path, what, fix = Path(folder).expanduser(), "the library", "choose another folder"
    else:
        home = edgekit_home(create=False)
        if create and (problem := home_problem(home)):
            raise InputError(problem)
        path, what, fix = home / "models", "the library", "set EDGEKIT_MODELS to a folder"
    if path.is_symlink() and not path.exists():
        raise InputError(f"{what} is {path}, a broken symbolic link (to {os.readlink(path)}); make the folder it "
                         f"leads to, remove the link, or {fix}")
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} is {path}, a file, not a folder; {fix} (or move the file)")
    if create:
        make_dir(path, "set EDGEKIT_MODELS to another folder (or give -o)")
    return path


def artifact_name(model: str, *parts: str) -> str:
    """``("SmolLM2-135M-Instruct", "gguf-Q4_K_M")`` -> ``smollm2-135m-instruct-gguf-q4_k_m``: lower case,
    accents dropped where that leaves ASCII (``mödel`` -> ``model``), the letters and digits of other scripts
    kept as they are (``日本`` -> ``日本-gguf-q8_0``, so two such models do not get the same name), anything else
    but letters, digits, ``.``, ``_``, ``+`` and ``-`` made a dash."""
    text = "-".join(p for p in (model, *parts) if p)
    kept: list[str] = []
    for c in unicodedata.normalize("NFKC", text):
        plain = "".join(d for d in unicodedata.normalize("NFKD", c) if not unicodedata.combining(d))
        if plain.isascii():
            kept.append(plain.lower())
        elif c.isalnum():
            kept.append(c.lower())
        elif unicodedata.category(c).startswith("M") and kept and not kept[-1][-1:].isascii():
            kept.append(c)  # a vowel sign or other mark of the letter before it (हिंदी), not an accent
        else:
            kept.append("-")
    text = "".join(ch if not ch.isascii() else _UNSAFE.sub("-", ch) for ch in "".join(kept))
    return re.sub(r"-{2,}", "-", text).strip("-.") or "model"


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
    """One artifact of the store, from its manifest (``eval``: the latest recorded evaluation, if any).
    ``problem``: what is wrong with it and the fix (its manifest or files damaged), else empty; ``link``: the
    folder a symbolic link in the store leads to, else empty."""

    name: str
    path: Path
    format: str
    preset: str
    size_bytes: int
    bpw: float | None
    source: str
    created: str
    eval: dict[str, Any] | None
    problem: str = ""
    link: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "format": self.format, "preset": self.preset,
                "size_bytes": self.size_bytes, "bpw": self.bpw, "source": self.source, "created": self.created,
                "eval": self.eval, "problem": self.problem or None, "link": self.link or None}


def folder_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take (links not followed)."""
    total = 0
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def damage(folder: Path, manifest: dict[str, Any]) -> str:
    """What is wrong with an artifact, from its manifest's schema and its files' sizes alone (nothing is
    hashed, so ``ls`` stays fast): written by a newer edgekit, a file its manifest names that is missing, or files smaller than the model size it recorded;
    empty when nothing is. ``run`` and ``push`` check the sha256 of each file besides."""
    schema = str(manifest.get("schema", ""))
    version, current = schema.rsplit("/", 1)[-1], SCHEMA.rsplit("/", 1)[1]
    if version.isdigit() and int(version) > int(current):
        return f"{NEWER} ({schema}): upgrade edgekit to use it"
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    sums = manifest.get("sha256") if isinstance(manifest.get("sha256"), dict) else {}
    names = [n for n in dict.fromkeys(n for n in [*files.values(), *sums] if isinstance(n, str))
             if n and not Path(n).is_absolute() and ".." not in Path(n).parts]  # data from disk: stay inside
    for name in names:
        if not (folder / name).exists():
            return f"{name} is missing: re-convert with --force"
    total = 0
    for name in [n for n in names if n in sums] or names:  # every file written, when the manifest lists them
        p = folder / name
        with contextlib.suppress(OSError):
            total += folder_bytes(p) if p.is_dir() else p.stat().st_size
    recorded = manifest.get("size_bytes")
    if names and isinstance(recorded, int) and total < recorded:
        return f"model file truncated ({total / 1e6:.1f} of {recorded / 1e6:.1f} MB): re-convert with --force"
    return ""


def read_entry(folder: Path) -> Entry | None:
    """The store entry for ``folder``, or None when it holds no edgekit manifest; a manifest there that cannot
    be read gives an entry with ``problem`` set (listed, so it can be seen and removed)."""
    link = str(folder.resolve()) if folder.is_symlink() else ""
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        m = None
    if not isinstance(m, dict):
        if not (folder / MANIFEST).is_file():
            return None
        return Entry(name=folder.name, path=folder, format="?", preset="-", size_bytes=folder_bytes(folder),
                     bpw=None, source="-", created="", eval=None, problem=BROKEN, link=link)
    if not str(m.get("schema", "")).startswith("edgekit.artifact/"):
        return None
    src = m.get("source") if isinstance(m.get("source"), dict) else {}
    evals = [e for e in m.get("eval") or [] if isinstance(e, dict)]
    bpw = m.get("bpw")
    return Entry(name=folder.name, path=folder, format=str(m.get("format", "?")), preset=str(m.get("preset") or "-"),
                 size_bytes=folder_bytes(folder), bpw=float(bpw) if isinstance(bpw, (int, float)) else None,
                 source=Path(str(src.get("path", ""))).name or "-", created=str(m.get("created", ""))[:19],
                 eval=evals[-1] if evals else None, problem=damage(folder, m), link=link)


def entries(folder: str | Path | None = None) -> list[Entry]:
    """Every artifact in the store, by name, each at its absolute path (hidden and temporary folders left out;
    a symbolic link to an artifact folder is listed with ``link`` set)."""
    root = store_dir(folder)
    if not root.is_dir():
        return []
    root = Path(os.path.abspath(root))  # absolute paths, which a script can reuse from any folder (links kept)
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        entry = read_entry(child)
        if entry is not None:
            found.append(entry)
    return found


@dataclass(frozen=True)
class Leftover:
    """What a killed edgekit left in the store: a hidden ``.NAME.partial-PID-*`` folder (a conversion's output
    before its rename), or a ``.NAME.old-PID-*`` one (an artifact ``rm`` or ``--force`` was deleting)."""

    path: Path
    size_bytes: int
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "pid": self.pid}


def leftovers(folder: str | Path | None = None) -> list[Leftover]:
    """The leftovers of killed edgekit runs in the store: its hidden temporary names whose writer is gone (its
    pid not running and nobody holding the lock on it), the ones a write into the store sweeps
    (:func:`edgekit.fsutil.sweep_stale`, which removes them). A running conversion's folder is not one."""
    root = store_dir(folder)
    if not root.is_dir():
        return []
    root = Path(os.path.abspath(root))
    found = []
    for child in sorted(root.iterdir()):
        if (m := TEMP_NAME_RE.match(child.name)) and abandoned(child):
            with contextlib.suppress(OSError):  # gone meanwhile (a sweep, another ls --clean)
                size = folder_bytes(child) if child.is_dir() else child.stat().st_size
                found.append(Leftover(path=child, size_bytes=size, pid=int(m["pid"])))
    return found


def chat_file(artifact: Path, create_home: bool | None = None) -> Path:
    """Where ``edgekit chat`` keeps the conversation with ``artifact`` (a folder or model file): one file per
    resolved path, under ``<home>/chats`` (``create_home``: as :func:`edgekit_home`'s ``create``). The key is the
    path's bytes as the file system holds them: a name that is not UTF-8 (Python's lone surrogates) has one too."""
    key = hashlib.sha1(os.fsencode(Path(artifact).resolve())).hexdigest()[:16]
    return edgekit_home(create=create_home) / "chats" / f"{key}.json"


def forget_chat(artifact: Path) -> None:
    """Delete the conversation kept with ``artifact``, which was deleted: an artifact written at its path later
    starts afresh. The CLI's ``rm`` and the TUI's delete both come here."""
    with contextlib.suppress(OSError, EdgekitError):  # no home, or none that can be used: no chat kept there
        chat_file(artifact, create_home=False).unlink(missing_ok=True)


def check_removable(path: Path) -> None:
    """Refuse what ``rm`` must not delete: anything but a folder edgekit wrote (its ``edgekit.json``, even
    damaged, is edgekit's mark) or a symbolic link to an artifact (the link alone goes)."""
    if path.is_symlink():
        if path.is_dir() and read_entry(path) is not None:
            return
        raise InputError(f"{path} is a symbolic link to {path.resolve()}, not to an edgekit artifact; rm only "
                         "deletes what edgekit wrote, so nothing was deleted (remove the link itself with rm(1))")
    if not path.is_dir() or not (is_edgekit_output(path) or (path / MANIFEST).is_file()):
        raise InputError(f"{path} is not an edgekit artifact (no {MANIFEST}); rm only deletes what edgekit "
                         "wrote, so nothing was deleted")


def stamp(path: Path) -> tuple[int, int, str]:
    """What tells the artifact at ``path`` from one written there later: its folder's device and inode, and
    the time its manifest says it was created (a link: the link's own, and where it leads)."""
    st = path.lstat()
    if path.is_symlink():
        return st.st_dev, st.st_ino, os.readlink(path)
    try:
        created = str(json.loads((path / MANIFEST).read_text()).get("created", ""))
    except (OSError, ValueError, AttributeError):
        created = ""
    return st.st_dev, st.st_ino, created


def _aside(path: Path) -> Path:
    """The hidden ``.NAME.old-PID-*`` name ``remove`` moves ``path`` to (a hash for a name too long to carry)."""
    name = path.name
    if len(os.fsencode(name)) > NAME_MAX - len("..old--") - 7 - 8:
        name = hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    return path.parent / f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}"


def _put_back(tmp: Path, path: Path) -> Path:
    """Move what ``remove`` set aside at ``tmp`` back to ``path``; where that name was taken meanwhile, to a
    visible ``NAME.kept-*`` beside it, never left under the hidden name that a later write sweeps as a killed
    edgekit's. Returns where it is now."""
    name = path.name if len(os.fsencode(path.name)) <= 200 else hashlib.sha1(os.fsencode(path.name)).hexdigest()[:16]
    for dest in (path, path.parent / f"{name}.kept-{secrets.token_hex(4)}"):
        with contextlib.suppress(OSError):
            rename_noreplace(tmp, dest)
            return dest
    return tmp


def remove(path: Path, expect: tuple[int, int, str] | None = None) -> int:
    """Delete an artifact folder (or a checkpoint edgekit imported) and the chat kept with it; returns the bytes
    freed. A symbolic link to an artifact loses the link only, never what it leads to. Anything else is
    refused untouched, and so is an artifact whose :func:`stamp` is no longer ``expect`` (what the user
    confirmed was replaced meanwhile), and one this process may not delete (another user's): checked first,
    so nothing is touched. The folder is renamed to a hidden temporary name before its files go, so an
    interrupted removal leaves no half artifact under the real name (the next write into the store sweeps it);
    a removal that fails puts it back under its name and says so."""
    check_removable(path)
    if why := deletion_blocker(path):
        raise InputError(f"cannot delete {path}: {why}; nothing was deleted: ask its owner to delete it (or to "
                         "fix its permissions)")
    link = path.is_symlink()
    size = 0 if link else folder_bytes(path)
    tmp = _aside(path)
    path.rename(tmp)
    fd = None if link else hold_lock(tmp)
    try:
        if expect is not None and stamp(tmp) != expect:  # checked once moved aside: nothing can swap it now
            if (back := _put_back(tmp, path)) != path:
                raise InputError(f"{path} was replaced by another edgekit while you confirmed, and another one "
                                 f"appeared there since; nothing was deleted: the replacement is at {back}, move it "
                                 "back")
            raise InputError(f"{path} was replaced by another edgekit while you confirmed; nothing was deleted")
        if link:
            tmp.unlink()
            return 0
        files = _count_files(tmp)
        try:
            _delete(tmp)
        except OSError as exc:  # what the check could not foresee (an immutable file, a race): undone
            back = _put_back(tmp, path)
            where = "" if back == path else f" (now at {back}: another one took its name, move it back)"
            left = _count_files(back)
            done = (f"{files - left} of its {files} files were deleted, so it is damaged{where}: once that is fixed, "
                    "rm it again") if left < files else f"nothing was deleted{where}: fix that, then retry"
            raise InputError(f"cannot delete {path}: {exc.strerror or exc} ({exc.filename}); {done}") from None
    finally:
        if fd is not None:
            os.close(fd)
    forget_chat(path)
    return size


def _delete(folder: Path) -> None:
    """``folder`` and all it holds, its manifest last: a removal that stops part-way leaves an artifact that
    ``ls`` lists as damaged and ``rm`` takes, not a folder nothing of edgekit's recognises."""
    markers = []
    for child in sorted(folder.iterdir()):  # in one order, so what a failure leaves can be said
        if child.name in OUTPUT_MARKERS:
            markers.append(child)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for marker in markers:
        marker.unlink()
    folder.rmdir()


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))
