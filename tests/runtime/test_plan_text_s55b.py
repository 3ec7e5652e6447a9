"""``edgekit plan``'s text says what its two RAM figures are (QA s55: "needs 1.22 GiB RAM" beside "RAM 1789 MB"
for a 717 MB file read as a contradiction): the peak counts the file pages read to repack weights for the CPU,
which the fit ("needs") leaves out."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")


@pytest.fixture(scope="module")
def tiny_q4_0(tiny_llama, tmp_path_factory):
    from edgekit import api

    out = tmp_path_factory.mktemp("plan-s55b") / "tiny-q4_0"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="Q4_0")).path


@needs_llama
def test_plan_says_which_ram_figure_is_the_peak_and_which_must_fit(tiny_q4_0, private_home):
    runner = CliRunner()
    args = ["plan", str(tiny_q4_0), "--ctx", "1024", "--ram", "4GiB", "--cpu-bandwidth", "20"]
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    mem = data["memory"]
    repacked = mem["parts"]["weights_repacked"]
    assert repacked > 0 and mem["ram_required_bytes"] == mem["ram_bytes"] - repacked
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    needs = re.search(r"needs (\d+\.\d\d GiB) RAM", text)
    assert needs, text
    assert f"RAM {mem['ram_bytes'] / 1e6:.0f} MB at peak" in text, text
    assert (f"({mem['parts']['weights_cpu'] / 1e6:.0f} MB mapped from the file + a {repacked / 1e6:.0f} MB copy "
            "repacked for the CPU)") in text, text
    # the fit's figure is the reason's "needs", and the difference is said
    assert f"fits in {mem['ram_required_bytes'] / 1e6:.0f} MB ({needs[1]}) of free RAM, less than the peak" in text, text
    assert f"the other {repacked / 1e6:.0f} MB are file pages read once to make the repacked copy" in text, text


@needs_llama
def test_no_repacking_no_second_figure(tiny_gguf, private_home):
    res = CliRunner().invoke(app, ["plan", str(tiny_gguf), "--ctx", "1024", "--ram", "4GiB", "--cpu-bandwidth", "20"])
    assert res.exit_code == 0 and "at peak" in res.stdout and "fits in" not in res.stdout, res.output
