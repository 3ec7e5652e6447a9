"""The artifact catalog behind the artifacts screen (no Textual): scan, rows from manifests, delete."""

from __future__ import annotations

import json
import shutil

import pytest

from edgekit.errors import InputError
from edgekit.tui.catalog import delete_artifact, find_artifacts, human_bytes, row_for


def test_scan_lists_folders_and_bare_files_with_their_manifests(models):
    shutil.copy(models / "tiny-q8" / "model.gguf", models / "loose.gguf")
    (models / ".tiny-x.partial-abc").mkdir()  # a conversion in progress: hidden, never listed
    (models / "notes").mkdir()
    rows = find_artifacts(models)
    assert [r.name for r in rows] == ["loose", "tiny-f16", "tiny-q8"]
    by = {r.name: r for r in rows}
    assert by["tiny-f16"].quant == "F16" and by["tiny-q8"].quant == "Q8_0"
    assert by["tiny-q8"].method == "rtn" and by["tiny-q8"].format == "gguf"
    assert by["tiny-q8"].bpw == pytest.approx(json.loads((models / "tiny-q8" / "edgekit.json").read_text())["bpw"])
    assert by["loose"].bare and by["loose"].quant == "-" and by["loose"].size_bytes > 0
    assert by["tiny-f16"].size_bytes > by["tiny-q8"].size_bytes


def test_eval_results_and_broken_manifests_show(models):
    manifest = json.loads((models / "tiny-q8" / "edgekit.json").read_text())
    manifest["eval"] = [{"ppl": 12.5, "kl_mean": 0.0123}]
    (models / "tiny-q8" / "edgekit.json").write_text(json.dumps(manifest))
    (models / "broken").mkdir()
    (models / "broken" / "edgekit.json").write_text("{not json")
    rows = {r.name: r for r in find_artifacts(models)}
    assert rows["tiny-q8"].ppl == 12.5 and rows["tiny-q8"].kl == 0.0123
    assert "not valid JSON" in rows["broken"].problem


def test_delete_removes_only_artifacts(models, tmp_path):
    row = row_for(models / "tiny-f16")
    delete_artifact(row)
    assert not (models / "tiny-f16").exists() and (models / "tiny-q8").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    fake = row.__class__(**{**row.__dict__, "path": plain, "bare": False})
    with pytest.raises(InputError, match="only deletes folders it made"):
        delete_artifact(fake)
    assert plain.exists()


def test_bad_folder_says_what_to_give(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        find_artifacts(tmp_path / "nope")


def test_human_bytes():
    assert human_bytes(999) == "999 B" and human_bytes(1500) == "1.5 KB" and human_bytes(2.5e9) == "2.5 GB"
