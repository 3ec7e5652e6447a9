"""Paths that are not UTF-8 (Linux names may hold any bytes; Python keeps them as lone surrogates): artifacts in
such a folder run with llama.cpp and onnxruntime (through a link with a UTF-8 path), a name no link can help is
refused in one line before loading, and ``rm`` deletes such an artifact and its chat."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit import api, library
from edgekit.converters.formats.base import ConvertRecipe
from edgekit.errors import InputError
from edgekit.native_path import utf8_path, utf8_path_to_load
from edgekit.runtime.base import SamplingConfig

LATIN = os.fsdecode(b"lat\xe9n")  # "latén" in Latin-1: byte 0xe9 is no UTF-8
GREEDY = SamplingConfig(temperature=0, max_tokens=6)


def answer(target: Path, **options) -> str:
    with api.open_backend(target, n_ctx=128, **options) as be:
        return "".join(be.generate("Hello there", GREEDY))


@pytest.fixture(scope="module")
def odd_gguf(tiny_gguf, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_gguf, tmp_path_factory.mktemp("paths") / LATIN / "art"))


@pytest.mark.llamacpp
def test_llamacpp_runs_an_artifact_in_a_folder_whose_name_is_not_utf8(tiny_gguf, odd_gguf):
    """QA: 'llama.cpp could not load ... (surrogates not allowed); the file may be truncated or corrupt'."""
    assert answer(odd_gguf) == answer(tiny_gguf)


@pytest.mark.llamacpp
def test_llamacpp_draft_in_such_a_folder_loads_and_is_reported_by_its_own_path(odd_gguf):
    with api.open_backend(odd_gguf, n_ctx=128, draft=odd_gguf) as be:
        assert "".join(be.generate("Hello there", GREEDY))
        assert be.info["speculative"]["draft_path"] == str((odd_gguf / "model.gguf").resolve())
        tmp = be._tmpdir
        be.close()  # a restart in safe mode closes first: the next start links again
        assert not os.path.exists(tmp)
        load = be._load_request()
        assert Path(load["model_path"]).is_file() and Path(load["speculative"]["draft_path"]).is_file()
        load["model_path"].encode("utf-8")
    assert be._tmpdir is None


@pytest.mark.llamacpp
def test_a_gguf_file_whose_own_name_is_not_utf8_is_refused_before_loading(tiny_gguf, tmp_path):
    bad = tmp_path / f"{LATIN}.gguf"
    shutil.copy(tiny_gguf / "model.gguf", bad)
    with pytest.raises(InputError) as exc:
        api.open_backend(bad)
    msg = str(exc.value)
    assert "is not valid UTF-8 (the name holds byte 0xe9), which llama.cpp cannot open: rename the file" in msg
    assert "\n" not in msg


def test_onnxruntime_runs_an_artifact_in_a_folder_whose_name_is_not_utf8(tiny_llama, tmp_path):
    """QA: 'onnxruntime cannot load model.onnx ... the file is damaged or incomplete'; its tokenizer.json
    failed the same way in the tokenizers library."""
    pytest.importorskip("onnxruntime")
    plain = api.convert(tiny_llama, "onnx", output=tmp_path / "plain", recipe=ConvertRecipe(bits=4)).path
    odd = Path(shutil.copytree(plain, tmp_path / LATIN / "onnx"))
    assert answer(odd) == answer(plain)
    renamed = odd / f"{LATIN}.onnx"  # a name no link to the folder can help
    (odd / "model.onnx").rename(renamed)
    with pytest.raises(InputError, match="which onnxruntime cannot open: rename the file"):
        answer(renamed)


def test_a_link_is_made_to_the_folder_and_removed_after_loading(tmp_path):
    folder = tmp_path / LATIN
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"weights")
    with utf8_path_to_load(folder / "model.onnx", "onnxruntime") as native:
        native.encode("utf-8")
        assert Path(native).read_bytes() == b"weights"
        assert Path(native).parent.is_symlink()
    assert not Path(native).parent.parent.exists()
    with utf8_path_to_load(tmp_path / "plain.onnx", "onnxruntime") as native:
        assert native == str(tmp_path / "plain.onnx")


def test_where_no_link_can_be_made_the_folder_is_named_to_rename(tmp_path):
    def no_temp() -> str:
        raise OSError("read-only file system")

    with pytest.raises(InputError) as exc:
        utf8_path(tmp_path / LATIN / "model.gguf", "llama.cpp", no_temp)
    assert str(exc.value).endswith("is not valid UTF-8 (the name holds byte 0xe9), which llama.cpp cannot open: "
                                   "rename the folder")


def test_rm_deletes_an_artifact_in_such_a_folder_and_its_chat(tiny_gguf, tmp_path, private_home):
    """QA: the folder went, then 'internal error: UnicodeEncodeError' from the chat's file name."""
    art = Path(shutil.copytree(tiny_gguf, tmp_path / LATIN / "art"))
    chat = library.chat_file(art, create_home=True)
    chat.parent.mkdir(parents=True, exist_ok=True)
    chat.write_text("[]")
    # the real command: its streams keep a path's bytes, which CliRunner's cannot print
    r = subprocess.run([str(Path(sys.executable).with_name("edgekit")), "rm", "-y", str(art)], capture_output=True,
                       env={**os.environ, "EDGEKIT_HOME": str(private_home)}, timeout=120)
    out = (r.stdout + r.stderr).decode("utf-8", "surrogateescape")
    assert r.returncode == 0, out
    assert out.startswith(f"deleted {art} (") and "freed" in out and "internal error" not in out
    assert not art.exists() and not chat.exists()


def test_the_chat_of_a_utf8_path_keeps_its_file(private_home):
    """The key is the path's bytes: for a UTF-8 path the same as before, so no conversation is lost."""
    import hashlib

    path = Path("/tmp/sm\u00f6l").resolve()
    assert library.chat_file(path).stem == hashlib.sha1(str(path).encode()).hexdigest()[:16]


@pytest.mark.parametrize(("to", "recipe"), [("gguf", ConvertRecipe(preset="Q8_0")), ("onnx", ConvertRecipe(bits=8))])
def test_convert_from_and_into_such_a_folder(tiny_llama, tmp_path, to, recipe):
    """The checkpoint's tokenizer.json is read by edgekit (tokenizers' from_file takes strict UTF-8) and ONNX's
    checker gets the graph through a link: both used to fail on the folder's name."""
    src = Path(shutil.copytree(tiny_llama, tmp_path / LATIN / "ckpt"))
    art = api.convert(src, to, output=tmp_path / LATIN / "out", recipe=recipe)
    assert art.model_file.is_file() and answer(art.path)
