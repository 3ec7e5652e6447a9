"""A damaged calibration cache entry (~/.cache/edgekit/calib/<tag>.npy) is a cache miss: sampled again and
replaced, never an internal error."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.calibration import CalibConfig, calibration_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = CalibConfig(samples=2, seqlen=16)


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(100))


def _pickled(path):
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


DAMAGE = {
    "garbage": _garbage,
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:140]),
    "pickled objects": _pickled,
    "float dtype": lambda p: np.save(p, np.zeros((CFG.samples, CFG.seqlen), np.float32)),
    "wrong shape": lambda p: np.save(p, np.zeros((1, 8), np.int64)),
    "ids beyond the vocabulary": lambda p: np.save(p, np.full((CFG.samples, CFG.seqlen), 10**6, np.int64)),
    "negative ids": lambda p: np.save(p, np.full((CFG.samples, CFG.seqlen), -1, np.int64)),
}


@pytest.fixture(scope="module")
def model_and_tok(tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_calibration_cache_is_a_miss_and_is_rewritten(model_and_tok, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path))
    model, tok = model_and_tok
    first = calibration_tokens(model, tok, CFG, cache_key="k")
    (entry,) = (tmp_path / "calib").iterdir()
    DAMAGE[damage](entry)
    again = calibration_tokens(model, tok, CFG, cache_key="k")
    assert again.dtype == torch.long and torch.equal(again, first)  # sampled again (the same seed)
    assert sorted(p.name for p in (tmp_path / "calib").iterdir()) == [entry.name]  # replaced, nothing beside it
    assert np.array_equal(np.load(entry, allow_pickle=False), first.numpy())
    assert torch.equal(calibration_tokens(model, tok, CFG, cache_key="k"), first)  # and now a hit


def test_cli_convert_with_a_damaged_calibration_cache(tiny_llama, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    args = ["convert", str(tiny_llama), "-t", "1", "--method", "gptq", "--calib-samples", "2",
            "--calib-seqlen", "16"]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    (entry,) = (tmp_path / "home" / "calib").iterdir()
    _garbage(entry)
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output
    assert (tmp_path / "b" / "edgekit.json").is_file()
    assert np.load(entry, allow_pickle=False).shape == (2, 16)


def test_a_calibration_cache_that_cannot_be_written_is_a_warning(model_and_tok, tmp_path, monkeypatch):
    """A full (or read-only) EDGEKIT_HOME must not stop a calibrated convert whose output has room."""
    import errno

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path))
    model, tok = model_and_tok

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.warns(UserWarning, match="could not be cached") as rec:
        ids = calibration_tokens(model, tok, CFG, cache_key="k")
    assert ids.shape == (CFG.samples, CFG.seqlen)
    (line,) = [str(w.message) for w in rec if "could not be cached" in str(w.message)]
    assert "No space left on device" in line and "EDGEKIT_HOME" in line
    assert list((tmp_path / "calib").iterdir()) == []
