"""The layer steps of the calibrated pipeline: every registered step runs on a tiny model and leaves
the file holding exactly the weights the model carries; recipes order and validate their steps; a
method is its steps (AWQ+GPTQ spelled step by step writes the same bytes); a new step is one class."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import ClassVar

import gguf
import numpy as np
import pytest

from edgekit import api
from edgekit.calibration import CalibConfig
from edgekit.converters.quantize.awq import AWQConfig
from edgekit.converters.quantize.awq_methods import AWQGPTQConfig
from edgekit.converters.quantize.gptq import GPTQConfig, ImatrixConfig
from edgekit.converters.quantize.steps import RESHAPE, STEPS, LayerState, Step, StepConfig, register_step
from edgekit.converters.quantize.steps.gptq_round import GPTQRoundConfig
from edgekit.converters.quantize.steps.rtn_round import RTNRoundConfig
from edgekit.errors import InputError
from edgekit.model import HFCheckpoint

CALIB = CalibConfig(samples=4, seqlen=48)


def _convert(model, out, cfg, preset="Q4_0"):
    return api.convert(model, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset=preset), quantize=cfg)


@pytest.mark.parametrize("name", [n for n in STEPS.names() if n != "aqlm"])  # aqlm: below
def test_every_registered_step_runs_in_a_recipe(tiny_llama, tmp_path, name):
    cls = STEPS.get(name)
    cfg = ImatrixConfig(calib=CALIB, extra_steps=(cls.config_class(),))
    art = _convert(tiny_llama, tmp_path / name, cfg)
    steps = art.manifest["recipe"]["quantizer"]["steps"]
    assert [s["step"] for s in steps][-1] in ("rtn", "gptq") and name in [s["step"] for s in steps]
    # the report holds one entry per layer for every step that reports
    from edgekit.converters.quantize.base import QUANTIZERS

    q = QUANTIZERS.get("imatrix")(cfg)
    from edgekit.converters.formats.gguf import GGUFFormat

    out = tmp_path / f"{name}-direct"
    out.mkdir()
    GGUFFormat().convert(HFCheckpoint.open(tiny_llama), out, api.ConvertRecipe(bits=None, preset="Q4_0"), q)
    assert set(q.report[cls.report_key]) == {"0", "1"}
    from tests.helpers import assert_gguf_holds_model

    assert_gguf_holds_model(tiny_llama, out / "model.gguf", q.model)


def test_the_aqlm_step_needs_the_aqlm_format(tiny_llama, tmp_path):
    """AQLM's codebooks have no GGUF type: a GGUF recipe with the aqlm step is refused, nothing written."""
    from edgekit.converters.quantize.steps.aqlm_round import AQLMRoundConfig

    with pytest.raises(InputError, match="--to aqlm"):
        _convert(tiny_llama, tmp_path / "x", ImatrixConfig(calib=CALIB, extra_steps=(AQLMRoundConfig(rounds=0),)))
    assert not (tmp_path / "x").exists()


def test_recipe_orders_steps_by_stage_and_needs_one_rounding():
    cfg = ImatrixConfig(extra_steps=(GPTQRoundConfig(damp=0.02), AWQConfig(n_grid=4)))
    assert [s.step for s in cfg.steps()] == ["awq", "gptq"]
    assert [s.step for s in ImatrixConfig().steps()] == ["rtn"]
    with pytest.raises(InputError, match="exactly one rounding step"):
        GPTQConfig(extra_steps=(RTNRoundConfig(),)).steps()
    with pytest.raises(InputError, match="dampening"):
        GPTQRoundConfig(damp=1.5)


def test_a_method_is_its_steps(tiny_llama, tmp_path):
    """AWQ+GPTQ as a method and spelled out as steps on the imatrix base write the same bytes."""
    awq = AWQConfig(n_grid=5, clip_grid=3)
    a = _convert(tiny_llama, tmp_path / "method", AWQGPTQConfig(calib=CALIB, awq_config=awq, damp=0.02), "Q4_K_M")
    b = _convert(tiny_llama, tmp_path / "steps",
                 ImatrixConfig(calib=CALIB, extra_steps=(awq, GPTQRoundConfig(damp=0.02))), "Q4_K_M")
    assert hashlib.sha256(a.model_file.read_bytes()).digest() == hashlib.sha256(b.model_file.read_bytes()).digest()
    assert a.manifest["recipe"]["quantizer"]["steps"] == b.manifest["recipe"]["quantizer"]["steps"]


