"""Every perplexity says what it was measured on: text name and sha256, chunks, ctx, reference."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.evaluate import provenance_label
from edgekit.quickstart import sample_text_path

pytestmark = pytest.mark.llamacpp


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=300)


@pytest.fixture(scope="module")
def evaluated(tiny_llama, tmp_path_factory):
    art = tmp_path_factory.mktemp("prov") / "tiny-q8"
    assert cli("convert", tiny_llama, "--type", "Q8_0", "-o", art).exit_code == 0
    r = cli("eval", art, "--text", sample_text_path(), "--ctx", "64", "--chunks", "2", "--ref", tiny_llama, "-t", "1")
    assert r.exit_code == 0, r.output
    return art, r.stdout


def test_the_manifest_records_text_hash_chunks_ctx_and_reference(evaluated, tiny_llama):
    art, _ = evaluated
    e = json.loads((art / "edgekit.json").read_text())["eval"][-1]
    text = sample_text_path()
    assert e["text_name"] == "sample.txt" and e["text"] == str(text.resolve())
    assert e["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert (e["chunks"], e["ctx"]) == (2, 64) and e["ref"] == str(tiny_llama.resolve())


def test_cli_eval_ls_show_and_tui_say_what_a_perplexity_was_measured_on(evaluated, monkeypatch, tmp_path):
    art, table = evaluated
    table = " ".join(table.split())  # the title wraps to the table's width
    sha8 = hashlib.sha256(sample_text_path().read_bytes()).hexdigest()[:8]
    assert f"sample.txt sha256:{sha8}, 2 chunks x 64, ref llama" in table
    monkeypatch.setenv("EDGEKIT_MODELS", str(art.parent))
    assert "sample.txt 2x64" in cli("ls").stdout
    assert f"on sample.txt sha256:{sha8}, 2 chunks x 64, ref llama" in cli("show", art.name).stdout
    from edgekit.tui.catalog import row_for

    assert row_for(art).ppl_text == "sample.txt"


def test_a_streamed_evaluation_names_its_text_too(evaluated):
    art, _ = evaluated
    r = cli("eval", art, "--text", sample_text_path(), "--kv-window", "64", "--max-tokens", "160", "--json", "-t", "1")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["text_name"] == "sample.txt" and len(res["text_sha256"]) == 64


def test_an_old_record_without_a_hash_says_so():
    assert provenance_label({"ppl": 10.0, "text": "/x/valid.txt", "ctx": 512, "chunks": 16}) == \
        "valid.txt no hash recorded, 16 chunks x 512"
