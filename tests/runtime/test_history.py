"""The profile history database on a full or unwritable disk: edgekit's one line with the fix, never
SQLite's bare OperationalError."""

from __future__ import annotations

import pytest

from edgekit.errors import DiskFullError
from edgekit.runtime.history import History
from edgekit.runtime.profile_schema import ProfileRow


def _row() -> ProfileRow:
    return ProfileRow(test="tg4", n_prompt=0, n_gen=4, n_depth=0, artifact={"name": "tiny"}, config={},
                      samples_s=[0.1], host={"fingerprint": "h"})


def test_a_full_disk_under_the_history_is_the_disk_full_error(tmp_path):
    path = tmp_path / "profile.sqlite"
    with History(path) as h:
        h.save([_row()], started="t0", status="ok", host={"fingerprint": "h"})
        (pages,) = h._db.execute("PRAGMA page_count").fetchone()
        h._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full", for real
        with pytest.raises(DiskFullError) as caught:
            h.save([_row()], started="t1", status="ok", host={"fingerprint": "h", "pad": "x" * 100_000})
    msg = str(caught.value)
    assert msg.startswith(f"the disk filled up while writing {path}") and "EDGEKIT_HOME" in msg
    assert "--no-history" in msg
    with History(path) as h:
        assert len(h.rows()) == 1  # the failed run left nothing half-written
