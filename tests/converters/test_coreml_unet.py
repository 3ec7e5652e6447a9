"""Diffusion UNets as Core ML programs: the package loads back, its stored integers are the quantizer's,
and the numpy evaluation of the saved program equals PyTorch (fp16 tolerance). Predictions need macOS."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coremltools")
pytest.importorskip("diffusers")

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
             "prediction_type": "v_prediction", "set_alpha_to_one": True}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import torch
    from diffusers import UNet2DModel

    from edgekit.converters.diffusion.pipeline import open_pipeline, save_pipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=3, norm_num_groups=8,
                       attention_head_dim=16).eval()
    path = tmp_path_factory.mktemp("pipe") / "tiny"
    save_pipeline(path, unet, SCHEDULER, {"sampler": "ddim", "steps": 4})
    return open_pipeline(path)


def _export(pipe, unet, weights, tmp_path):
    from edgekit.converters.diffusion.export import EXPORTERS

    fields = EXPORTERS.get("coreml")().export(pipe, unet, weights, tmp_path, {}, lambda *a: None)
    return fields, tmp_path / fields["files"]["model"]


def _feeds(n: int = 3):
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((n, 1, 8, 8)).astype(np.float32),
            "timestep": np.array([999, 421, 0][:n], np.int32), "class_labels": np.array([2, 0, 1][:n], np.int32)}


def _torch(unet, feeds):
    import torch

    with torch.no_grad():
        return unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]).long(),
                    class_labels=torch.from_numpy(feeds["class_labels"]).long()).sample.numpy()


@pytest.mark.parametrize("bits,lowrank,symmetric", [(None, 0, True), (8, 0, True), (4, 3, True), (4, 0, False)])
def test_package_round_trips_and_evaluates_like_pytorch(pipe, tmp_path, bits, lowrank, symmetric):
    from edgekit.converters.diffusion.quantize import DiffusionQuantConfig, dequantized_unet, quantize_with
    from edgekit.converters.formats.coreml.read import load_program, read_weights
    from edgekit.converters.formats.coreml.unet import op_name
    from edgekit.runtime.coreml_mil import MILEvaluator

    unet = pipe.load_unet()
    weights = None if bits is None else quantize_with(
        pipe, unet, DiffusionQuantConfig(bits=bits, lowrank=lowrank, symmetric=symmetric))
    fields, path = _export(pipe, unet, weights, tmp_path)
    prog, meta = load_program(path)
    fn = prog.functions["main"]
    assert list(fn.inputs) == ["sample", "timestep", "class_labels"] and meta["edgekit.task"] == "diffusion"
    assert [v.name for v in fn.outputs] == ["out"]
    stored = read_weights(path, prog)
    for name, qw in (weights or {}).items():  # the package holds the quantizer's integers, bit for bit
        w = stored[op_name(name)]
        q = w.data.astype(np.int16) - ((1 << (qw.bits - 1)) if qw.signed else 0)
        assert w.bits == qw.bits and np.array_equal(q, qw.q.astype(np.int16)), name
        assert np.array_equal(w.scale.astype(np.float32), qw.scale), name
        assert (w.offset is None) == qw.signed and (qw.signed or np.array_equal(w.offset, qw.zero))
    kinds = {op.op_type for op in fn.operations}
    assert ("constexpr_blockwise_shift_scale" in kinds) == (bits is not None)
    feeds = _feeds()
    got = MILEvaluator(path).run(feeds, {})["out"]
    ref = _torch(unet if weights is None else dequantized_unet(unet, weights), feeds)
    assert got.shape == ref.shape and got.dtype == np.float32
    rel = np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean())
    assert rel < 1e-2, rel  # fp16 program vs float32 PyTorch
    if bits is not None:  # and the quantized program is not the float one
        assert np.sqrt(((got - _torch(unet, feeds)) ** 2).mean() / (ref**2).mean()) > rel
    assert fields["size_bytes"] > 0 and fields["coreml"]["inputs"] == ["sample", "timestep", "class_labels"]


def test_int4_package_is_smaller(pipe, tmp_path):
    from edgekit.converters.diffusion.quantize import quantize_unet

    unet = pipe.load_unet()
    f16, _ = _export(pipe, unet, None, tmp_path / "f")
    w4, _ = _export(pipe, unet, quantize_unet(pipe, unet, 4), tmp_path / "q")
    assert w4["size_bytes"] < 0.6 * f16["size_bytes"]
    assert set(w4["coreml"]["weight_storage"]) >= {"INT4_B32", "INT8_B9"}


def test_errors_are_one_line(pipe, tmp_path):
    from edgekit.converters.diffusion.export import EXPORTERS
    from edgekit.converters.diffusion.quantize import quantize_unet
    from edgekit.errors import InputError

    unet = pipe.load_unet()
    exporter = EXPORTERS.get("coreml")()
    with pytest.raises(InputError, match="not an option"):
        exporter.export(pipe, unet, None, tmp_path, {"deepcache": True}, lambda *a: None)
    weights = quantize_unet(pipe, unet, 8)
    weights["not_a_layer.weight"] = next(iter(weights.values()))
    with pytest.raises(InputError, match="quantize the same UNet"):
        exporter.export(pipe, unet, weights, tmp_path, {}, lambda *a: None)


def test_convert_to_coreml_and_sample_with_the_reference_runtime(pipe, tmp_path):
    """The product path: convert_pipeline quantizes (GPTQ) and writes the package; the coreml diffusion
    runtime samples it with the numpy evaluator; one call equals the evaluator's own run."""
    from edgekit.converters.diffusion.convert import convert_pipeline
    from edgekit.converters.diffusion.sampler import SampleConfig
    from edgekit.runtime.coreml_mil import MILEvaluator
    from edgekit.runtime.diffusion import open_diffusion

    art = convert_pipeline(pipe.path, "coreml", output=tmp_path / "art", bits=4, method="gptq",
                           options={"calib_images": 4, "lowrank": 2})
    assert art.manifest["format"] == "coreml" and art.manifest["preset"] == "w4-gptq-lr2"
    model = open_diffusion(art.path)
    assert model.name == "coreml-reference" and model.num_classes == 3
    feeds = _feeds(2)
    once = model(feeds["sample"], 421, np.array([2, 0]))
    direct = MILEvaluator(art.model_file).run({**feeds, "timestep": np.array([421, 421], np.int32),
                                              "class_labels": np.array([2, 0], np.int32)}, {})["out"]
    assert np.array_equal(once, direct)
    images = model.generate(2, model.labels(2, 1), SampleConfig(steps=2))
    assert images.shape == (2, 1, 8, 8) and np.all(np.abs(images) <= 1)
