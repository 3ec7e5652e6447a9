"""An artifact folder that another ``convert --force`` replaces while it is read or measured (QA s55 c): readers
load the new one whole instead of calling a healthy file corrupt, and a measurement of the old model is never
written into the new one's manifest."""

from __future__ import annotations

import json
import warnings

import pytest

from edgekit import api
from edgekit.artifact import Artifact
from edgekit.errors import CorruptFileError

TEXT = "The river ran past the mill and the town. " * 40


@pytest.fixture()
def art(tiny_llama, tmp_path):
    return api.convert(tiny_llama, "gguf", output=tmp_path / "art", recipe=api.ConvertRecipe(preset="Q8_0")).path


def _replace(tiny_llama, out, preset="Q4_0"):
    api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(preset=preset), force=True)


def test_an_eval_of_a_replaced_artifact_is_not_recorded_in_the_new_one(tiny_llama, art, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    swapped = []

    def progress(desc, done, total):
        if not swapped:  # the measurement has started on the Q8_0 file: another process replaces the folder
            swapped.append(1)
            _replace(tiny_llama, art)

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = api.evaluate(art, text, api.EvalConfig(ctx=64), progress=progress, n_threads=1)
    assert swapped and result.ppl > 0
    manifest = json.loads((art / "edgekit.json").read_text())
    assert manifest["preset"] == "Q4_0" and "eval" not in manifest  # the Q8_0 result stayed out of it
    assert any("replaced by another conversion while it was measured" in str(w.message) for w in said)
    api.evaluate(art, text, api.EvalConfig(ctx=64), n_threads=1)  # measured as it is now: recorded
    assert len(json.loads((art / "edgekit.json").read_text())["eval"]) == 1


def test_results_that_end_at_once_all_land(art):
    """Each evaluation adds its result to the manifest on disk: one opened earlier does not overwrite another's."""
    opened = [Artifact.open(art) for _ in range(5)]
    for i, a in enumerate(opened):
        a.record_eval({"ppl": float(i)})
    assert [e["ppl"] for e in json.loads((art / "edgekit.json").read_text())["eval"]] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_load_that_straddles_a_replacement_loads_the_new_artifact(tiny_llama, art, monkeypatch):
    """llama.cpp opens the file twice (header, then data): a folder swapped between the two reads as a corrupt
    file. The load runs again on the folder's new contents."""
    real = api._open_backend
    calls = []

    def straddled(target, backend=None, **options):
        calls.append(target.manifest["preset"])
        if len(calls) == 1:
            _replace(tiny_llama, art)
            raise CorruptFileError(f"llama.cpp could not load {target.model_file} (tensor data is not within the file "
                                   "bounds)")
        return real(target, backend, **options)

    monkeypatch.setattr(api, "_open_backend", straddled)
    with api.open_backend(art, n_ctx=64, n_threads=1) as backend:
        assert backend is not None
    assert calls == ["Q8_0", "Q4_0"]
    info_calls = []

    def inspect_straddled(target, ctx=None):
        info_calls.append(1)
        if len(info_calls) == 1:
            _replace(tiny_llama, art, "Q8_0")
            raise CorruptFileError("model.gguf is a corrupt GGUF file: past the end of the file (truncated?)")
        return real_inspect(target, ctx)

    import edgekit.describe as describe

    real_inspect = describe.inspect_target
    monkeypatch.setattr(describe, "inspect_target", inspect_straddled)
    assert api.inspect(art)["preset"] == "Q8_0" and len(info_calls) == 2


def test_a_held_artifact_replaced_since_loads_as_it_now_is(tiny_llama, art):
    held = Artifact.open(art)
    _replace(tiny_llama, art)
    with api.open_backend(held, n_ctx=64, n_threads=1):
        pass  # was: "model.gguf changed since it was converted ... corrupt" (the held manifest's checksums)


def test_a_corrupt_file_in_a_folder_nobody_replaces_is_still_an_error(art, tmp_path):
    model = art / "model.gguf"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="changed since it was converted"):
        api.open_backend(art, n_ctx=64, n_threads=1)
    from edgekit.artifact import while_not_replaced

    tries = []

    def always(again):
        tries.append(again)
        raise CorruptFileError("bad")

    with pytest.raises(CorruptFileError, match="bad"):
        while_not_replaced(art, always)
    assert tries == [False]
