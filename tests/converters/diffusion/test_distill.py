"""Distillation on a tiny UNet: the objective falls, a stopped run resumes to the same weights, and the
student is a pipeline its sampler reads (consistency for LCM students, DDIM for trajectory students)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from edgekit.converters.diffusion.distill import (  # noqa: E402
    Consistency,
    DistillConfig,
    Trajectory,
    distill,
    solve_trajectories,
    student_timesteps,
)
from edgekit.converters.diffusion.miniature import digits  # noqa: E402
from edgekit.converters.diffusion.pipeline import open_pipeline, torch_denoiser  # noqa: E402
from edgekit.converters.diffusion.sampler import SampleConfig, sample  # noqa: E402
from edgekit.errors import InputError, OutputExistsError  # noqa: E402
from tests.converters.diffusion.tiny import tiny_pipeline  # noqa: E402

FAST = {"method": "lcm", "iters": 100, "batch": 16, "lr": 1e-3, "save_every": 20, "data": "digits"}
TRAJ = {"method": "trajectory", "iters": 80, "batch": 16, "lr": 1e-3, "save_every": 20, "trajectories": 96,
        "substeps": 3}


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


@pytest.mark.parametrize("base", [FAST, TRAJ], ids=["lcm", "trajectory"])
def test_a_stopped_distillation_resumes_to_the_same_weights(tmp_path, base):
    src = tiny_pipeline(tmp_path / "teacher")
    cfg = DistillConfig(**{**base, "iters": 30, "save_every": 10})
    straight = distill(src, tmp_path / "a", cfg)
    first = distill(src, tmp_path / "b", DistillConfig(**{**base, "iters": 30, "save_every": 10, "minutes": 1e-9}))
    assert not first["finished"] and not (tmp_path / "b").exists() and (tmp_path / "b.distill").is_dir()
    # the solved trajectories are kept with the state: the rerun does not solve them again
    assert len(list((tmp_path / "b.distill").glob("trajectories-*"))) == (base["method"] == "trajectory")
    with pytest.raises(InputError, match="other settings"):
        distill(src, tmp_path / "b", DistillConfig(**{**base, "iters": 30, "lr": 5e-4}))
    resumed = distill(src, tmp_path / "b", cfg)
    assert resumed["finished"] and not (tmp_path / "b.distill").exists()
    a, b = open_pipeline(tmp_path / "a").load_unet(), open_pipeline(tmp_path / "b").load_unet()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert straight["distilled"]["losses"] == resumed["distilled"]["losses"]
    with pytest.raises(OutputExistsError):
        distill(src, tmp_path / "a", cfg)


def test_the_solved_trajectories_are_the_teachers_ddim_path(tmp_path):
    """With one substep, a trajectory is the teacher's own DDIM sampling at the student's timesteps, from the
    trajectory's noise; labels are balanced over the classes."""
    src = tiny_pipeline(tmp_path / "teacher")
    pipe = open_pipeline(src)
    cfg = DistillConfig(**{**TRAJ, "trajectories": 20, "substeps": 1})
    states, labels = solve_trajectories(pipe, pipe.load_unet(), cfg, tmp_path / "state")
    assert states.shape == (20, 5, 1, 8, 8) and sorted(np.bincount(labels.numpy()).tolist()) == [2] * 10
    sched, model = pipe.schedule(), torch_denoiser(pipe.load_unet())
    edges = student_timesteps(sched, 4)
    assert edges == [*sched.timesteps(4, "trailing"), -1]
    x = states[:, 0].numpy()
    for k in range(4):
        x = sched.ddim_step(x, model(x, edges[k], labels.numpy()), edges[k], edges[k + 1]).astype(np.float32)
        np.testing.assert_allclose(x, states[:, k + 1].numpy(), atol=1e-5)
    again, _ = solve_trajectories(pipe, pipe.load_unet(), cfg, tmp_path / "state")  # read back, not solved again
    assert torch.equal(again, states) and len(list((tmp_path / "state").glob("trajectories-*"))) == 1


