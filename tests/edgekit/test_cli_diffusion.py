"""convert / run / inspect / profile of a diffusion pipeline, as a user types them (Typer's runner)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from edgekit.cli.main import app  # noqa: E402
from tests.converters.diffusion.qtiny import install_rtn_quantizer, pipeline16  # noqa: E402

runner = CliRunner()


def cli(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-cli")
    src = pipeline16(root / "pipe")
    cli("convert", src, "--to", "onnx", "--bits", "16", "-o", root / "art")
    return root / "art"


def test_run_writes_a_png_grid_and_reports_timings(art, tmp_path):
    from PIL import Image

    png = tmp_path / "grid.png"
    rep = json.loads(cli("run", art, "--class", "7", "-n", "6", "-o", png, "--steps", "3", "--seed", "1",
                         "--cache-interval", "2", "--json").stdout)
    assert rep["images"] == 6 and rep["labels"] == [7] * 6 and rep["steps"] == 3 and rep["cache_interval"] == 2
    assert rep["ms_full_step"] > 0 and rep["ms_shallow_step"] > 0 and rep["s_per_image"] > 0
    # 6 images of 16x16 in 3 columns x 2 rows, a 1-pixel border, every pixel 4 wide
    assert Image.open(png).size == ((3 * 17 + 1) * 4, (2 * 17 + 1) * 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    text = cli("run", art, "-n", "2", "-o", png).output
    assert "2 images (one of each class), 4 ddim steps" in text


def test_inspect_and_profile(art):
    info = json.loads(cli("inspect", art, "--json").stdout)
    assert info["task"] == "diffusion" and set(info["graphs"]) == {"unet", "shallow"}
    unet = info["graphs"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "class_labels"]
    # the exporter folds and merges a few small tensors (norm scales, attention biases)
    assert unet["initializers"]["FLOAT"]["params"] == pytest.approx(info["source"]["n_params"], rel=0.05)
    assert "DeepCache" in cli("inspect", art).output
    prof = json.loads(cli("profile", art, "--reps", "1", "--images", "2", "--steps", "2", "--cache-interval", "2",
                          "--threads", "1", "--json", "--no-history").stdout)
    assert [(r["batch"], r["cache_interval"]) for r in prof["rows"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert prof["load_s"] > 0 and prof["peak_rss_bytes"] > 0 and all(r["s_per_image"] > 0 for r in prof["rows"])


def test_convert_quantized_from_the_command_line(tmp_path, monkeypatch):
    install_rtn_quantizer(monkeypatch)
    src = pipeline16(tmp_path / "pipe")
    m = json.loads(cli("convert", src, "--to", "onnx", "--bits", "4", "-O", "deepcache=false", "--json").stdout)
    assert m["preset"] == "w4" and m["graphs"].keys() == {"unet"} and "INT4" in m["weight_storage"]
    assert m["recipe"]["options"] == {"deepcache": False}
    from edgekit import library

    assert (library.store_dir() / "pipe-onnx-w4" / "unet.onnx").is_file()  # no -o: the model library
    again = cli("convert", src, "--to", "onnx", "--bits", "4", code=2)
    assert "--force" in again.output


def test_bad_inputs_are_one_line_errors(art, tmp_path):
    missing = cli("run", tmp_path / "nope", "--class", "1", code=2)
    assert "does not exist" in missing.output and "Traceback" not in missing.output
    assert "PNG" in cli("run", art, "-o", tmp_path / "g.jpg", code=2).output
    bad = cli("run", art, "--class", "12", "-o", tmp_path / "g.png", code=2)
    assert "between 0 and 9" in bad.output and not (tmp_path / "g.png").exists()
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "model.gguf").write_bytes(b"GGUF")
    (llm / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "gguf",
                                                  "files": {"model": "model.gguf"}}))
    wrong = cli("run", llm, "--class", "3", "-p", "hi", code=2)
    assert "--class is for diffusion models" in wrong.output
    text_cmd = cli("eval", art, "--text", __file__, code=2)
    assert "diffusion model" in text_cmd.output
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(art, corrupt)
    (corrupt / "unet_shallow.onnx").write_bytes(b"\x00garbage")
    res = cli("run", corrupt, "-o", tmp_path / "g.png", code=3)
    assert len(res.output.strip().splitlines()) == 1 and "unet_shallow.onnx" in res.output


def test_distill_writes_a_trajectory_student_that_run_samples_with_ddim(tmp_path):
    from tests.converters.diffusion.tiny import tiny_pipeline

    src = tiny_pipeline(tmp_path / "teacher")
    dest = tmp_path / "student"
    rec = json.loads(cli("distill", src, "--steps", "2", "--iters", "8", "--batch", "8", "--trajectories", "16",
                         "--substeps", "2", "-o", dest, "--json").stdout)
    assert rec["finished"] and rec["sampler"] == "ddim" and rec["steps"] == 2
    assert rec["distilled"]["method"] == "trajectory" and rec["distilled"]["trajectories"] == 16
    out = json.loads(cli("run", dest, "--class", "3", "-n", "2", "-o", tmp_path / "g.png", "--json").stdout)
    assert out["steps"] == 2 and (tmp_path / "g.png").is_file()


def test_distill_refuses_data_for_the_trajectory_method_in_one_line(tmp_path):
    from tests.converters.diffusion.tiny import tiny_pipeline

    src = tiny_pipeline(tmp_path / "teacher")
    r = cli("distill", src, "--data", "digits", "-o", tmp_path / "s", code=2)
    assert "drop --data" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_run_refuses_language_model_flags_and_bad_steps_instead_of_ignoring_them(art, tmp_path):
    png = tmp_path / "g.png"
    for args, words in ((["-p", "hello"], "--prompt/-p is for language models"),
                        (["--temp", "0", "--system", "hi"], "are for language models"),
                        (["--steps", "0"], "--steps 0: give at least 1"),
                        (["--cache-interval", "0"], "--cache-interval 0"),
                        (["-O", "engine=numpy"], "-O engine is not an option of the onnxruntime diffusion runtime")):
        r = cli("run", art, "-o", png, *args, code=2)
        assert words in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert "Traceback" not in r.output and not png.exists()
    assert "--class N, -n IMAGES" in cli("run", art, "-p", "hello", "-o", png, code=2).output
    ok = json.loads(cli("run", art, "-n", "1", "--steps", "1", "-O", "dequantize=step", "-o", png, "--json").stdout)
    assert ok["steps"] == 1 and png.is_file()


def test_deepcache_refusals_blame_what_the_artifact_really_lacks(tmp_path, monkeypatch):
    install_rtn_quantizer(monkeypatch)
    src = pipeline16(tmp_path / "pipe")
    cli("convert", src, "--to", "onnx", "--bits", "4", "-O", "deepcache=false", "-o", tmp_path / "flat")
    r = cli("run", tmp_path / "flat", "--cache-interval", "2", "-o", tmp_path / "g.png", code=2)
    assert "converted with -O deepcache=false" in r.output


def test_coreml_diffusion_engine_cache_and_profile_say_what_runs(tmp_path):
    import sys

    pytest.importorskip("coremltools")
    src = pipeline16(tmp_path / "pipe")
    cml = tmp_path / "cml"
    cli("convert", src, "--to", "coreml", "--bits", "16", "-o", cml)
    png = tmp_path / "g.png"
    if sys.platform != "darwin":
        r = cli("run", cml, "-O", "engine=coreml", "-o", png, code=2)
        assert "engine=coreml needs macOS 15+" in r.output and "engine=numpy" in r.output and not png.exists()
    r = cli("run", cml, "--cache-interval", "2", "-o", png, code=2)
    assert "--to coreml makes no DeepCache graph" in r.output and "deepcache=false" not in r.output
    assert "coreml-reference" in cli("run", cml, "-O", "engine=numpy", "-n", "1", "--steps", "1", "-o", png).output
    prof = cli("profile", cml, "--reps", "1", "--images", "1", "--steps", "1", "--no-history").output
    assert "None threads" not in prof and "coreml-reference, numpy's own threads" in prof


def test_distill_takes_the_built_in_teacher_by_name_as_the_readme_does(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from edgekit.converters.diffusion.pipeline import BUILTIN, builtin_pipeline

    monkeypatch.chdir(tmp_path)  # a fresh directory: no ./digits-unet here
    rec = json.loads(cli("distill", "digits-unet", "--steps", "2", "--iters", "1", "--batch", "2", "--trajectories",
                         "2", "--substeps", "1", "-o", "./d2", "--json").stdout)
    assert rec["finished"] and (tmp_path / "d2" / "model_index.json").is_file()
    assert rec["distilled"]["teacher"] == "digits-unet"
    # the README distills built-in models by name, and converts the folders its distill lines write
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    made = set(re.findall(r"edgekit distill \S+ [^\n`]*?-o (\S+)", readme))
    sources = re.findall(r"edgekit distill (\S+)", readme)
    assert sources and all(src in BUILTIN for src in sources), sources
    for src in re.findall(r"edgekit convert (\./digits\S*)", readme):
        assert src in made, src
    assert all(builtin_pipeline(name).is_dir() for name in BUILTIN)


def test_distill_interrupted_says_what_was_kept(tmp_path, monkeypatch):
    from edgekit.converters.diffusion import distill as mod
    from tests.converters.diffusion.tiny import tiny_pipeline

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "solve_trajectories", stop)
    src = tiny_pipeline(tmp_path / "teacher")
    r = cli("distill", src, "--steps", "2", "-o", tmp_path / "s", code=130)
    assert "interrupted; s was not written; nothing was saved yet" in r.output and "the same command starts over" \
        in r.output
    assert "stopped" not in r.output and "last save" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.distill").exists()
