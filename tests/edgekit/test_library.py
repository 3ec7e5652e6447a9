"""The model library: one naming scheme, convert writes into the store, names resolve, ls/show/rm/ps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit import api, library
from edgekit.cli.main import app

runner = CliRunner()


def cli(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, terminal_width=200)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store"
    monkeypatch.setenv("EDGEKIT_MODELS", str(path))
    return path


@pytest.mark.parametrize("fmt, recipe, suffix", [
    ("gguf", api.ConvertRecipe(bits=4), "gguf-q4_k_m"),
    ("gguf", api.ConvertRecipe(bits=None, preset="Q4_0"), "gguf-q4_0"),
    ("gguf", api.ConvertRecipe(bits=None, bpw=3.5), "gguf-3.5bpw"),
    ("gguf", api.ConvertRecipe(bits=None, size=90_000_000), "gguf-90mb"),
    ("gguf", api.ConvertRecipe(bits=None, size=1_000_000_000), "gguf-1gb"),
    ("gguf", api.ConvertRecipe(bits=None, size=1_500_000_000), "gguf-1.5gb"),
    ("gguf", api.ConvertRecipe(bits=None, size=512 << 20), "gguf-512mib"),
    ("gguf", api.ConvertRecipe(bits=None, size=3 << 29), "gguf-1.5gib"),
    ("gguf", api.ConvertRecipe(bits=None, size=72_500_000), "gguf-72.5mb"),
    ("gguf", api.ConvertRecipe(bits=None, size=64_000_000), "gguf-64mb"),
    ("onnx", api.ConvertRecipe(bits=4), "onnx-uint4_b32"),
    ("onnx", api.ConvertRecipe(bits=32), "onnx-fp32"),
    ("onnx", api.ConvertRecipe(bits=None, size=50_000_000), "onnx-50mb"),
    ("coreml", api.ConvertRecipe(bits=16), "coreml-fp16"),
    # what tells two conversions of one model apart: another method, per-tensor overrides, a sparse FFN
    ("gguf", api.ConvertRecipe(bits=4, method="gptq"), "gguf-q4_k_m-gptq"),
    ("gguf", api.ConvertRecipe(bits=4, method="awq+gptq"), "gguf-q4_k_m-awq+gptq"),
    ("onnx", api.ConvertRecipe(bits=4, method="gptq"), "onnx-uint4_b32-gptq"),
    ("gguf", api.ConvertRecipe(bits=None, preset="Q4_0", tensor_types=(("ffn_down", "Q6_K"),)), "gguf-q4_0-custom"),
    ("gguf", api.ConvertRecipe(bits=4, extra={"sparse_ffn": "0.5"}), "gguf-q4_k_m-sparse"),
    ("aqlm", api.ConvertRecipe(bits=2, method="aqlm"), "aqlm-2x8"),  # its own method is its default
])
def test_one_naming_scheme_for_every_format(store, fmt, recipe, suffix):
    out = api.default_output(Path("/models/SmolLM2-135M-Instruct"), fmt, recipe)
    assert out == store / f"smollm2-135m-instruct-{suffix}"
    assert out.name == out.name.lower()


def test_default_output_takes_a_str_path(store):
    """QA s54: ``default_output("./model", ...)`` (public, in ``api.__all__``) failed with AttributeError."""
    recipe = api.ConvertRecipe(bits=4)
    assert api.default_output("/models/SmolLM2-135M-Instruct", "gguf", recipe) == api.default_output(
        Path("/models/SmolLM2-135M-Instruct"), "gguf", recipe)


def test_names_are_made_safe():
    assert library.artifact_name("My Model (v2)", "gguf-Q4_0") == "my-model-v2-gguf-q4_0"
    assert library.artifact_name("../..", "x") == "x"


def test_convert_writes_into_the_store_and_names_resolve(store, tiny_llama, tmp_path):
    r = cli("convert", tiny_llama, "--type", "Q8_0")
    assert r.exit_code == 0, r.output
    art = store / "llama-gguf-q8_0"
    assert (art / "edgekit.json").is_file() and str(art) in r.output  # it says where it wrote
    listed = json.loads(cli("ls", "--json").stdout)
    assert [a["name"] for a in listed["artifacts"]] == ["llama-gguf-q8_0"]
    assert listed["artifacts"][0]["size_bytes"] > 0 and listed["artifacts"][0]["format"] == "gguf"
    info = json.loads(cli("inspect", "llama-gguf-q8_0", "--json").stdout)  # a name works where a path does
    assert info["architecture"] == "llama"
    shown = cli("show", "llama-gguf-q8_0")
    assert shown.exit_code == 0 and str(art) in shown.stdout and "Q8_0" in shown.stdout
    # -o still wins, and a path given wins over a store name
    r = cli("convert", tiny_llama, "--type", "Q8_0", "-o", tmp_path / "elsewhere")
    assert r.exit_code == 0 and (tmp_path / "elsewhere" / "edgekit.json").is_file()
    assert [a.name for a in library.entries()] == ["llama-gguf-q8_0"]


def test_a_misspelt_name_gets_the_close_ones(store, tiny_llama):
    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    r = cli("inspect", "llama-gguf-q8")
    assert r.exit_code != 0 and "did you mean llama-gguf-q8_0" in r.output and "Traceback" not in r.output


def test_rm_asks_refuses_strangers_and_deletes_with_y(store, tiny_llama, tmp_path):
    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    r = cli("rm", "llama-gguf-q8_0")  # stdin is not a terminal: no silent yes
    assert r.exit_code != 0 and "-y" in r.output and (store / "llama-gguf-q8_0").is_dir()
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "a.jpg").write_bytes(b"x")
    r = cli("rm", stranger, "-y")
    assert r.exit_code != 0 and "not an edgekit artifact" in r.output and (stranger / "a.jpg").exists()
    r = cli("rm", "llama-gguf-q8_0", "-y")
    assert r.exit_code == 0 and "deleted" in r.output and not (store / "llama-gguf-q8_0").exists()
    assert not list(store.iterdir())  # no hidden leftovers either
    r = cli("rm", "llama-gguf-q8_0", "-y")
    assert r.exit_code != 0 and "does not exist" in r.output


def test_ls_of_an_empty_store_says_how_to_fill_it(store):
    r = cli("ls")
    assert r.exit_code == 0 and "edgekit convert" in r.stdout


def test_list_is_registry_now_with_a_hint():
    data = json.loads(cli("registry", "--json").stdout)
    assert "gguf" in data["formats"] and "rtn" in data["methods"]
    r = cli("list")
    assert r.exit_code == 0 and "'edgekit registry'" in r.stderr and "formats:" in r.stdout
    assert "list " not in cli("--help").stdout.replace("ls ", "")  # hidden from help


def test_ps_lists_an_announced_server_and_sweeps_a_dead_ones_record(tmp_path, monkeypatch):
    from edgekit.runtime import processes

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    stale = tmp_path / "home" / "run" / "serve-999999999.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"pid": 999999999, "started": 0, "url": "http://127.0.0.1:1", "models": {}}))
    with processes.announce_server("http://127.0.0.1:8123", {"tiny": "/x/tiny"}):
        found = processes.servers()
        assert [(s.pid, s.port, s.models) for s in found] == [(os.getpid(), 8123, ("tiny",))]
        assert found[0].rss > 0
        r = cli("ps", "--json")
        assert json.loads(r.stdout)[0]["port"] == 8123
    assert processes.servers() == [] and not stale.exists()


@pytest.mark.llamacpp
def test_ps_finds_a_llama_cpp_worker_and_its_model(store, tiny_llama):
    from edgekit.runtime import processes

    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    with api.open_backend("llama-gguf-q8_0", n_ctx=64, n_threads=1) as backend:
        # other tests of this session may still hold workers of their own: this one is known by its pid
        mine = [w for w in processes.workers() if w.parent == os.getpid() and w.pid == backend.pid]
        assert len(mine) == 1 and mine[0].models == ("llama-gguf-q8_0",) and mine[0].rss > 0
        assert backend.name == "llamacpp"
        pid = backend.pid
    assert not [w for w in processes.workers() if w.pid == pid]


def test_a_tensor_type_override_is_named_and_shown(store, tiny_llama):
    """`--tensor-type` gets its own name (beside the plain conversion, not over it), and show/inspect say it."""
    r = cli("convert", tiny_llama, "--type", "Q8_0", "--tensor-type", "ffn_down=Q4_0")
    assert r.exit_code == 0, r.output
    assert "fell back" not in r.stdout  # nothing fell back: no pointer to inspect
    name = "llama-gguf-q8_0-custom"
    assert (store / name / "edgekit.json").is_file()
    assert "--tensor-type ffn_down=Q4_0" in cli("show", name).stdout
    assert "--tensor-type ffn_down=Q4_0" in " ".join(cli("inspect", name).stdout.split())


def test_a_tensor_type_that_matches_nothing_is_said(store, tiny_llama, tmp_path):
    r = cli("convert", tiny_llama, "--type", "Q8_0", "--tensor-type", "ffn_dwn=Q4_0", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "--tensor-type 'ffn_dwn' matches no tensor" in " ".join(r.stderr.split())
    r = cli("convert", tiny_llama, "--type", "Q8_0", "--tensor-type", "ffn_down=Q4_0", "-o", tmp_path / "p")
    assert r.exit_code == 0 and "matches no tensor" not in r.stderr


def test_a_library_path_that_is_a_file_says_so(tmp_path, monkeypatch, tiny_llama):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("EDGEKIT_MODELS", str(tmp_path / "afile"))
    for args in (("ls",), ("convert", tiny_llama, "--type", "Q8_0")):
        r = cli(*args)
        assert r.exit_code == 2 and "is" in r.output and "a file, not a folder" in r.output, r.output
        assert "Traceback" not in r.output


def test_show_tells_the_folder_from_the_model_files(store, tiny_llama):
    """ls/show count the folder (an ONNX artifact carries its tokenizer), convert and bpw the model files."""
    r = cli("convert", tiny_llama, "--to", "onnx", "--bits", "4")
    assert r.exit_code == 0, r.output
    shown = " ".join(cli("show", "llama-onnx-uint4_b32").stdout.split())
    assert "MB on disk (" in shown and "MB of model files, which bpw counts" in shown


def test_accented_model_names_keep_their_letters():
    """QA: `mödel é` became `m-del`, and Mödel/Modèl/Model collided with other names."""
    assert library.artifact_name("mödel é", "gguf-Q8_0") == "model-e-gguf-q8_0"
    assert library.artifact_name("Modèl", "x") == "model-x"


def _damaged_manifest(art: Path) -> None:
    text = (art / "edgekit.json").read_text()
    (art / "edgekit.json").write_text(text[:len(text) // 3])  # truncated mid-way


def test_ls_lists_an_artifact_with_a_damaged_manifest_and_rm_removes_it(store, tiny_llama):
    """QA: `ls` hid it and `rm` refused it with a false "no edgekit.json": a dead end from the CLI."""
    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    _damaged_manifest(store / "llama-gguf-q8_0")
    r = cli("ls")
    assert r.exit_code == 0 and "llama-gguf-q8_0" in r.stdout and "(damaged)" in r.stdout, r.output
    assert "unreadable edgekit.json: rm it, or re-convert with --force" in " ".join(r.stderr.split())
    listed = json.loads(cli("ls", "--json").stdout)["artifacts"]
    assert listed[0]["problem"] == library.BROKEN and listed[0]["size_bytes"] > 0
    r = cli("rm", "llama-gguf-q8_0", "-y")
    assert r.exit_code == 0 and "deleted" in r.output and not (store / "llama-gguf-q8_0").exists(), r.output


def test_ls_and_show_flag_a_truncated_or_missing_model_file(store, tiny_llama):
    """QA: a model file cut short was listed as if whole; ls compares sizes only (no hashing)."""
    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    model = store / "llama-gguf-q8_0" / "model.gguf"
    model.write_bytes(model.read_bytes()[:300_000])
    r = cli("ls")
    assert "(damaged)" in r.stdout and "model file truncated" in r.stderr and "re-convert" in r.stderr, r.output
    shown = " ".join(cli("show", "llama-gguf-q8_0").stdout.split())
    assert "damaged model file truncated (0.3 of" in shown, shown
    model.unlink()
    assert "model.gguf is missing: re-convert with --force" in " ".join(cli("ls").stderr.split())
    assert library.entries()[0].problem


def test_a_whole_artifact_is_not_flagged(store, tiny_llama):
    assert cli("convert", tiny_llama, "--to", "onnx", "--bits", "4").exit_code == 0
    r = cli("ls")
    assert "damaged" not in r.stdout and not r.stderr and [e.problem for e in library.entries()] == [""]


def test_a_linked_artifact_is_listed_and_rm_removes_only_the_link(store, tiny_llama, tmp_path):
    """QA: `ls` hid a symbolic link to an artifact, `show` used it and `rm` said "no edgekit.json"."""
    target = tmp_path / "elsewhere-q8"
    assert cli("convert", tiny_llama, "--type", "Q8_0", "-o", target).exit_code == 0
    store.mkdir(exist_ok=True)
    (store / "linked-art").symlink_to(target)
    (store / "to-nothing").symlink_to(tmp_path)  # a link to a folder that is no artifact: not listed
    r = cli("ls")
    assert r.exit_code == 0 and "linked-art ->" in r.stdout, r.output  # its target beside it (a narrow table folds it)
    assert [(a["name"], a["link"]) for a in json.loads(cli("ls", "--json").stdout)["artifacts"]] == [
        ("linked-art", str(target))]
    r = cli("rm", "to-nothing", "-y")
    assert r.exit_code == 2 and "is a symbolic link" in r.output and (store / "to-nothing").is_symlink()
    r = cli("rm", "linked-art", "-y")
    assert r.exit_code == 0 and "the link" in r.output, r.output
    assert not (store / "linked-art").is_symlink() and (target / "model.gguf").is_file()


def test_rm_deletes_the_chat_kept_with_the_artifact(store, tiny_llama, private_home):
    """QA: `rm` left the chat history, and an artifact converted again at the same path inherited it."""
    from edgekit.tui.chat_session import ChatSession

    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    art = store / "llama-gguf-q8_0"
    session = ChatSession.open(art)
    session.messages.append({"role": "user", "content": "old secret conversation"})
    session.save()
    assert library.chat_file(art).is_file()
    assert cli("rm", "llama-gguf-q8_0", "-y").exit_code == 0
    assert not library.chat_file(art).exists()
    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    assert ChatSession.open(art).messages == []


def test_rm_keeps_an_artifact_replaced_while_it_asked(store, tiny_llama, monkeypatch):
    """QA: `rm` asked about one artifact and deleted the one a `convert --force` wrote meanwhile."""
    import click.testing
    import typer
    import typer.testing

    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    art = store / "llama-gguf-q8_0"

    def confirm(question, **kwargs):  # the user reads the question while another edgekit replaces the artifact
        assert api.convert(tiny_llama, "gguf", output=art, recipe=api.ConvertRecipe(bits=8), force=True)
        return True

    for runner_io in (click.testing, typer.testing):  # a terminal to ask on (which CliRunner's stdin is not)
        if hasattr(runner_io, "_NamedTextIOWrapper"):
            monkeypatch.setattr(runner_io._NamedTextIOWrapper, "isatty", lambda self: True)
    monkeypatch.setattr(typer, "confirm", confirm)
    r = cli("rm", "llama-gguf-q8_0")
    assert r.exit_code == 2 and "was replaced by another edgekit while you confirmed; nothing was deleted" in r.output
    assert (art / "model.gguf").is_file() and not [p for p in store.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(typer, "confirm", lambda question, **kwargs: True)  # asked again: this one goes
    assert cli("rm", "llama-gguf-q8_0").exit_code == 0 and not art.exists()


def test_ls_where_the_home_cannot_be_made_is_an_empty_library(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.delenv("EDGEKIT_MODELS", raising=False)
    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "afile" / "home"))  # cannot be created, even by root
    r = cli("ls")
    assert r.exit_code == 0 and "no artifacts in" in r.stdout and "Traceback" not in r.output, r.output


def test_ls_marks_an_artifact_a_newer_edgekit_wrote(store, tiny_llama):
    """QA s52: ls listed it as an ordinary row while show, inspect and run refused it."""
    assert cli("convert", tiny_llama, "--type", "Q8_0").exit_code == 0
    mpath = store / "llama-gguf-q8_0" / "edgekit.json"
    mpath.write_text(mpath.read_text().replace('"edgekit.artifact/1"', '"edgekit.artifact/2"'))
    r = cli("ls")
    assert r.exit_code == 0 and "(newer edgekit)" in r.stdout, r.output
    assert "written by a newer edgekit (edgekit.artifact/2): upgrade edgekit" in " ".join(r.stderr.split())
    listed = json.loads(cli("ls", "--json").stdout)["artifacts"]
    assert listed[0]["problem"].startswith(library.NEWER)
