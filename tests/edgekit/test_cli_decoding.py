"""The user's path through speculative decoding and KV windows: convert --draft-for, run --draft,
run --speculative ngram, run/eval --kv-window, and their one-line errors (Typer's runner, tiny models)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.quickstart import sample_text_path
from tests.helpers import build_tiny_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
runner = CliRunner()


def cli(*args, fails=False, stdout=False):
    """The command's output (``stdout``: its stdout alone, without a busy-CPU warning on stderr)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert (result.exit_code != 0) if fails else (result.exit_code == 0), result.output
    return " ".join((result.stdout if stdout else result.output).split())  # rich wraps long lines


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("six") / "m", "LlamaForCausalLM", hidden=256, ffn=512, layers=6)


@pytest.fixture(scope="module")
def target(six, tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "target"
    cli("convert", six, "--type", "F16", "-o", out)
    return out


@pytest.fixture(scope="module")
def draft(six, tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "draft"
    cli("convert", six, "--draft-for", six, "--heal", "4s", "--calib-samples", "4", "--calib-seqlen", "64",
        "-o", out)
    return out


def test_draft_for_makes_a_pruned_distilled_q4_0_draft_that_records_its_target(six, draft):
    m = json.loads((draft / "edgekit.json").read_text())
    assert m["recipe"]["prune"] == "depth:4" and m["recipe"]["preset"] == "Q4_0"
    assert m["recipe"]["draft_for"]["target"] == str(six.resolve())
    assert m["pruned"]["kind"] == "depth" and len(m["pruned"]["dropped_layers"]) == 4
    assert "heal" in m["recipe"]


def test_run_with_the_draft_and_with_ngram(target, draft):
    out = cli("run", target, "--raw", "-p", "hello there", "--temp", "0", "-n", "24", "--draft", draft)
    assert "drafted accepted" in out or "nothing drafted" in out
    plain = cli("run", target, "--raw", "-p", "hello there", "--temp", "0", "-n", "24", "--no-stats", "-t", "2",
                stdout=True)
    assert plain  # plain run, as a user types it: its attention is the one drafting verifies with
    spec = cli("run", target, "--raw", "-p", "hello there", "--temp", "0", "-n", "24", "--draft", draft, "--no-stats",
               "-t", "2", stdout=True)
    ngram = cli("run", target, "--raw", "-p", "hello there", "--temp", "0", "-n", "24", "--speculative", "ngram",
                "--no-stats", "-t", "2", stdout=True)
    assert plain == spec == ngram


def test_plain_run_decodes_a_gguf_with_the_attention_drafting_verifies_with(target, monkeypatch):
    """Drafting runs flash attention (its batches then round as one-token steps do); plain run used
    llama-cpp-python's default (off), so --draft changed SmolLM2 Q8_0's greedy text after ~85 tokens (QA s49).
    Plain run now asks for flash attention too, as llama.cpp's own CLI does; -O flash_attn=false still wins."""
    from edgekit import api

    seen: list[dict] = []

    def capture(target_, **kw):
        seen.append(kw)
        raise api.InputError("captured")

    monkeypatch.setattr(api, "open_backend", capture)
    cli("run", target, "-p", "hi", "-n", "2", fails=True)
    cli("run", target, "-p", "hi", "-n", "2", "-O", "flash_attn=false", fails=True)
    assert [kw.get("flash_attn") for kw in seen] == [True, False]


def test_run_and_eval_past_a_kv_window(target):
    out = cli("run", target, "--raw", "-p", "a b c", "--temp", "0", "-n", "150", "--kv-window", "64")
    assert "KV window 64" in out and "evicted" in out
    res = json.loads(cli("eval", target, "--text", sample_text_path(), "--kv-window", "64", "--max-tokens", "300",
                         "--json", stdout=True))  # a busy machine's thread warning goes to stderr
    assert res["tokens_scored"] == 299 and res["peak_cells"] <= 64 and res["evicted"] > 0 and res["ppl"] > 1


@pytest.mark.parametrize("args, message", [
    (["--kv-window", "64", "--chunks", "2"], "--kv-window streams the whole text through the window: drop --chunks"),
    (["--kv-window", "64", "--ctx", "32"], "drop --ctx"),
    (["--kv-sinks", "8"], "--kv-sinks is for --kv-window"),
    (["--kv-window", "64", "--record"], "it is not recorded in the manifest; drop --record"),
])
def test_eval_flags_a_kv_window_would_ignore_are_refused(target, args, message):
    """QA s49: these were accepted and silently did nothing."""
    out = cli("eval", target, "--text", sample_text_path(), *args, fails=True)
    assert message in out and "Traceback" not in out


def test_eval_past_the_trained_context_says_so(target):
    out = cli("eval", target, "--text", sample_text_path(), "--ctx", "2048", "--chunks", "1", "--no-record")
    assert "--ctx 2048 is beyond the 1024 tokens the model was trained for" in out


def test_run_past_the_trained_context_says_so(target):
    """Stop 50 left it to eval: run --ctx past the trained context (a sliding-window model's GGUF: its window)
    said nothing. A context within it, the default and a KV window (which bounds the cache) say nothing."""
    note = "--ctx 2048 is beyond the 1024 tokens the model was trained for: replies that reach past it"
    assert note in cli("run", target, "--raw", "-p", "a b", "-n", "2", "--ctx", "2048")
    for args in (["--ctx", "1024"], [], ["--ctx", "2048", "--kv-window", "64"]):
        assert "beyond the" not in cli("run", target, "--raw", "-p", "a b", "-n", "2", *args)



def test_serve_past_the_trained_context_says_so(target, monkeypatch):
    import edgekit.runtime.serve.app as serve_app

    monkeypatch.setattr(serve_app, "serve", lambda config, *a, **k: None)  # the notes, not the server
    out = cli("serve", target, "--ctx", "4096", "--port", "0")
    assert "--ctx 4096 is beyond the 1024 tokens the model was trained for" in out
    assert "beyond the" not in cli("serve", target, "--port", "0")


@pytest.mark.parametrize("args, message", [
    (["--draft", "/no/such/draft"], "draft model not found"),
    (["--speculative", "medusa"], "--speculative"),
    (["--kv-sinks", "4"], "--kv-sinks needs --kv-window"),
    (["--kv-window", "8"], "at least 64"),
    (["--n-draft", "4"], "--n-draft is how many tokens a drafter proposes"),  # QA s53: was silently ignored
])
def test_bad_decoding_options_are_one_line_errors(target, args, message):
    out = cli("run", target, "-p", "hi", *args, fails=True)
    assert message in out and "Traceback" not in out


def test_draft_for_refuses_another_tokenizer(six, tmp_path):
    other = build_tiny_model(tmp_path / "other", "MistralForCausalLM", hidden=96, ffn=256, tokenizer="spm", layers=6)
    out = cli("convert", six, "--draft-for", other, "-o", tmp_path / "d", fails=True)
    assert "tokenizer differs" in out and not (tmp_path / "d").exists()


def test_onnx_draft_for_is_the_whole_model_at_8_bits_and_drafts_for_its_target(six, tmp_path):
    """--to onnx --draft-for: onnxruntime's draft is the 8-bit copy (accepted on 94-99% of its tokens beside
    the FP16 graph, where the GGUF recipe's third of the blocks is accepted on 11-30%); --bits overrides."""
    pytest.importorskip("onnxruntime")
    target = tmp_path / "t16"
    cli("convert", six, "--to", "onnx", "--bits", "16", "-o", target)
    cli("convert", six, "--to", "onnx", "--draft-for", target, "-o", tmp_path / "d8")
    m = json.loads((tmp_path / "d8" / "edgekit.json").read_text())
    assert m["recipe"]["bits"] == 8 and not m["recipe"].get("prune")
    assert m["recipe"]["draft_for"]["target"] == str(target.resolve())
    cli("convert", six, "--to", "onnx", "--bits", "4", "--draft-for", six, "-o", tmp_path / "d4")
    assert json.loads((tmp_path / "d4" / "edgekit.json").read_text())["recipe"]["bits"] == 4
    # the same threads either way (on a busy machine the default drops to 1, which rounds sums differently)
    plain = cli("run", target, "--raw", "-p", "hello there", "--temp", "0", "-n", "16", "--no-stats", "-t", "2",
                stdout=True)
    spec = cli("run", target, "--raw", "-p", "hello there", "--temp", "0", "-n", "16", "--draft", tmp_path / "d8",
               "--no-stats", "-t", "2", stdout=True)
    assert plain == spec
    out = cli("convert", six, "--to", "coreml", "--draft-for", six, "-o", tmp_path / "dc", fails=True)
    assert "--to gguf or --to onnx" in out
