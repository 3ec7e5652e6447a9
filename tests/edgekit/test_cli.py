"""The CLI as a user runs it (Typer's runner), on a tiny real checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.quickstart import sample_text_path

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_help_imports_no_heavy_modules():
    code = ("import sys\nfrom edgekit.cli.main import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'llama_cpp', 'gguf'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


@pytest.mark.parametrize("command", ["convert", "run", "eval", "inspect", "import", "quickstart"])
def test_every_command_has_help_with_examples(command):
    out = cli(command, "--help")
    assert "Example" in out


def test_convert_inspect_run_eval(tiny_llama, tmp_path):
    out_dir = tmp_path / "tiny-gguf-q4"
    cli("convert", tiny_llama, "--bits", "4", "-o", out_dir)
    manifest = json.loads((out_dir / "edgekit.json").read_text())
    assert manifest["preset"] == "Q4_K_M"

    info = json.loads(cli("inspect", out_dir, "--json", "--tensors", "--ctx", "1024"))
    assert info["architecture"] == "llama" and info["hparams"]["block_count"] == 2
    assert {t["name"] for t in info["tensors"]} == set(manifest["tensors"])
    assert info["memory"]["kv_cache_f16"] == 2 * 2 * 1024 * 2 * 64 * 2  # K+V, layers, ctx, kv heads x dim, f16
    assert "tensor types" in cli("inspect", out_dir)

    if not _have_llamacpp():
        return
    text = cli("run", out_dir, "-p", "The river", "--raw", "--temp", "0", "-n", "8", "--no-stats")
    assert text.strip()
    res = json.loads(cli("eval", out_dir, "--text", sample_text_path(), "--ctx", "64", "--chunks", "3",
                         "--ref", tiny_llama, "--json"))
    assert res["chunks"] == 3 and res["tokens_scored"] == 3 * 31
    assert 0 <= res["kl_mean"] and 0 <= res["top1_agreement"] <= 1 and res["ppl"] > 1
    recorded = json.loads((out_dir / "edgekit.json").read_text())["eval"][-1]
    assert recorded["ppl"] == pytest.approx(res["ppl"]) and recorded["ref"]


def test_eval_of_pytorch_reference_equals_itself(tiny_llama):
    """KL of a model against itself is zero and top-1 agreement is total: the metric plumbing is sound."""
    res = json.loads(cli("eval", tiny_llama, "--text", sample_text_path(), "--ctx", "64", "--chunks", "2",
                         "--ref", tiny_llama, "--json", "--no-record"))
    assert res["kl_mean"] == pytest.approx(0, abs=1e-9) and res["top1_agreement"] == 1.0
    assert res["ppl"] == pytest.approx(res["ref_ppl"])


def test_list(tiny_llama):
    data = json.loads(cli("list", "--json"))
    assert "gguf" in data["formats"] and "rtn" in data["methods"] and "Q4_K_M" in data["gguf_presets"]
    assert {"llamacpp", "torch"} <= set(data["backends"])


def _have_llamacpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
