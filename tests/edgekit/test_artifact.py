"""Artifacts on disk: folders with a manifest, bare model files, and what is wrong with bad ones."""

from __future__ import annotations

import json

import pytest

from edgekit.artifact import MANIFEST_NAME, SCHEMA, Artifact, write_manifest
from edgekit.errors import CorruptFileError, InputError


def _folder(tmp_path, manifest=None, model="model.gguf"):
    d = tmp_path / "art"
    d.mkdir()
    (d / model).write_bytes(b"GGUF")
    write_manifest(d, manifest or {"schema": SCHEMA, "format": "gguf", "files": {"model": model}})
    return d


def test_folder_and_bare_file(tmp_path):
    d = _folder(tmp_path)
    art = Artifact.open(d)
    assert (art.format, art.model_file, art.name, art.bare_file) == ("gguf", d / "model.gguf", "art", None)
    bare = Artifact.open(d / "model.gguf")
    assert bare.format == "gguf" and bare.bare_file == d / "model.gguf" and bare.name == "model"
    (d / MANIFEST_NAME).unlink()
    assert Artifact.open(d).bare_file == d / "model.gguf"  # a folder holding one model file


def test_record_eval_is_saved_atomically(tmp_path):
    d = _folder(tmp_path)
    art = Artifact.open(d)
    art.record_eval({"ppl": 12.5, "text": "valid.txt"})
    saved = json.loads((d / MANIFEST_NAME).read_text())
    assert saved["eval"][0]["ppl"] == 12.5 and "measured" in saved["eval"][0]
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST_NAME, "model.gguf"]  # no temporary left


@pytest.mark.parametrize("case, error, match", [
    ("missing", InputError, "does not exist"),
    ("unknown suffix", InputError, "not a model file edgekit knows"),
    ("no manifest", InputError, "has no edgekit.json"),
    ("bad json", CorruptFileError, "is not valid JSON"),
    ("foreign json", CorruptFileError, "is not an edgekit manifest"),
    ("newer schema", InputError, "newer edgekit"),
    ("model missing", CorruptFileError, "is missing from the artifact"),
])
def test_bad_artifacts_say_what_to_do(tmp_path, case, error, match):
    target = tmp_path / "art"
    if case == "unknown suffix":
        target = tmp_path / "weights.bin"
        target.write_bytes(b"x")
    elif case == "no manifest":
        target.mkdir()
        (target / "a.gguf").write_bytes(b"x")
        (target / "b.gguf").write_bytes(b"x")
    elif case != "missing":
        d = _folder(tmp_path)
        m = d / MANIFEST_NAME
        if case == "bad json":
            m.write_text("{not json")
        elif case == "foreign json":
            m.write_text(json.dumps({"schema": "other/1"}))
        elif case == "newer schema":
            m.write_text(json.dumps({"schema": "edgekit.artifact/99", "format": "gguf", "files": {"model": "model.gguf"}}))
        else:
            (d / "model.gguf").unlink()
    with pytest.raises(error, match=match):
        Artifact.open(target)
