"""An SDK call leaves the host application's process-wide settings as it found them: transformers' logging
and progress bars, huggingface_hub's bars, PyTorch's thread count, the environment (QA s54: a host app that
had set ``torch.set_num_threads(1)`` found 2 after ``api.generate`` on a Hugging Face folder, and its own
transformers logging silenced for good)."""

from __future__ import annotations

import importlib
import logging
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgekit import api  # noqa: E402
from edgekit.errors import BackendError, quiet_transformers  # noqa: E402
from edgekit.runtime import hostinfo  # noqa: E402

HUB_TQDM = importlib.import_module("huggingface_hub.utils.tqdm")


def _host_settings() -> tuple:
    return (logging.getLogger("transformers").level, transformers.utils.logging.is_progress_bar_enabled(),
            dict(HUB_TQDM.progress_bar_states), torch.get_num_threads())


@pytest.fixture
def host_settings():
    """A host application's own choices, unlike edgekit's: INFO logging, bars on except one hub group,
    one PyTorch thread. Put back as they were after the test, whatever edgekit left."""
    saved = _host_settings()
    tl = transformers.utils.logging
    tl.set_verbosity_info()
    tl.enable_progress_bar()
    HUB_TQDM.disable_progress_bars("huggingface_hub.host_group")
    torch.set_num_threads(1)
    yield _host_settings()
    level, bars, hub, threads = saved
    logging.getLogger("transformers").setLevel(level)
    tl.enable_progress_bar() if bars else tl.disable_progress_bar()
    HUB_TQDM.progress_bar_states.clear()
    HUB_TQDM.progress_bar_states.update(hub)
    torch.set_num_threads(threads)


def test_quiet_transformers_is_scoped(host_settings):
    with quiet_transformers(transformers):
        assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert HUB_TQDM.are_progress_bars_disabled()
    assert _host_settings() == host_settings
    with pytest.raises(RuntimeError), quiet_transformers(transformers):
        raise RuntimeError("a failed load")
    assert _host_settings() == host_settings


def test_torch_threads_is_scoped(host_settings):
    with hostinfo.torch_threads(torch, 2) as n:
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


def test_generate_on_a_hf_folder_leaves_the_host_settings(tiny_llama, host_settings):
    seen = []
    for piece in api.generate(tiny_llama, "hi", api.SamplingConfig(max_tokens=3, temperature=0)):
        seen.append((piece, torch.get_num_threads()))
    assert seen and all(n == hostinfo.physical_cores() for _, n in seen)  # edgekit's own pool while it runs
    assert _host_settings() == host_settings


def test_evaluate_against_a_hf_reference_leaves_the_host_settings(tiny_llama, tiny_gguf, tmp_path, host_settings):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    api.evaluate(tiny_gguf, text, api.EvalConfig(ctx=32, chunks=1), ref=tiny_llama, record=False)
    assert _host_settings() == host_settings


def test_a_failed_load_leaves_the_host_settings(tiny_llama, host_settings, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no such weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(BackendError, match="no such weights"):
        api.open_backend(tiny_llama, "torch")
    assert _host_settings() == host_settings


def test_edgekit_loads_local_files_only(tiny_llama, host_settings, monkeypatch):
    """The Hub is never asked (HF_HUB_OFFLINE's job, done per call rather than for the whole process)."""
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs.get("local_files_only"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    with api.open_backend(tiny_llama, "torch"):
        pass
    assert calls == [True, True]


def test_calibration_load_leaves_the_host_settings(tiny_llama, host_settings, private_home):
    from edgekit.calibration import CalibConfig
    from edgekit.converters.quantize.pipeline import LayerPipeline
    from edgekit.model import HFCheckpoint

    model, ids = LayerPipeline(CalibConfig(samples=2, seqlen=16)).load(HFCheckpoint.open(tiny_llama), None)
    assert ids.shape[0] == 2
    assert _host_settings() == host_settings


def test_diffusers_import_leaves_hf_hub_offline_alone(monkeypatch):
    pytest.importorskip("diffusers")
    from edgekit.converters.diffusion.pipeline import require_diffusers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    require_diffusers()
    assert "HF_HUB_OFFLINE" not in os.environ


def test_gguf_import_leaves_the_environment_alone(monkeypatch):
    from edgekit.importer import _no_tqdm

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with _no_tqdm():
        assert "TQDM_DISABLE" not in os.environ  # other threads' bars are not the import's to silence
        reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        assert reader.tqdm([1]).disable

