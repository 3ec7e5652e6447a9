"""edgekit as a Python library (QA s55): results serialise to JSON, ``api.generate`` fails at the call on a bad
target or argument and still streams lazily, and SDK errors name the keyword argument, not only the CLI flag."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgekit import api
from edgekit.artifact import Artifact
from edgekit.errors import CorruptFileError, InputError
from edgekit.runtime.base import GenerationStats, SamplingConfig

GREEDY = SamplingConfig(temperature=0, max_tokens=4)
DATA = Path(api.__file__).resolve().parent / "data"


def _strict(obj: object) -> object:
    """``obj`` through strict JSON and back: what a client in another language would read."""
    return json.loads(json.dumps(obj, allow_nan=False))


# -- to_dict ---------------------------------------------------------------------------------------------

def test_generation_stats_of_a_real_generation_serialise(tiny_gguf):
    stats = GenerationStats()
    text = "".join(api.generate(tiny_gguf, "hi", GREEDY, stats, n_ctx=128, n_threads=1))
    d = stats.to_dict()
    assert _strict(d) == d
    assert d["generated_tokens"] == stats.generated_tokens >= 1 and d["stop_reason"] == stats.stop_reason
    assert d["tokens_per_second"] == stats.tokens_per_second and isinstance(d["extra"], dict)
    assert text is not None


def test_generation_stats_flatten_numpy_paths_and_dataclasses():
    @dataclasses.dataclass
    class Inner:
        where: Path
        n: np.int32

    stats = GenerationStats(prompt_tokens=np.int64(3), generated_tokens=5, time_to_first_token=np.float32(0.5),
                            total_time=1.5, stop_reason="eos",
                            extra={"kv": {"cells": np.int64(7)}, "ids": np.arange(2), "inner": Inner(Path("/x"), 2),
                                   "pair": (1, 2), "nan": float("nan")})
    d = stats.to_dict()
    assert _strict(d) == d
    assert type(d["prompt_tokens"]) is int and type(d["time_to_first_token"]) is float
    assert d["tokens_per_second"] == 4.0
    assert d["extra"] == {"kv": {"cells": 7}, "ids": [0, 1], "inner": {"where": "/x", "n": 2}, "pair": [1, 2],
                          "nan": None}
    from edgekit.artifact import plain_json

    assert plain_json({1: {"a"}}) == {"1": ["a"]}


def test_artifact_of_a_real_convert_serialises(tiny_llama, tmp_path):
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "a", recipe=api.ConvertRecipe(bits=8))
    d = art.to_dict()
    assert _strict(d) == d
    assert d["path"] == str(art.path) and d["model_file"] == str(art.model_file) and d["bare_file"] is None
    assert d["format"] == "gguf" and d["name"] == "a" and d["manifest"] == _strict(art.manifest)
    assert d["notes"] == art.notes
    bare = Artifact.open(art.model_file).to_dict()
    assert _strict(bare) == bare and bare["bare_file"] == bare["model_file"] == str(art.model_file)


# -- generate: eager checks, lazy pieces ------------------------------------------------------------------

def _corrupt_copy(tiny_gguf: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_gguf, bad)
    model = Artifact.open(bad).model_file
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    return bad


def test_generate_raises_at_the_call(tiny_gguf, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        api.generate(tmp_path / "missing", "hi")
    with pytest.raises(CorruptFileError, match="sha256 no longer matches"):
        api.generate(_corrupt_copy(tiny_gguf, tmp_path), "hi")
    with pytest.raises(InputError, match="sampling must be a SamplingConfig"):
        api.generate(tiny_gguf, "hi", {"max_tokens": 4})
    with pytest.raises(InputError, match="stats must be a GenerationStats"):
        api.generate(tiny_gguf, "hi", GREEDY, "stats")
    with pytest.raises(InputError, match="the list of messages is empty"):
        api.generate(tiny_gguf, [])
    with pytest.raises(InputError, match="must be a whole number"):
        api.generate(tiny_gguf, "hi", n_ctx="many")


@pytest.fixture
def loads(monkeypatch):
    """The backends ``api.generate`` opens, and how often each was closed."""
    opened: list = []
    real = api.open_backend

    def spy(*args, **kwargs):
        backend = real(*args, **kwargs)
        close = backend.close
        backend.closed = 0

        def counted():
            backend.closed += 1
            close()

        backend.close = counted
        opened.append(backend)
        return backend

    monkeypatch.setattr(api, "open_backend", spy)
    return opened


def test_generate_streams_lazily_and_frees_the_model(tiny_gguf, loads):
    stats = GenerationStats()
    pieces = api.generate(tiny_gguf, "hi", GREEDY, stats, n_ctx=128, n_threads=1)
    assert len(loads) == 1 and stats.generated_tokens == 0  # loaded, nothing decoded yet
    first = next(pieces)
    assert isinstance(first, str) and loads[0].closed == 0
    rest = list(pieces)
    assert loads[0].closed == 1 and stats.generated_tokens >= 1  # ran out: freed
    assert list(pieces) == [] and first + "".join(rest)

    unread = api.generate(tiny_gguf, "hi", GREEDY, n_ctx=128, n_threads=1)
    unread.close()
    unread.close()
    assert loads[1].closed == 1 and list(unread) == []

    with api.generate(tiny_gguf, "hi", GREEDY, n_ctx=128, n_threads=1) as reply:
        next(reply)
    assert loads[2].closed == 1

    dropped = api.generate(tiny_gguf, "hi", GREEDY, n_ctx=128, n_threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # freed by generate's result, not the backend's finalizer
        del dropped
        gc.collect()
    assert loads[3].closed == 1


def test_generate_docstring_and_readme_say_how_to_keep_a_model_loaded():
    assert "open_backend" in api.generate.__doc__ and "loads the model again" in api.generate.__doc__
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`api.generate` loads the model at each call" in " ".join(readme.split())


# -- errors name the keyword argument ---------------------------------------------------------------------

@pytest.mark.parametrize(("call", "says"), [
    (lambda m, o: api.convert(m, "onnx", output=o, recipe=api.ConvertRecipe(method="ternary")), 'to="gguf"'),
    (lambda m, o: api.convert(m, "gguf", output=o, recipe=api.ConvertRecipe(method="ternary", bpw=3.0)),
     "ConvertRecipe's preset=, not bpw= or size="),
    (lambda m, o: api.convert(m, "gguf", output=o, recipe=api.ConvertRecipe(method="squeezellm")),
     'to="coreml", options=CoreMLOptions(palettize=4)'),
    (lambda m, o: api.convert(m, "coreml", output=o, recipe=api.ConvertRecipe(bits=8, prune="width:auto,params=1M")),
     'to="coreml"'),
    (lambda m, o: api.convert(DATA / "digits-unet-4step", "onnx", output=o, recipe=api.ConvertRecipe(bpw=4.0)),
     "ConvertRecipe's bits=, method= and extra= only"),
    (lambda m, o: api.method_config("rtn", steps=("awq",)), "(steps=, prune=) need a calibrated method"),
    (lambda m, o: api.distill_config(api.method_config("gptq"), object()), "distill= is a field of TernaryConfig"),
])
def test_sdk_errors_name_the_keyword(tiny_llama, tmp_path, call, says):
    with pytest.raises(InputError) as e:
        call(tiny_llama, tmp_path / "out")
    assert says in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_tokens", [1, 0, "64", 2.5])
def test_evaluate_streaming_names_max_tokens(tiny_gguf, max_tokens):
    with pytest.raises(InputError, match=r"^max_tokens= must be None \(the whole text\) or a whole number >= 2"):
        api.evaluate_streaming(tiny_gguf, DATA / "sample.txt", kv_window=64, max_tokens=max_tokens)


def test_evaluate_unrecorded_names_record_false(tiny_gguf, tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text((DATA / "sample.txt").read_text()[:2000])

    def read_only(self, results):
        raise OSError("read-only file system")

    monkeypatch.setattr(Artifact, "record_eval", read_only)
    with pytest.warns(Warning, match=r"record=False, --no-record, skips recording"):
        api.evaluate(tiny_gguf, text, api.EvalConfig(ctx=64, chunks=1), n_threads=1)
