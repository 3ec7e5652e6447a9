"""sha256 of files, and a cache of them keyed by (path, size, mtime) in edgekit's home, so that re-converting a
source or verifying an artifact does not read every byte again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fsutil import atomic_file, edgekit_home


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: files whose sha256 is remembered: deleted temporary folders' files piled up for ever (24k, 4 MB read and
#: rewritten whole for each file hashed)
SHA_CACHE_ENTRIES = 2048


def _cache_key(path: Path) -> tuple[str, str]:
    st = path.stat()
    where = str(path.resolve())
    return where, f"{where}|{st.st_size}|{st.st_mtime_ns}"


def _update_sha_cache(where: str, key: str, digest: str | None) -> str:
    try:
        cache_path = edgekit_home() / "sha256-cache.json"
    except EdgekitError:  # a home set wrong only costs the hashing: a command that needs the home says why
        return digest if digest is not None else sha256_file(where)
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if digest is None and isinstance(cache.get(key), str):
        return cache[key]
    if digest is None:
        digest = sha256_file(where)
    # Entries for earlier sizes/mtimes of the same file can never match again; the newest SHA_CACHE_ENTRIES stay
    cache = {k: v for k, v in cache.items() if k.rsplit("|", 2)[0] != where}
    cache[key] = digest
    cache = dict(list(cache.items())[-SHA_CACHE_ENTRIES:])
    with contextlib.suppress(OSError, EdgekitError):  # a read-only or full cache only costs time
        edgekit_home(create=True)
        with atomic_file(cache_path) as tmp:
            tmp.write_text(json.dumps(cache))
    return digest


def sha256_file_cached(path: Path) -> str:
    """sha256 of ``path``, remembered by (path, size, mtime) so re-converting a source does not rehash it."""
    where, key = _cache_key(Path(path))
    return _update_sha_cache(where, key, None)


def remember_sha256(path: Path, digest: str) -> None:
    """Record ``digest`` as ``path``'s sha256 (just written, so hashed already) for :func:`sha256_file_cached`."""
    where, key = _cache_key(Path(path))
    _update_sha_cache(where, key, digest)


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over several files (sorted by name), for sharded checkpoints."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file_cached(p).encode())
    return h.hexdigest()
