"""Diffusion UNet quantization: integer ranges and shapes, W8 << W4 in output error, GPTQ beats RTN on the
calibration Hessians, the low-rank branch lowers the W4 error, RTN needs no calibration, the kernels."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
             "prediction_type": "v_prediction", "clip_sample": True, "set_alpha_to_one": True}


def _unet(seed: int = 0):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=3, norm_num_groups=8,
                       attention_head_dim=16).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny class-conditional pipeline (4 DDIM steps), its UNet, and a calibration of its layers."""
    from edgekit.converters.diffusion.calibrate import calibrate, quantizable_layers
    from edgekit.converters.diffusion.pipeline import open_pipeline, save_pipeline

    path = tmp_path_factory.mktemp("pipe") / "tiny"
    save_pipeline(path, _unet(), SCHEDULER, {"sampler": "ddim", "steps": 4})
    pipe = open_pipeline(path)
    unet = pipe.load_unet()
    cal = calibrate(pipe, unet, quantizable_layers(unet), images=6, timesteps=3, seed=0)
    return pipe, unet, cal


def _quant(tiny, **kw):
    from edgekit.converters.diffusion.quantize import DiffusionQuantConfig, quantize_with

    pipe, unet, cal = tiny
    return quantize_with(pipe, unet, DiffusionQuantConfig(**kw), calibration=cal)


def test_calibration_gathers_every_layer_across_timesteps(tiny):
    pipe, unet, cal = tiny
    import torch

    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(cal.hessians) == sorted(layers)
    assert sorted({t for _, t, _ in cal.inputs}, reverse=True) == [999, 499, 249]  # 3 of the 4 DDIM steps
    for name, H in cal.hessians.items():
        assert H.shape[0] == H.shape[1] and np.allclose(H, H.T) and np.all(np.diag(H) >= 0)
        assert cal.rows[name] > 0
    # the time MLP sees every step of the trajectory (6 images x 4 steps), the convs only the chosen ones
    assert cal.rows["time_embedding.linear_1"] == 6 * 4
    assert cal.rows["conv_in"] == 6 * 3 * 8 * 8


@pytest.mark.parametrize("bits", [8, 4])
def test_ints_in_range_shapes_and_blocks(tiny, bits):
    pipe, unet, _ = tiny
    from edgekit.converters.diffusion.quantize import quantize_unet

    weights = quantize_unet(pipe, unet, bits)  # RTN
    params = dict(unet.named_parameters())
    expected = {n + ".weight" for n, m in unet.named_modules() if type(m).__name__ in ("Conv2d", "Linear")}
    assert set(weights) == expected and "class_embedding.weight" not in weights
    for name, qw in weights.items():
        w = params[name].detach().numpy()
        width = int(np.prod(w.shape[1:]))
        assert qw.shape == w.shape and qw.q.shape == (w.shape[0], width)
        edge = name.split(".")[0] in ("conv_in", "conv_out")
        b = 8 if edge else bits
        assert qw.bits == b
        if b == 8:  # int8 per output channel, symmetric
            assert qw.signed and qw.zero is None and qw.q.dtype == np.int8 and qw.block == width
            assert qw.scale.shape == (w.shape[0], 1)
        else:  # signed 4 bits, blocks of 32 where the width allows, per row elsewhere
            assert qw.signed and qw.zero is None and qw.q.dtype == np.int8 and -8 <= qw.q.min() and qw.q.max() <= 7
            assert qw.block == (32 if width % 32 == 0 else width)
        rel = np.linalg.norm(qw.dequantize() - w) / np.linalg.norm(w)
        assert rel < (0.01 if b == 8 else 0.15), (name, rel)
    # both kinds of W4 layout occur in this UNet
    if bits == 4:
        assert {qw.block == 32 for n, qw in weights.items() if qw.bits == 4} == {True, False}
        asym = quantize_unet(pipe, unet, 4, block_size=16)  # the wrapper passes the block on
        assert asym["down_blocks.1.resnets.0.conv1.weight"].block == 16


def test_zero_points_when_asked(tiny):
    weights = _quant(tiny, bits=4, symmetric=False)
    qw = weights["down_blocks.1.resnets.0.conv1.weight"]
    assert not qw.signed and qw.q.dtype == np.uint8 and qw.q.max() <= 15 and qw.zero.shape == qw.scale.shape


def test_w8_output_error_is_far_below_w4(tiny):
    from edgekit.converters.diffusion.quantize import measure

    pipe, unet, cal = tiny
    w8, w4 = measure(unet, _quant(tiny, bits=8), cal), measure(unet, _quant(tiny, bits=4), cal)
    assert w8.mse * 30 < w4.mse, (w8.mse, w4.mse)
    assert w8.nbytes > w4.nbytes and w4.nbytes * 3 < w4.float_bytes


