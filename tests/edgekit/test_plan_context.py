"""``plan`` on artifacts whose context is fixed when they are converted (MLC's context_window_size, Core ML's
state): a plan is made at the context asked for or refused in one line, and the text and --json agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def fixed(tiny_llama, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    root = tmp_path_factory.mktemp("fixedctx")
    made = {}
    for fmt, args, holds, key in (("mlc", ["--quant", "q4f16_1", "-O", "context_window_size=128"], 128,
                                   "context_window_size"),
                                  ("coreml", ["--bits", "16", "-O", "context=64"], 64, "context")):
        out = root / fmt
        r = runner.invoke(app, ["convert", str(tiny_llama), "--to", fmt, "-o", str(out), *args])
        assert r.exit_code == 0, r.output
        made[fmt] = (out, holds, key)
    return made


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("fmt", ["mlc", "coreml"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_longer_ctx_than_the_artifact_holds_is_refused(fmt, json_flag, fixed):
    out, holds, key = fixed[fmt]
    r = runner.invoke(app, ["plan", str(out), "--ram", "1GiB", "--ctx", "8192", *json_flag])
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output)
    assert f"holds at most {holds} tokens" in line and "--ctx 8192" in line
    assert f"-O {key}=8192" in line
    assert "fits" not in r.output.replace("does not fit", "")


def test_beyond_the_formats_most_the_fix_names_the_most(fixed):
    out, holds, _ = fixed["coreml"]
    r = runner.invoke(app, ["plan", str(out), "--ctx", "65536"])
    assert r.exit_code == 2
    assert "-O context=32768" in _one_error_line(r.output)


@pytest.mark.parametrize("fmt", ["mlc", "coreml"])
def test_a_ctx_it_holds_is_planned_at_that_ctx_in_text_and_json(fmt, fixed):
    out, holds, _ = fixed[fmt]
    ctx = holds // 2
    r = runner.invoke(app, ["plan", str(out), "--ram", "1GiB", "--ctx", str(ctx), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_ctx"] == ctx
    r = runner.invoke(app, ["plan", str(out), "--ram", "1GiB", "--ctx", str(ctx)])
    assert r.exit_code == 0, r.output
    assert f"at ctx {ctx}: fits" in r.output


@pytest.mark.parametrize("fmt", ["mlc", "coreml"])
def test_without_ctx_the_plan_is_at_the_artifacts_own_context(fmt, fixed):
    out, holds, _ = fixed[fmt]
    r = runner.invoke(app, ["plan", str(out), "--ram", "1GiB", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n_ctx"] == holds
    r = runner.invoke(app, ["plan", str(out), "--ram", "1GiB"])
    assert r.exit_code == 0, r.output
    assert f"at ctx {holds}: fits" in r.output


def test_the_sdk_refuses_the_same(fixed):
    from edgekit.errors import InputError
    from edgekit.runtime.plan import plan_artifact

    out, holds, _ = fixed["mlc"]
    with pytest.raises(InputError, match=f"holds at most {holds} tokens"):
        plan_artifact(out, ram_bytes=1 << 30, n_ctx=holds + 1)
    assert plan_artifact(out, ram_bytes=1 << 30).n_ctx == holds
    assert plan_artifact(out, ram_bytes=1 << 30, n_ctx=holds).n_ctx == holds
