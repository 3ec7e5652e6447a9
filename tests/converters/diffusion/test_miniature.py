"""The built-in digits miniature: training is deterministic and resumable, and the shipped weights are what
the documented command trains (its record) and score as digits."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from edgekit.converters.diffusion.miniature import SCHEDULER_CONFIG, UNET_CONFIG, TrainConfig, train_teacher  # noqa: E402
from edgekit.converters.diffusion.pipeline import open_pipeline  # noqa: E402

SHIPPED = Path(str(resources.files("edgekit") / "data" / "digits-unet"))
SMALL = {**UNET_CONFIG, "block_out_channels": [8, 16, 16], "norm_num_groups": 4, "attention_head_dim": 8}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_is_deterministic_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import edgekit.converters.diffusion.miniature as mini

    monkeypatch.setattr(mini, "UNET_CONFIG", SMALL)
    torch.set_num_threads(1)
    cfg = TrainConfig(iters=12, batch=16, save_every=4)
    assert train_teacher(tmp_path / "a", cfg)["finished"]
    stopped = train_teacher(tmp_path / "b", TrainConfig(iters=12, batch=16, save_every=4, minutes=1e-9))
    assert not stopped["finished"] and not (tmp_path / "b").exists()
    assert train_teacher(tmp_path / "b", cfg)["finished"] and not (tmp_path / "b.train").exists()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open_pipeline(tmp_path / "a").num_classes == 10


def test_the_shipped_teacher_is_what_the_documented_command_trains():
    pipe = open_pipeline(SHIPPED)
    rec = pipe.info["train"]
    assert (rec["iters"], rec["seed"], rec["batch"]) == (TrainConfig().iters, 0, TrainConfig().batch)
    cfg = {k: v for k, v in pipe.unet_config.items() if not k.startswith("_")}
    assert all(cfg[k] == v for k, v in UNET_CONFIG.items())
    assert {k: pipe.scheduler_config[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    assert sum(p.numel() for p in pipe.load_unet().parameters()) == pytest.approx(1.11e6, rel=0.01)


def test_the_shipped_teacher_draws_digits():
    from edgekit.converters.diffusion.pipeline import torch_denoiser
    from edgekit.converters.diffusion.sampler import SampleConfig, sample
    from edgekit.imagemetrics import score

    pipe = open_pipeline(SHIPPED)
    labels = np.arange(200) % 10
    imgs = sample(torch_denoiser(pipe.load_unet()), pipe.schedule(), (200, 1, 16, 16), SampleConfig(steps=10),
                  labels)
    noise = np.random.default_rng(0).uniform(-1, 1, imgs.shape).astype(np.float32)
    good, bad = score(imgs, labels), score(noise, labels)
    assert good["label_agreement"] > 0.9 and good["fid"] < bad["fid"] / 5, (good, bad)
    assert json.loads((SHIPPED / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