def test_gptq_beats_rtn_on_the_calibration_hessians(tiny):
    from edgekit.converters.diffusion.quantize import measure

    pipe, unet, cal = tiny
    rtn = measure(unet, _quant(tiny, bits=4), cal)
    gptq = measure(unet, _quant(tiny, bits=4, method="gptq"), cal)
    total = {k: sum(r.layer_rel.values()) for k, r in (("rtn", rtn), ("gptq", gptq))}
    assert total["gptq"] < 0.8 * total["rtn"], total
    better = sum(gptq.layer_rel[n] <= rtn.layer_rel[n] * 1.0001 for n in rtn.layer_rel)
    assert better >= 0.9 * len(rtn.layer_rel)
    assert gptq.mse < rtn.mse


def test_quantizing_leaves_the_unet_alone(tiny):
    """GPTQ updates its working copy in place; a one-row weight (conv_out of a 1-channel UNet) transposes to
    an array that is already contiguous, and once was the module's own memory."""
    pipe, unet, _ = tiny
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    _quant(tiny, bits=4, method="gptq")
    assert all(bool((before[k] == v).all()) for k, v in unet.state_dict().items())


def test_lowrank_branch_lowers_the_w4_error(tiny):
    from edgekit.converters.diffusion.quantize import measure

    pipe, unet, cal = tiny
    plain = measure(unet, _quant(tiny, bits=4, method="gptq"), cal)
    weights = _quant(tiny, bits=4, method="gptq", lowrank=4)
    lr = measure(unet, weights, cal)
    assert sum(lr.layer_rel.values()) < 0.9 * sum(plain.layer_rel.values())
    assert lr.mse < plain.mse
    a, b = weights["down_blocks.1.resnets.0.conv1.weight"].lowrank
    assert a.shape == (32, 4) and b.shape == (4, 16 * 9) and a.dtype == np.float32
    assert lr.nbytes > plain.nbytes  # the factors are stored (fp16)


def test_rtn_needs_no_calibration(tiny, monkeypatch):
    import edgekit.converters.diffusion.calibrate as calibrate_mod
    from edgekit.converters.diffusion.quantize import quantize_unet

    def refuse(*a, **k):
        raise AssertionError("RTN must not sample")

    monkeypatch.setattr(calibrate_mod, "calibrate", refuse)
    pipe, unet, _ = tiny
    assert len(quantize_unet(pipe, unet, 4, lowrank=2)) > 10


def test_config_errors_say_the_fix():
    from edgekit.converters.diffusion.quantize import DiffusionQuantConfig
    from edgekit.errors import InputError

    for kw, words in (({"bits": 3}, "4 or 8"), ({"method": "awq"}, "rtn, gptq"), ({"lowrank": -1}, "rank"),
                      ({"block": 48}, "16, 32")):
        with pytest.raises(InputError, match=words):
            DiffusionQuantConfig(**kw)


def test_lowrank_fit_is_the_weighted_truncated_svd():
    from edgekit.converters.quantize.lowrank import fit

    rng = np.random.default_rng(0)
    E = rng.standard_normal((20, 48))
    X = rng.standard_normal((300, 48)) * np.linspace(0.1, 4, 48)
    H = X.T @ X
    for h in (None, H):
        a, b = fit(E, 5, h, damp=0.01)
        C = np.eye(48) if h is None else np.linalg.cholesky(H + 0.01 * np.diag(H).mean() * np.eye(48))
        U, S, Vt = np.linalg.svd(E @ C)
        ref = (U[:, :5] * S[:5]) @ Vt[:5] @ np.linalg.inv(C)
        assert np.allclose(a @ b, ref, atol=1e-4)
    assert fit(E.T, 5)[0].shape == (48, 5)  # tall matrices too


@pytest.mark.parametrize("bits", [4, 8])
def test_rowwise_grid_odd_rows_round_trip(bits):
    from edgekit.converters.quantize import nbits
    from edgekit.converters.quantize.gptq_kernel import gptq, rtn
    from edgekit.converters.quantize.grids.rowwise import rowwise

    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 9)).astype(np.float32)
    for sym in (True, False):
        g = rowwise(bits, 9, sym)
        r = rtn(w, g)
        codes, params = nbits.unpack(g, r.data.reshape(-1, g.record))
        assert np.array_equal(nbits.dequantize_codes(g, codes, params).reshape(w.shape), r.weight)
        x = rng.standard_normal((64, 9))
        res = gptq(w, x.T @ x, g)
        assert res.codes.shape == (6, 9) and int(res.codes.max()) < (1 << bits)
