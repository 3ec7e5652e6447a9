"""Profile history: every run's rows in SQLite under ``edgekit_home()/profile.sqlite``, so
``edgekit profile --compare`` shows how an artifact's speed changed over time on this host.

A row is keyed for comparison by host fingerprint, artifact sha256, test and configuration; the
full JSON row is kept too, so nothing measured is lost to the schema.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError, DiskFullError, EdgekitError, InputError
from edgekit.fsutil import HOME_ELSEWHERE, edgekit_home, make_dir
from edgekit.runtime.profile_schema import ProfileRow

_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL,
    status TEXT NOT NULL,
    host_fingerprint TEXT,
    host TEXT
);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    timestamp TEXT,
    status TEXT,
    host_fingerprint TEXT,
    artifact_name TEXT,
    artifact_sha256 TEXT,
    artifact_size INTEGER,
    test TEXT,
    config_key TEXT,
    tps_mean REAL,
    tps_stddev REAL,
    peak_rss_bytes INTEGER,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_key ON rows(host_fingerprint, artifact_name, test, config_key);
"""
_CONFIG_KEYS = ("n_threads", "n_batch", "n_ctx", "n_gpu_layers", "type_k", "type_v", "offload_kqv", "tensor_overrides",
                "n_expert_used")


def config_key(config: dict[str, Any]) -> str:
    """The part of a row's config that must match for two rows to be compared."""
    return json.dumps({k: config.get(k) for k in _CONFIG_KEYS}, sort_keys=True)


class History:
    """The local history database. ``path`` defaults to ``edgekit_home()/profile.sqlite``."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else edgekit_home() / "profile.sqlite"
        make_dir(self.path.parent, f"{HOME_ELSEWHERE} (or pass --no-history)")
        try:
            self._db = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise self._write_error(exc) or InputError(
                f"cannot open {self.path} ({exc}); move it away to start a new one (or pass --no-history)") from exc
        try:
            self._db.executescript(_DDL)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if (mapped := self._write_error(exc)) is not None:
                raise mapped from exc
            raise CorruptFileError(f"{self.path} is not a readable profile history ({exc}); move it away to start "
                                   "a new one (or pass --no-history)") from exc

    def _write_error(self, exc: sqlite3.Error) -> EdgekitError | None:
        """SQLite's full disk and unwritable file as edgekit's one line with the fix; None for other errors."""
        text = str(exc).lower()
        if "disk is full" in text:
            return DiskFullError(f"the disk filled up while writing {self.path}; free some space, or "
                                 f"{HOME_ELSEWHERE} (or pass --no-history)")
        if "readonly" in text or "unable to open" in text:
            return InputError(f"cannot write {self.path} ({exc}); make it writable or {HOME_ELSEWHERE} "
                              "(or pass --no-history)")
        return None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self, rows: list[ProfileRow], *, started: str, status: str, host: dict[str, Any]) -> int:
        """Store one run (one transaction: all rows or none); returns its id."""
        try:
            return self._save(rows, started=started, status=status, host=host)
        except sqlite3.OperationalError as exc:
            if (mapped := self._write_error(exc)) is not None:
                raise mapped from exc
            raise

    def _save(self, rows: list[ProfileRow], *, started: str, status: str, host: dict[str, Any]) -> int:
        with self._db:
            cur = self._db.execute("INSERT INTO runs(started, status, host_fingerprint, host) VALUES (?,?,?,?)",
                                   (started, status, host.get("fingerprint"), json.dumps(host)))
            run_id = int(cur.lastrowid or 0)
            for r in rows:
                mean, std = r.tps
                self._db.execute(
                    "INSERT INTO rows(run_id, timestamp, status, host_fingerprint, artifact_name, artifact_sha256, "
                    "artifact_size, test, config_key, tps_mean, tps_stddev, peak_rss_bytes, data) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (run_id, r.timestamp, r.status, (r.host or host).get("fingerprint"), r.artifact.get("name"),
                     r.artifact.get("sha256"), r.artifact.get("size_bytes"), r.test, config_key(r.config), mean, std,
                     r.peak_rss_bytes, json.dumps(r.to_json())))
        return run_id

    def rows(self, artifact: str | None = None, limit: int = 1000) -> list[ProfileRow]:
        """Stored rows, oldest first; ``artifact`` filters by name (or sha256 prefix)."""
        sql, args = "SELECT data FROM rows", []
        if artifact:
            sql += " WHERE artifact_name = ? OR artifact_sha256 LIKE ?"
            args = [artifact, artifact + "%"]
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [ProfileRow.from_json(json.loads(d)) for (d,) in reversed(self._db.execute(sql, args).fetchall())]

    def compare(self, artifact: str | None = None, last: int = 5) -> list[dict[str, Any]]:
        """Per (host, artifact, test, config): the last ``last`` runs' tokens/s over time, and the change of
        the newest against the one before (``change`` as a fraction; None with a single run)."""
        groups: dict[tuple[str, ...], list[ProfileRow]] = {}
        for r in self.rows(artifact, limit=100_000):
            if r.status == "error" or not r.samples_s:
                continue
            key = ((r.host or {}).get("fingerprint", ""), r.artifact.get("name", ""), r.artifact.get("sha256") or "",
                   r.test, config_key(r.config))
            groups.setdefault(key, []).append(r)
        out = []
        for (fp, name, sha, test, ckey), rs in groups.items():
            rs = rs[-last:]
            series = [{"timestamp": r.timestamp, "tps": r.tps[0], "tps_stddev": r.tps[1], "status": r.status,
                       "peak_rss_bytes": r.peak_rss_bytes} for r in rs]
            change = None
            if len(rs) > 1 and series[-2]["tps"]:
                change = series[-1]["tps"] / series[-2]["tps"] - 1
            out.append({"host": fp, "artifact": name, "sha256": sha[:12], "test": test, "config": json.loads(ckey),
                        "runs": series, "change": change})
        return out