def test_a_trajectory_student_steps_closer_to_the_teachers_solution(tmp_path):
    src = tiny_pipeline(tmp_path / "teacher")
    rec = distill(src, tmp_path / "student", DistillConfig(**TRAJ))
    assert rec["finished"] and rec["sampler"] == "ddim" and rec["steps"] == 4
    assert not (tmp_path / "student.distill").exists()  # the trajectories go with the state
    teacher, student = open_pipeline(src), open_pipeline(tmp_path / "student")
    held = DistillConfig(**{**TRAJ, "seed": 99, "trajectories": 32})
    states, labels = solve_trajectories(teacher, teacher.load_unet(), held, tmp_path / "held")
    obj = Trajectory(teacher.schedule(), held, states, labels)

    def err(unet) -> float:
        with torch.no_grad():
            e = 0.0
            for k in range(4):
                kk = torch.full((32,), k)
                pred = obj.step(unet, states[:, k], obj.edges[kk], obj.edges[kk + 1], labels)
                e += float(((pred - states[:, k + 1]) ** 2).mean())
            return e

    before, after = err(teacher.load_unet()), err(student.load_unet())
    assert after < 0.7 * before, (before, after)
    assert student.sampler == "ddim" and student.default_steps == 4
    cfg = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDIMScheduler" and cfg["timestep_spacing"] == "trailing"
    imgs = sample(torch_denoiser(student.load_unet()), student.schedule(), (4, 1, 8, 8),
                  SampleConfig(sampler="ddim", steps=4), labels=np.arange(4))
    assert imgs.shape == (4, 1, 8, 8) and np.isfinite(imgs).all()


@pytest.mark.parametrize("kw, words", [({"method": "progressive"}, "--method"), ({"steps": 0}, "--steps"),
                                       ({"steps": 9}, "--steps"), ({"trajectories": 0}, "trajectories"),
                                       ({"method": "trajectory", "data": "digits"}, "drop --data")])
def test_bad_settings_say_which(kw, words):
    with pytest.raises(InputError, match=words):
        DistillConfig(**kw)


def test_trajectories_are_saved_in_pieces_with_progress_at_every_teacher_step(tmp_path, monkeypatch):
    import edgekit.converters.diffusion.distill as mod

    src = tiny_pipeline(tmp_path / "teacher")
    pipe = open_pipeline(src)
    cfg = DistillConfig(**{**TRAJ, "trajectories": 20, "substeps": 2})
    whole, whole_labels = solve_trajectories(pipe, pipe.load_unet(), cfg, tmp_path / "whole")
    monkeypatch.setattr(mod, "TRAJ_PIECE", 8)
    calls = []
    states, labels = solve_trajectories(pipe, pipe.load_unet(), cfg, tmp_path / "state",
                                        lambda d, done, total: calls.append(done))
    # the same noises and labels whatever the piece size; 20 = 8 + 8 + 4, each saved as it is solved
    torch.testing.assert_close(states, whole, atol=1e-5, rtol=0)
    assert torch.equal(labels, whole_labels)
    assert sorted(f.name.split("-")[-1] for f in (tmp_path / "state").glob("trajectories-*")) == \
        ["4.safetensors", "8.safetensors", "8.safetensors"]
    assert len(calls) > 3 * 8 and calls == sorted(calls) and calls[-1] == 20 and calls[0] < 8


def test_an_interrupted_distillation_says_truthfully_what_it_kept(tmp_path, monkeypatch):
    import edgekit.converters.diffusion.distill as mod

    monkeypatch.setattr(mod, "TRAJ_PIECE", 8)
    src = tiny_pipeline(tmp_path / "teacher")
    cfg = DistillConfig(**{**TRAJ, "trajectories": 20, "substeps": 1, "iters": 30, "save_every": 10})

    def stop_at(n):
        def progress(desc, done, total):
            if done >= n:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt) as exc:  # inside the first piece: nothing is kept, nothing left behind
        distill(src, tmp_path / "s", cfg, progress=stop_at(1))
    assert "nothing was saved yet" in exc.value.__notes__[0] and not (tmp_path / "s.distill").exists()
    with pytest.raises(KeyboardInterrupt) as exc:
        distill(src, tmp_path / "s", cfg, progress=stop_at(9))
    assert "kept 8 of 20 solved trajectories in" in exc.value.__notes__[0]
    seen = []

    def in_training(desc, done, total):
        seen.append(desc)
        if desc.startswith("distilling") and done == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as exc:
        distill(src, tmp_path / "s", cfg, progress=in_training)
    assert "kept 20 of 20 solved trajectories and the training state at step 10/30" in exc.value.__notes__[0]
    assert not (tmp_path / "s").exists()
    # the rerun reads the trajectories back, resumes training at step 10 and finishes
    assert distill(src, tmp_path / "s", cfg)["finished"] and not (tmp_path / "s.distill").exists()
