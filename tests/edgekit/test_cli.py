"""The CLI as a user runs it (Typer's runner), on a tiny real checkpoint."""

from __future__ import annotations

import itertools
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
    return result.stdout  # not stderr's notes (a busy machine's thread count), which --json output must not hold


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


@pytest.fixture(scope="module")
def tiny_q4(tiny_llama, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cli") / "tiny-gguf-q4"
    cli("convert", tiny_llama, "--bits", "4", "-o", out_dir)
    return out_dir


def test_convert_then_inspect(tiny_q4):
    manifest = json.loads((tiny_q4 / "edgekit.json").read_text())
    assert manifest["preset"] == "Q4_K_M"

    info = json.loads(cli("inspect", tiny_q4, "--json", "--tensors", "--ctx", "1024"))
    assert info["architecture"] == "llama" and info["hparams"]["block_count"] == 2
    assert {t["name"] for t in info["tensors"]} == set(manifest["tensors"])
    assert info["memory"]["kv_cache_f16"] == 2 * 2 * 1024 * 2 * 64 * 2  # K+V, layers, ctx, kv heads x dim, f16
    # the peak to run is the figure `push` checks a device's RAM against: one memory model, not two
    from edgekit.artifact import Artifact
    from edgekit.devices.transfer import ram_needed

    run = info["memory"]["to_run"]
    assert run["runtime"] == "llamacpp" and run["bytes"] == ram_needed(Artifact.open(tiny_q4), 1024)
    assert run["bytes"] > info["memory"]["total"]  # compute buffers and the runtime's own on top
    text = cli("inspect", tiny_q4)
    assert "tensor types" in text and "at peak to run on llamacpp" in " ".join(text.split())


@pytest.mark.llamacpp
def test_run_is_greedy_llama_cpp_completion(tiny_q4):
    """`run --raw --temp 0 -n 8` prints exactly the 8-token greedy continuation that llama-cpp-python
    itself gives for the prompt, and the stats line on stderr says what happened."""
    import llama_cpp

    result = runner.invoke(app, ["run", str(tiny_q4), "-p", "The river", "--raw", "--temp", "0", "-n", "8",
                                 "--ctx", "64"])
    assert result.exit_code == 0, result.output
    llm = llama_cpp.Llama(model_path=str(tiny_q4 / "model.gguf"), n_ctx=64, verbose=False)
    prompt = llm.tokenize(b"The river")
    greedy = list(itertools.islice(llm.generate(prompt, temp=0.0), 8))
    assert llm.token_eos() not in greedy  # the tiny model runs to the length limit
    # the random model emits byte tokens that are not valid UTF-8: edgekit shows them as U+FFFD
    expected = llm.detokenize(greedy).decode("utf-8", errors="replace")
    assert result.stdout == expected + "\n"
    assert f"{len(prompt)} prompt tokens, 8 generated" in result.stderr and "stop: length" in result.stderr
    assert "the context is full" not in result.stderr  # -n stopped it
    # QA s51: stopped by the context, the line said "stop: length" as if -n had (only --json told them apart)
    result = runner.invoke(app, ["run", str(tiny_q4), "-p", "The river", "--raw", "--temp", "0", "-n", "32",
                                 "--ctx", "32"])
    assert result.exit_code == 0, result.output
    assert "generated" in result.stderr and "the context is full: a larger --ctx" in result.stderr


@pytest.mark.llamacpp
def test_eval_with_reference_is_recorded(tiny_q4, tiny_llama):
    res = json.loads(cli("eval", tiny_q4, "--text", sample_text_path(), "--ctx", "64", "--chunks", "3",
                         "--ref", tiny_llama, "--json"))
    assert res["chunks"] == 3 and res["tokens_scored"] == 3 * 31
    assert 0 <= res["kl_mean"] and 0 <= res["top1_agreement"] <= 1 and res["ppl"] > 1
    recorded = json.loads((tiny_q4 / "edgekit.json").read_text())["eval"][-1]
    assert recorded["ppl"] == pytest.approx(res["ppl"]) and recorded["ref"]


def test_eval_of_a_read_only_artifact_still_prints_its_result(tiny_q4, monkeypatch):
    """The perplexity was computed, then lost to a manifest that could not be written (a read-only copy)."""
    from edgekit.artifact import Artifact
    from edgekit.errors import InputError

    def read_only(self, entry):
        raise InputError(f"cannot write {self.path}/edgekit.json: Read-only file system; make it writable")

    monkeypatch.setattr(Artifact, "record_eval", read_only)
    r = runner.invoke(app, ["eval", str(tiny_q4), "--text", str(sample_text_path()), "--ctx", "64", "--chunks", "2"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "not recorded" in r.stderr and "--no-record" in r.stderr


def test_eval_of_pytorch_reference_equals_itself(tiny_llama):
    """KL of a model against itself is zero and top-1 agreement is total: the metric plumbing is sound."""
    res = json.loads(cli("eval", tiny_llama, "--text", sample_text_path(), "--ctx", "64", "--chunks", "2",
                         "--ref", tiny_llama, "--json", "--no-record"))
    assert res["kl_mean"] == pytest.approx(0, abs=1e-9) and res["top1_agreement"] == 1.0
    assert res["ppl"] == pytest.approx(res["ref_ppl"])


def test_list(tiny_llama):
    data = json.loads(cli("registry", "--json"))
    assert "gguf" in data["formats"] and "rtn" in data["methods"] and "Q4_K_M" in data["gguf_presets"]
    assert {"llamacpp", "torch"} <= set(data["backends"])


def test_profile_table_leaves_out_measures_no_row_has():
    """A column every row would print as "-" (energy without RAPL, the roofline of prompt tests) is left
    out; one that some row has stays, with "-" for the others."""
    from rich.console import Console

    from edgekit.cli.profile_cmd import _table
    from edgekit.runtime.profile_schema import ProfileRow

    def row(test: str, roofline: dict | None) -> ProfileRow:
        return ProfileRow(test=test, n_prompt=0, n_gen=16, n_depth=0, artifact={"name": "a-very-long-artifact-name"},
                          config={"n_threads": 2, "n_batch": 512, "n_ctx": 512}, samples_s=[0.1, 0.11],
                          load_s=0.5, peak_rss_bytes=200_000_000, roofline=roofline)

    def header(rows: list[ProfileRow]) -> str:
        console = Console(width=200, record=True)
        console.print(_table(rows, "t"))
        return console.export_text().splitlines()[2]

    h = header([row("pp512", None), row("tg128", {"available": True, "fraction": 0.5})])
    assert "roofline" in h and "J/tok" not in h and "TTFT ms" not in h and "tokens/s" in h and "load s" in h
    h = header([row("pp512", None)])
    assert "roofline" not in h and "peak RSS" in h


def test_profile_table_in_80_columns_keeps_every_measure_whole():
    """One artifact goes to the title; with several, their names fold and the measures still print whole."""
    from rich.console import Console

    from edgekit.cli.profile_cmd import _table
    from edgekit.runtime.profile_schema import ProfileRow

    def row(name: str) -> ProfileRow:
        return ProfileRow(test="tg128", n_prompt=0, n_gen=128, n_depth=0, artifact={"name": name},
                          config={"n_threads": 2, "n_batch": 512, "n_ctx": 512}, samples_s=[1.6, 1.7],
                          load_s=0.25, peak_rss_bytes=186_000_000, roofline={"available": True, "fraction": 0.55})

    def text(rows: list[ProfileRow]) -> str:
        console = Console(width=80, record=True)
        console.print(_table(rows, "edgekit profile (ok)"))
        return console.export_text()

    one = text([row("smollm2-135m-instruct-gguf-q4_k_m")])
    assert "edgekit profile (ok): smollm2-135m-instruct-gguf-q4_k_m" in one and "artifact" not in one
    assert "t2 b512 c512" in one and "77.6±3.3" in one and "186 MB" in one
    two = text([row("smollm2-135m-instruct-gguf-q4_k_m"), row("smollm2-135m-instruct-gguf-q8_0")])
    assert "artifact" in two and "t2 b512" in two and "77.6±3.3" in two and "186 MB" in two and "55%" in two
    assert max(len(line) for line in two.splitlines()) <= 80
