"""Reading diffusers pipeline folders: what loads, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

from edgekit.converters.diffusion.pipeline import is_pipeline, open_pipeline, torch_denoiser  # noqa: E402
from edgekit.errors import CorruptFileError, InputError, UnsupportedError  # noqa: E402
from tests.converters.diffusion.tiny import tiny_pipeline  # noqa: E402


def test_round_trip_and_diffusers_reads_it(tmp_path):
    import torch
    from diffusers import DDPMPipeline

    p = open_pipeline(tiny_pipeline(tmp_path / "p"))
    assert is_pipeline(p.path) and p.num_classes == 10 and p.sample_size == 8 and p.sampler == "ddim"
    unet = p.load_unet()
    theirs = DDPMPipeline.from_pretrained(str(p.path)).unet
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    ours = torch_denoiser(unet)(x, 500, np.array([1, 2]))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x), 500, class_labels=torch.tensor([1, 2])).sample.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_a_bare_unet_folder_reads_with_a_default_schedule(tmp_path):
    tiny_pipeline(tmp_path / "p")
    p = open_pipeline(tmp_path / "p" / "unet")
    assert p.scheduler_config["_class_name"] == "DDPMScheduler" and p.schedule().num_train_timesteps == 1000


def _edit(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, error, words", [
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, UnsupportedError, "CrossAttnDownBlock2D"),
    ({"_class_name": "UNet2DConditionModel"}, InputError, "text_encoder"),
    ({"_class_name": "UVit2DModel"}, UnsupportedError, "UVit2DModel"),
    ({"time_embedding_type": "fourier"}, UnsupportedError, "positional"),
    ({"class_embed_type": "timestep"}, UnsupportedError, "class_embed_type"),
])
def test_unsupported_unets_are_refused_in_one_line(tmp_path, change, error, words):
    path = tiny_pipeline(tmp_path / "p")
    _edit(path / "unet" / "config.json", **change)
    with pytest.raises(error, match=words) as info:
        open_pipeline(path)
    assert "\n" not in str(info.value)


def test_pickles_are_never_loaded(tmp_path):
    path = tiny_pipeline(tmp_path / "p")
    w = path / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(InputError, match="never loads pickles"):
        open_pipeline(path)


def test_corrupt_files_say_what_to_do(tmp_path):
    path = tiny_pipeline(tmp_path / "p")
    (path / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="re-save"):
        open_pipeline(path)
    path = tiny_pipeline(tmp_path / "q")
    w = path / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="safetensors"):
        open_pipeline(path).load_unet()
    with pytest.raises(InputError, match="does not exist"):
        open_pipeline(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        open_pipeline(tmp_path / "empty")


def test_a_pipeline_without_a_unet_is_refused(tmp_path):
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                                    "transformer": ["diffusers", "X"]}))
    with pytest.raises(UnsupportedError, match="no UNet"):
        open_pipeline(tmp_path / "dit")
