"""Bad input: one-line errors that say the fix, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_clean_error(code: int, output: str, *fragments: str) -> None:
    assert code != 0, output
    assert "Traceback" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), output
    text = " ".join(output.split())
    for frag in fragments:
        assert frag in text, (frag, output)


def no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".partial" in p.name or ".old-" in p.name]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    assert_clean_error(*run_cli("convert", tmp_path / "nope"), "does not exist")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "x").mkdir()
    assert_clean_error(*run_cli("convert", tmp_path / "x"), "not a Hugging Face model folder")


def test_pickle_only_checkpoint_is_refused(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    assert_clean_error(*run_cli("convert", m, "-o", tmp_path / "out"), "never loads pickles", "safetensors")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_clean_error(*run_cli("convert", m, "-o", tmp_path / "out"), "not a valid safetensors file")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(*run_cli("convert", m, "-o", tmp_path / "out"), "truncated")
    no_leftovers(tmp_path)


def test_unsupported_architecture_lists_supported(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(*run_cli("convert", m), "GPTNeoXForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_an_activation_the_graphs_do_not_compute_is_refused(tiny_llama, tmp_path):
    """llama.cpp's llama graph computes SiLU whatever config.json says: a GELU Llama would convert into
    another model, silently."""
    m = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["hidden_act"] = "gelu_new"
    (m / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(*run_cli("convert", m, "-o", tmp_path / "out"), "hidden_act is 'gelu_new'", "SiLU")
    assert not (tmp_path / "out").exists()
    cfg["hidden_act"] = "silu"
    (m / "config.json").write_text(json.dumps(cfg))
    from edgekit.model import HFCheckpoint

    assert HFCheckpoint.open(m).spec.gguf_arch == "llama"


def test_a_weight_with_nan_is_named(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    m = copy_model(tiny_llama, tmp_path / "m")
    weights = load_file(str(m / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name].copy()
    weights[name].flat[7] = float("nan")
    save_file(weights, str(m / "model.safetensors"), metadata={"format": "pt"})
    for args in (("--type", "Q4_0"), ("--type", "F16")):
        code, out = run_cli("convert", m, *args, "-o", tmp_path / "out")
        assert_clean_error(code, out, f"tensor {name} holds NaN or infinite values", "re-download")
        assert code == 3
        no_leftovers(tmp_path)


def test_missing_tokenizer(tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "tokenizer.json").unlink()
    assert_clean_error(*run_cli("convert", m, "-o", tmp_path / "out"), "no tokenizer")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


@pytest.mark.parametrize(("args", "fragment"), [
    (("--bits", "7"), "--bits 7 is not supported"),
    (("--type", "Q9_X"), "Q9_X"),
    (("--tensor-type", "ffn_down"), "REGEX=TYPE"),
    (("--tensor-type", "ffn_down=Q9"), "Q9"),
    (("--to", "tflite"), "unknown format"),
    (("--method", "magic"), "unknown quantization method"),
])
def test_unsupported_options(tiny_llama, tmp_path, args, fragment):
    code, out = run_cli("convert", tiny_llama, "-o", tmp_path / "out", *args)
    assert_clean_error(code, out, fragment)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_llama, tmp_path):
    out = tmp_path / "out"
    code, text = run_cli("convert", tiny_llama, "--type", "Q8_0", "-o", out)
    assert code == 0, text
    before = (out / "model.gguf").stat().st_mtime_ns
    assert_clean_error(*run_cli("convert", tiny_llama, "--type", "Q4_0", "-o", out), "--force")
    assert (out / "model.gguf").stat().st_mtime_ns == before
    code, text = run_cli("convert", tiny_llama, "--type", "Q4_0", "-o", out, "--force")
    assert code == 0, text
    assert json.loads((out / "edgekit.json").read_text())["preset"] == "Q4_0"
    no_leftovers(tmp_path)


def test_not_enough_disk_space(tiny_llama, tmp_path, monkeypatch):
    import edgekit.fsutil as fsutil

    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert_clean_error(*run_cli("convert", tiny_llama, "-o", tmp_path / "out"), "not enough disk space")
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_interrupted_convert_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from edgekit.converters.quantize.rtn import RTNQuantizer

    def interrupt(self, name, w, qtype):
        raise KeyboardInterrupt

    monkeypatch.setattr(RTNQuantizer, "quantize", interrupt)
    code, out = run_cli("convert", tiny_llama, "-o", tmp_path / "out")
    assert code == 130 and "interrupted" in out
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header-only"])
def test_corrupt_gguf_on_import_and_inspect(tiny_llama, tmp_path, damage):
    code, text = run_cli("convert", tiny_llama, "--type", "Q8_0", "-o", tmp_path / "a")
    assert code == 0, text
    data = (tmp_path / "a" / "model.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"garbage": b"GARBAGE!" * 100, "truncated": data[: len(data) // 2],
                     "header-only": data[:24]}[damage])
    assert_clean_error(*run_cli("import", bad, "-o", tmp_path / "hf"), "GGUF")
    assert not (tmp_path / "hf").exists()
    assert_clean_error(*run_cli("inspect", bad), "GGUF")


@pytest.mark.llamacpp
def test_corrupt_gguf_at_run_time(tiny_llama, tmp_path):
    code, text = run_cli("convert", tiny_llama, "--type", "Q8_0", "-o", tmp_path / "a")
    assert code == 0, text
    model = tmp_path / "a" / "model.gguf"
    model.write_bytes(model.read_bytes()[:-5000])
    assert_clean_error(*run_cli("run", tmp_path / "a", "-p", "hi", "-t", "1"), "model.gguf")  # -t 1: no busy-CPU note
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 100)
    assert_clean_error(*run_cli("run", empty, "-p", "hi", "-t", "1"), "empty.gguf")


def test_unsupported_gguf_architecture_on_import(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "gpt2")
    w.add_block_count(1)
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(*run_cli("import", tmp_path / "m.gguf", "-o", tmp_path / "hf"), "'gpt2'", "llama")


def test_eval_text_missing_or_too_short(tiny_llama, tmp_path):
    assert_clean_error(*run_cli("eval", tiny_llama, "--text", tmp_path / "none.txt"), "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert_clean_error(*run_cli("eval", tiny_llama, "--text", short, "--ctx", "64"), "fewer than one chunk")


def test_artifact_with_broken_manifest(tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    (d / "edgekit.json").write_text("{not json")
    assert_clean_error(*run_cli("inspect", d), "not valid JSON")


def test_killed_writer_leaves_nothing_and_is_swept(tmp_path):
    """A conversion killed with SIGTERM, or whose terminal closed (SIGHUP), removes its temporary folder; one
    left by a SIGKILLed writer (its pid gone) is swept by the next write of the same output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from edgekit.fsutil import atomic_dir

    dest = tmp_path / "out"
    code = ("import time, sys\nfrom pathlib import Path\nfrom edgekit.fsutil import atomic_dir\n"
            f"with atomic_dir(Path({str(dest)!r})) as t:\n    (t / 'x').write_text('1')\n    print('ready', flush=True)\n"
            "    time.sleep(60)\n")
    # the CLI's handlers turn SIGTERM (kill) and SIGHUP (the terminal closed) into an exit that unwinds atomic_dir
    # a terminal's session, whatever this test runs under (a nohup'd CI run ignores SIGHUP, and children inherit it)
    unwinding = f"from edgekit.cli.process import unwind_on_signals\nunwind_on_signals()\n{code}"
    wrapper = f"import signal\nsignal.signal(signal.SIGHUP, signal.SIG_DFL)\n{unwinding}"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        p = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(sig)
        assert p.wait(30) == 128 + sig
        assert list(tmp_path.iterdir()) == []
    # under nohup (SIGHUP ignored) the hangup is ignored as the user asked
    nohup = f"import signal\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n{unwinding}"
    p = subprocess.Popen([sys.executable, "-c", nohup], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert p.poll() is None
    p.terminate()
    assert p.wait(30) == 143 and list(tmp_path.iterdir()) == []
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait(30)
    assert [x.name.split("-")[0] for x in tmp_path.iterdir()] == [".out.partial"]
    time.sleep(0.1)
    with atomic_dir(dest) as t:
        (t / "y").write_text("2")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
    assert os.listdir(dest) == ["y"]


def test_a_folder_where_a_file_goes_is_called_a_folder(tiny_llama, tmp_path):
    (tmp_path / "d.gguf").mkdir()
    code, out = run_cli("import", tmp_path / "d.gguf", "-o", tmp_path / "o")
    assert_clean_error(code, out, "d.gguf is a folder; give a .gguf file")
    code, out = run_cli("eval", tiny_llama, "--text", tmp_path, "--no-record")
    assert_clean_error(code, out, "is a folder; give a plain-text file with --text")

