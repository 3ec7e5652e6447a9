"""The schedule maths against diffusers' own schedulers, step by step on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from edgekit.converters.diffusion.schedule import NoiseSchedule  # noqa: E402
from edgekit.errors import UnsupportedError  # noqa: E402

CONFIGS = [
    {"beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
     "clip_sample": False, "set_alpha_to_one": False},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": True},
    {"beta_schedule": "linear", "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_ddim_matches_diffusers(config, spacing):
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, **config)
    ours = NoiseSchedule.from_config({"num_train_timesteps": 1000, **config})
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
    for steps in (1, 2, 4, 10, 50):
        ref.set_timesteps(steps)
        ts = ours.timesteps(steps, spacing)
        assert ts == ref.timesteps.tolist()
    ref.set_timesteps(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    ts = ours.timesteps(4, spacing)
    for i, t in enumerate(ts):
        out = rng.standard_normal(x.shape).astype(np.float32)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
        # diffusers steps to t - T/n, which is the next visited timestep for these spacings, or below 0
        t_prev = t - 1000 // 4
        x = ours.ddim_step(x, out, t, t_prev).astype(np.float32)
        np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-5)
        if i + 1 < len(ts) and spacing == "trailing":
            assert ts[i + 1] == t_prev


def test_consistency_sampler_matches_lcm_scheduler():
    config = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": True,
              "original_inference_steps": 50, "timestep_scaling": 10.0}
    ref = diffusers.LCMScheduler(num_train_timesteps=1000, **config)
    ours = NoiseSchedule.from_config({"num_train_timesteps": 1000, **config})
    for steps in (1, 2, 4, 8):
        ref.set_timesteps(steps)
        assert ours.consistency_timesteps(steps, 50) == ref.timesteps.tolist()
    ref.set_timesteps(4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    for t in ours.consistency_timesteps(4, 50):
        out = rng.standard_normal(x.shape).astype(np.float32)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).denoised.numpy()
        x0, _ = ours.split(x, out, t)
        c_skip, c_out = ours.boundary(t)
        np.testing.assert_allclose(c_skip * x + c_out * x0, want, rtol=1e-4, atol=1e-5)
        ref._step_index = None  # each step checked on its own input
    assert ours.boundary(0) == (1.0, 0.0)  # the identity at the clean end


def test_add_noise_per_item_matches_scalar():
    s = NoiseSchedule.from_config({"beta_schedule": "linear"})
    x0, noise = np.ones((3, 1, 2, 2), np.float32), np.full((3, 1, 2, 2), 0.5, np.float32)
    t = np.array([0, 500, 999])
    per_item = s.add_noise(x0, noise, t)
    for i, ti in enumerate(t):
        np.testing.assert_allclose(per_item[i], s.add_noise(x0[i], noise[i], int(ti)), rtol=1e-6)
    tt = s.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(tt.numpy(), per_item, rtol=1e-6)


@pytest.mark.parametrize("bad, words", [({"beta_schedule": "sigmoid"}, "beta_schedule"),
                                        ({"prediction_type": "flow"}, "prediction_type"),
                                        ({"rescale_betas_zero_snr": True}, "zero_snr")])
def test_unsupported_schedules_are_refused(bad, words):
    with pytest.raises(UnsupportedError, match=words):
        NoiseSchedule.from_config(bad)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_ddim_step_per_batch_item_equals_the_scalar_steps(prediction_type):
    """Training takes one DDIM step per item (its own timesteps, -1 the clean end) on tensors; each item must
    step exactly as the sampler steps it alone with scalar timesteps on numpy."""
    sched = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                       "prediction_type": prediction_type, "clip_sample": True})
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t, t_prev = torch.tensor([999, 749, 499, 249, 20]), torch.tensor([749, 499, 249, -1, -1])
    batch = sched.ddim_step(x, out, t, t_prev)
    alone = [sched.ddim_step(x[i:i + 1].numpy(), out[i:i + 1].numpy(), int(t[i]), int(t_prev[i])) for i in range(5)]
    np.testing.assert_allclose(batch.numpy(), np.concatenate(alone), rtol=1e-5, atol=1e-5)
