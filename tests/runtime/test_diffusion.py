"""The diffusion runtime: onnxruntime graphs and PyTorch pipelines sample the same images; bad inputs are
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from edgekit.converters.diffusion.convert import convert_pipeline  # noqa: E402
from edgekit.converters.diffusion.sampler import SampleTrace  # noqa: E402
from edgekit.errors import CorruptFileError, InputError  # noqa: E402
from edgekit.evaluate import is_diffusion  # noqa: E402
from edgekit.runtime.diffusion import open_diffusion  # noqa: E402
from tests.converters.diffusion.qtiny import pipeline16  # noqa: E402


@pytest.fixture(scope="module")
def pipe_and_art(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-rt")
    src = pipeline16(root / "pipe")
    return src, convert_pipeline(src, "onnx", output=root / "art", bits=16).path


def test_onnxruntime_samples_what_pytorch_samples(pipe_and_art):
    src, art = pipe_and_art
    assert is_diffusion(src) and is_diffusion(art)
    with open_diffusion(art, threads=1) as ort_model, open_diffusion(src, threads=1) as torch_model:
        assert ort_model.defaults.steps == 4 and ort_model.caches and torch_model.caches
        labels = ort_model.labels(4, None)
        assert labels.tolist() == [0, 1, 2, 3]
        for interval in (1, 2):
            cfg = ort_model.config(None, seed=3, cache_interval=interval)
            trace = SampleTrace()
            a = ort_model.generate(4, labels, cfg, trace)
            b = torch_model.generate(4, labels, torch_model.config(None, seed=3, cache_interval=interval))
            np.testing.assert_allclose(a, b, atol=1e-4)
            assert trace.full == [i % interval == 0 for i in range(4)]
        cached = ort_model.generate(4, labels, ort_model.config(None, 3, 2))
        plain = ort_model.generate(4, labels, ort_model.config(None, 3, 1))
        assert 0 < np.abs(cached - plain).max()  # shallow steps reuse stale features: close, not equal
        assert a.shape == (4, 1, 16, 16) and a.min() >= -1 and a.max() <= 1


def test_a_pytorch_pipeline_gives_the_callers_thread_count_back(pipe_and_art):
    """PyTorch's pool is the process's: sized for sampling while the model is open, the caller's after."""
    import torch

    torch.set_num_threads(1)
    with open_diffusion(pipe_and_art[0], threads=2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


def test_bad_requests_are_one_line_errors(pipe_and_art, tmp_path):
    _, art = pipe_and_art
    with open_diffusion(art, threads=1) as model:
        with pytest.raises(InputError, match="between 0 and 9"):
            model.labels(2, 10)
        with pytest.raises(InputError, match="--steps"):
            model.generate(1, model.labels(1, 0), model.config(5000))
    nocache = convert_pipeline(pipeline16(tmp_path / "p"), "onnx", output=tmp_path / "nc", bits=16,
                               options={"deepcache": False}).path
    with open_diffusion(nocache, threads=1) as model, pytest.raises(InputError, match="DeepCache"):
        model.config(None, 0, 3)


def test_corrupt_or_wrong_artifacts_are_refused(pipe_and_art, tmp_path):
    import shutil

    _, art = pipe_and_art
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    (bad / "unet.onnx").write_bytes(b"not a graph")
    with pytest.raises(CorruptFileError, match="changed since it was converted"):
        open_diffusion(bad)
    manifest = json.loads((bad / "edgekit.json").read_text())
    manifest.pop("sha256")
    (bad / "edgekit.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="onnxruntime cannot load unet.onnx"):
        open_diffusion(bad)
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "model.gguf").write_bytes(b"GGUF")
    (llm / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "gguf",
                                                  "files": {"model": "model.gguf"}}))
    assert not is_diffusion(llm)
    with pytest.raises(InputError, match="language model"):
        open_diffusion(llm)
    from edgekit import api

    with pytest.raises(InputError, match="diffusion model"):
        api.open_backend(art)


def test_a_consistency_student_samples_alike_in_onnxruntime_and_pytorch(tmp_path):
    import json as _json

    src = pipeline16(tmp_path / "student")
    sched = _json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    sched.update({"_class_name": "LCMScheduler", "original_inference_steps": 20})
    (src / "scheduler" / "scheduler_config.json").write_text(_json.dumps(sched))
    art = convert_pipeline(src, "onnx", output=tmp_path / "art", bits=16)
    assert art.manifest["sampler"] == {"sampler": "consistency", "steps": 4, "origin_steps": 20}
    with open_diffusion(art.path, threads=1) as a, open_diffusion(src, threads=1) as b:
        assert a.sampler == b.sampler == "consistency" and a.origin_steps == b.origin_steps == 20
        trace = SampleTrace()
        x = a.generate(3, a.labels(3, 5), a.config(seed=2), trace)
        np.testing.assert_allclose(x, b.generate(3, b.labels(3, 5), b.config(seed=2)), atol=1e-4)
        assert trace.timesteps == a.schedule.consistency_timesteps(4, 20)
