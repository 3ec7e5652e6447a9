"""Consistency distillation on a tiny UNet: the objective falls, a stopped run resumes to the same weights,
and the student is a pipeline the consistency sampler reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from edgekit.converters.diffusion.distill import Consistency, DistillConfig, distill  # noqa: E402
from edgekit.converters.diffusion.miniature import digits  # noqa: E402
from edgekit.converters.diffusion.pipeline import open_pipeline, torch_denoiser  # noqa: E402
from edgekit.converters.diffusion.sampler import SampleConfig, sample  # noqa: E402
from edgekit.errors import InputError, OutputExistsError  # noqa: E402
from tests.converters.diffusion.tiny import tiny_pipeline  # noqa: E402

FAST = {"iters": 100, "batch": 16, "lr": 1e-3, "save_every": 20, "data": "digits"}


def _gap(model, cons, teacher, x0, y) -> float:
    """How far the model's f is from itself one teacher step along the trajectory, on a fixed batch."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        x_t, t, x_s, s = cons.pair(teacher, x0, y, g)
        a = cons.f(model, x_t, t, y)
        b = torch.where((s < 0).view(-1, 1, 1, 1), x_s, cons.f(model, x_s, s, y))
    return float(((a - b) ** 2).mean())


def test_distillation_reduces_the_consistency_gap(tmp_path):
    src = tiny_pipeline(tmp_path / "teacher")
    rec = distill(src, tmp_path / "student", DistillConfig(**FAST))
    assert rec["finished"] and rec["sampler"] == "consistency"
    teacher, student = open_pipeline(src), open_pipeline(tmp_path / "student")
    cons = Consistency(teacher.schedule(), DistillConfig(**FAST))
    x, y = digits(8)
    x0, y0 = torch.from_numpy(x[:128]), torch.from_numpy(y[:128])
    t_unet, s_unet = teacher.load_unet(), student.load_unet()
    before, after = _gap(t_unet, cons, t_unet, x0, y0), _gap(s_unet, cons, t_unet, x0, y0)
    assert after < 0.7 * before, (before, after)
    assert student.sampler == "consistency" and student.origin_steps == 50 and student.default_steps == 4
    assert json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] \
        == "LCMScheduler"
    imgs = sample(torch_denoiser(s_unet), student.schedule(), (4, 1, 8, 8),
                  SampleConfig(sampler="consistency", steps=2), labels=np.arange(4))
    assert imgs.shape == (4, 1, 8, 8) and np.isfinite(imgs).all()


def test_a_stopped_distillation_resumes_to_the_same_weights(tmp_path):
    src = tiny_pipeline(tmp_path / "teacher")
    cfg = DistillConfig(**{**FAST, "iters": 30, "save_every": 10})
    straight = distill(src, tmp_path / "a", cfg)
    first = distill(src, tmp_path / "b", DistillConfig(**{**FAST, "iters": 30, "save_every": 10, "minutes": 1e-9}))
    assert not first["finished"] and not (tmp_path / "b").exists() and (tmp_path / "b.distill").is_dir()
    with pytest.raises(InputError, match="other settings"):
        distill(src, tmp_path / "b", DistillConfig(**{**FAST, "iters": 30, "lr": 5e-4}))
    resumed = distill(src, tmp_path / "b", cfg)
    assert resumed["finished"] and not (tmp_path / "b.distill").exists()
    a, b = open_pipeline(tmp_path / "a").load_unet(), open_pipeline(tmp_path / "b").load_unet()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert straight["distilled"]["losses"] == resumed["distilled"]["losses"]
    with pytest.raises(OutputExistsError):
        distill(src, tmp_path / "a", cfg)


@pytest.mark.parametrize("kw, words", [({"method": "progressive"}, "--method"), ({"steps": 0}, "--steps"),
                                       ({"steps": 9}, "--steps")])
def test_bad_settings_say_which(kw, words):
    with pytest.raises(InputError, match=words):
        DistillConfig(**kw)
