"""A damaged AQLM encoding cache entry (~/.cache/edgekit/aqlm/<key>) is a cache miss: a one-line warning, then
the layers are encoded again and the entry rewritten; never an internal error."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.converters.test_aqlm import _convert_tiny

pytest.importorskip("torch")

DAMAGE = {
    "report garbage": lambda c: (c / "report.json").write_text('{"report": '),
    "report without tensors": lambda c: (c / "report.json").write_text(json.dumps({"report": {}})),
    "encoding truncated": lambda c: (c / "encoded.safetensors").write_bytes(
        (c / "encoded.safetensors").read_bytes()[:500]),
    "encoding missing": lambda c: (c / "encoded.safetensors").unlink(),
}


@pytest.fixture(scope="module")
def encoded(tiny_llama, tmp_path_factory):
    """A distill-free AQLM conversion of the tiny Llama, and the edgekit home holding its encoding cache."""
    root = tmp_path_factory.mktemp("aqlmcache")
    return _convert_tiny(tiny_llama, root / "a", root / "home", distill=False), root / "home"


def _home_copy(encoded, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(encoded[1], home)
    (cache,) = (home / "aqlm").iterdir()
    return home, cache


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_unreadable_aqlm_cache_entry_is_discarded_with_a_warning(encoded, tmp_path, damage):
    from edgekit.converters.quantize.aqlm import AQLMQuantizer

    _, cache = _home_copy(encoded, tmp_path)
    assert AQLMQuantizer()._load_cached(cache)  # intact: taken
    DAMAGE[damage](cache)
    q = AQLMQuantizer()
    with pytest.warns(UserWarning, match="could not be read") as rec:
        assert not q._load_cached(cache)
    line = next(str(w.message) for w in rec if "could not be read" in str(w.message))
    assert str(cache) in line and "encoding again" in line and "\n" not in line
    assert not cache.exists() and not q._bytes and q.report == {}


def test_convert_with_a_damaged_aqlm_cache_encodes_again(encoded, tiny_llama, tmp_path):
    from safetensors.numpy import load_file

    home, cache = _home_copy(encoded, tmp_path)
    DAMAGE["encoding truncated"](cache)
    with pytest.warns(UserWarning, match="could not be read"):
        again = _convert_tiny(tiny_llama, tmp_path / "b", home, distill=False)
    a, b = load_file(str(encoded[0].path / "model.safetensors")), load_file(str(again.path / "model.safetensors"))
    assert a.keys() == b.keys()
    load_file(str(cache / "encoded.safetensors"))  # rewritten whole
    assert (cache / "report.json").is_file()


@pytest.mark.parametrize("failure", ["safetensors full disk", "read-only home"])
def test_an_encoding_that_cannot_be_cached_is_a_warning_and_leaves_nothing(tmp_path, monkeypatch, failure):
    """safetensors reports a full disk as SafetensorError (no OSError): still only a lost shortcut."""
    import errno

    import numpy as np
    import safetensors.numpy
    from safetensors import SafetensorError

    from edgekit.converters.quantize.aqlm import AQLMQuantizer

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    if failure == "read-only home":
        monkeypatch.setattr("tempfile.mkdtemp", read_only)
    q = AQLMQuantizer()
    q._bytes, q.report = {"token_embd.weight": np.zeros((4, 8), np.float32)}, {}
    cache = tmp_path / "aqlm" / "0123abcd"
    with pytest.warns(UserWarning, match="could not be cached") as rec:
        q._save(cache)
    line = next(str(w.message) for w in rec if "could not be cached" in str(w.message))
    assert "EDGEKIT_HOME" in line and "\n" not in line
    assert list((tmp_path / "aqlm").iterdir()) == []  # no .KEY-xxxx folder left behind