@dataclasses.dataclass(frozen=True)
class _HalveConfig(StepConfig):
    step: ClassVar[str] = "test-halve-down"
    stage: ClassVar[int] = RESHAPE
    factor: float = 0.5


class _Halve(Step):
    """A toy reshaping step: scales ffn_down by ``factor`` (changing what the file holds)."""

    config_class = _HalveConfig
    report_key = "test-halve"

    def layer(self, st: LayerState) -> dict[str, float]:
        lin = st.linears["mlp.down_proj"]
        lin.weight.data *= self.config.factor
        st.H["mlp.down_proj"] = st.H["mlp.down_proj"]  # unchanged inputs
        return {"factor": self.config.factor}


def test_a_new_step_is_one_registered_class(tiny_llama, tmp_path):
    register_step(_HalveConfig.step)(_Halve)
    try:
        plain = _convert(tiny_llama, tmp_path / "plain", ImatrixConfig(calib=CALIB), "Q8_0")
        halved = _convert(tiny_llama, tmp_path / "halved", ImatrixConfig(calib=CALIB, extra_steps=(_HalveConfig(),)),
                          "Q8_0")
    finally:
        STEPS._items.pop(_HalveConfig.step)
    read = {}
    for key, art in (("plain", plain), ("halved", halved)):
        t = {t.name: t for t in gguf.GGUFReader(art.model_file).tensors}["blk.0.ffn_down.weight"]
        read[key] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    ratio = np.abs(read["halved"]).sum() / np.abs(read["plain"]).sum()
    assert 0.49 < ratio < 0.51
    assert [s["step"] for s in halved.manifest["recipe"]["quantizer"]["steps"]] == ["test-halve-down", "rtn"]


def test_cli_steps_flag_builds_the_recipe(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    out = tmp_path / "a"
    r = cli("convert", str(tiny_llama), "--type", "Q4_0", "--method", "gptq", "--steps", "awq",
            "--calib-samples", "2", "--calib-seqlen", "32", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    steps = json.loads((out / "edgekit.json").read_text())["recipe"]["quantizer"]["steps"]
    assert [s["step"] for s in steps] == ["awq", "gptq"]
    r = cli("convert", str(tiny_llama), "--type", "Q4_0", "--steps", "nope", "-o", str(tmp_path / "b"))
    assert r.exit_code != 0 and "unknown layer step 'nope'" in r.output and "awq" in r.output
    assert not (tmp_path / "b").exists()


def test_a_layer_reports_progress_between_its_slow_parts_so_a_cancel_is_prompt(tiny_llama, tmp_path):
    """A cancel takes effect at a progress report; GPTQ used to report once per layer (about 5 s of
    SmolLM2's calibration on 2 cores, 7 s on busy ones). Now: each calibration batch and each linear."""

    class Stop(Exception):
        pass

    seen: list[str] = []

    def progress(desc: str, done: int, total: int) -> None:
        seen.append(desc)
        if desc == "layer 1/2: rounding self_attn.k_proj":
            raise Stop

    with pytest.raises(Stop):
        api.convert(tiny_llama, "gguf", output=tmp_path / "out", recipe=api.ConvertRecipe(bits=None, preset="Q4_0"),
                    quantize=GPTQConfig(calib=CALIB), progress=progress)
    layer1 = [d for d in seen if d.startswith("layer 1/2: ")]
    assert layer1[0] == "layer 1/2: calibrating" and layer1[-2:] == ["layer 1/2: rounding self_attn.q_proj",
                                                                        "layer 1/2: rounding self_attn.k_proj"]
    assert not any(d.startswith("layer 2/2") for d in seen)
    assert not (tmp_path / "out").exists()
