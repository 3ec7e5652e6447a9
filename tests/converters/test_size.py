"""Size-first targets: ``--size`` for every format with a budget, ``--fit DEVICE``, and the ``--bits`` warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.errors import InputError

CALIB = ("--calib-samples", "2", "--calib-seqlen", "32")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], terminal_width=300)


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "edgekit.json")


@pytest.fixture(scope="module")
def gguf_sizes(tiny_llama, tmp_path_factory) -> dict[str, int]:
    root = tmp_path_factory.mktemp("sizes")
    sizes = {}
    for t in ("Q4_0", "Q8_0"):
        assert cli("convert", tiny_llama, "--type", t, "-o", root / t).exit_code == 0
        sizes[t] = (root / t / "model.gguf").stat().st_size
    return sizes


def test_gguf_size_lands_under_the_budget_and_close_to_it(tiny_llama, gguf_sizes, tmp_path):
    target = (gguf_sizes["Q4_0"] + gguf_sizes["Q8_0"]) // 2
    r = cli("convert", tiny_llama, "--size", f"{target}B", *CALIB, "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    size = (tmp_path / "s" / "model.gguf").stat().st_size
    assert 0.9 * target <= size <= target, (size, target)
    m = json.loads((tmp_path / "s" / "edgekit.json").read_text())
    assert m["recipe"]["size"] == target and m["budget"]["size_target"] == target
    # what the file holds besides tensors was measured beforehand: the header and tensor table, exactly,
    # plus alignment padding (at most 31 bytes per tensor)
    padding = m["size_bytes"] - m["tensor_bytes"] - m["budget"]["metadata_bytes"]
    assert 0 <= padding < 32 * len(m["tensors"])


def test_a_size_below_the_smallest_file_says_so(tiny_llama, tmp_path):
    r = cli("convert", tiny_llama, "--size", "10kB", *CALIB, "-o", tmp_path / "s")
    assert r.exit_code != 0 and "--size 0.01MB is below the smallest file possible here" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "s").exists()


def test_onnx_size_counts_graph_and_data_together(tiny_llama, tmp_path):
    assert cli("convert", tiny_llama, "--to", "onnx", "--bits", "8", "-o", tmp_path / "q8").exit_code == 0
    assert cli("convert", tiny_llama, "--to", "onnx", "--bits", "4", "-o", tmp_path / "q4").exit_code == 0
    target = (files_bytes(tmp_path / "q8") + files_bytes(tmp_path / "q4")) // 2
    r = cli("convert", tiny_llama, "--to", "onnx", "--size", f"{target}B", *CALIB, "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "s" / "edgekit.json").read_text())
    assert m["size_bytes"] <= target and m["budget"]["size_target"] == target
    assert len(set(m["budget"]["grids"].values())) > 1  # a real mix, not one grid


def test_formats_without_a_budget_refuse_size(tiny_llama, tmp_path):
    r = cli("convert", tiny_llama, "--to", "coreml", "--size", "1MB", "-o", tmp_path / "c")
    assert r.exit_code != 0 and "--size" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("text, value", [("90MB", 90_000_000), ("1.5GB", 1_500_000_000), ("512MiB", 512 << 20),
                                         ("1000", 1000), ("20kb", 20_000)])
def test_sizes_parse(text, value):
    from edgekit.runtime.sizing import parse_file_size

    assert parse_file_size(text) == value


@pytest.mark.parametrize("text", ["90 apples", "", "-5MB", "0MB"])
def test_bad_sizes_are_refused(text):
    from edgekit.runtime.sizing import parse_file_size

    with pytest.raises(InputError):
        parse_file_size(text)


class _Device:
    """A device that reports what the test says (the host platform's real info otherwise)."""

    def __init__(self, ram: int, storage: int | None) -> None:
        from edgekit.devices.base import DeviceInfo

        self._info = DeviceInfo(id="android:TEST", platform="android", name="test", ram_total=ram * 2,
                                ram_available=ram, storage_free=storage)

    def info(self):
        return self._info

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_fit_inverts_the_memory_model(tiny_llama):
    from edgekit.devices.base import DeviceInfo
    from edgekit.model import HFCheckpoint
    from edgekit.runtime.memory import MemoryConfig, estimate_memory
    from edgekit.runtime.sizing import fit_size

    ck = HFCheckpoint.open(tiny_llama)
    info = DeviceInfo(id="x", platform="ssh", name="x", ram_available=200 << 20, storage_free=1 << 40)
    t = fit_size(ck.hparams, 10 ** 9, "gguf", info, 2048)
    assert t.limited_by == "RAM" and t.size == t.weight_room
    # what is left for weights plus what the memory model adds at ctx 2048 is exactly the RAM
    assert t.weight_room + sum(t.parts.values()) == 200 << 20
    assert t.parts["kv_cpu"] == 2 * 2 * 2048 * 2 * 64 * 2  # K+V, layers, ctx, KV heads x head size, f16
    # the same parts estimate_memory counts beside the weights for a real file
    est = estimate_memory(__import__("edgekit.runtime.memory", fromlist=["x"]).ModelShape(
        "llama", 2, 256, 4, 2, 64, 64, 512, ck.hparams.n_vocab, 2048, ()), MemoryConfig(n_ctx=2048),
        baseline_bytes=t.parts["baseline"])
    assert est.ram_bytes == sum(t.parts.values())
    small_disk = DeviceInfo(id="x", platform="ssh", name="x", ram_available=200 << 20, storage_free=10 << 20)
    t = fit_size(ck.hparams, 10 ** 9, "gguf", small_disk, 2048)
    assert t.limited_by == "storage" and t.size == int(0.9 * (10 << 20))
    with pytest.raises(InputError, match="lower --ctx"):
        fit_size(ck.hparams, 10 ** 9, "gguf", DeviceInfo(id="x", platform="ssh", name="x", ram_available=50 << 20),
                 1 << 20)


def test_convert_fit_sizes_for_the_device_and_checks_the_result(tiny_llama, gguf_sizes, tmp_path, monkeypatch):
    from edgekit.model import HFCheckpoint
    from edgekit.runtime.llamacpp import LlamaCppBackend

    ck = HFCheckpoint.open(tiny_llama)
    # a device whose RAM leaves room for weights between the Q4_0 and the Q8_0 file, at ctx 256
    room_wanted = (gguf_sizes["Q4_0"] + gguf_sizes["Q8_0"]) // 2
    _, parts = LlamaCppBackend.weight_room(ck.hparams, 256, 1 << 30)
    ram = room_wanted + sum(parts.values())
    monkeypatch.setattr("edgekit.devices.open_device", lambda device_id: _Device(ram, 1 << 40))
    r = cli("convert", tiny_llama, "--fit", "android:TEST", "--ctx", "256", *CALIB, "-o", tmp_path / "f")
    assert r.exit_code == 0, r.output
    assert "android:TEST" in r.stderr and f"--size {room_wanted / 1e6:.4g}MB" in r.stderr  # under 10 MB: 4 digits
    assert "fits:" in r.stderr and "at context 256" in r.stderr
    size = (tmp_path / "f" / "model.gguf").stat().st_size
    assert gguf_sizes["Q4_0"] < size <= room_wanted


def test_fit_below_the_smallest_file_says_to_lower_the_context(tiny_llama, tmp_path, monkeypatch):
    from edgekit.model import HFCheckpoint
    from edgekit.runtime.llamacpp import LlamaCppBackend

    _, parts = LlamaCppBackend.weight_room(HFCheckpoint.open(tiny_llama).hparams, 256, 1 << 30)
    monkeypatch.setattr("edgekit.devices.open_device", lambda device_id: _Device(sum(parts.values()) + 50_000,
                                                                                 1 << 40))
    r = cli("convert", tiny_llama, "--fit", "android:TEST", "--ctx", "256", *CALIB, "-o", tmp_path / "f")
    assert r.exit_code != 0 and "android:TEST leaves 0 MB for weights at context 256" in r.output
    assert "lower --ctx" in r.output and "--size" not in r.stderr.split("error:")[-1]
    assert not (tmp_path / "f").exists()


def test_bits_far_from_its_bpw_warns_with_the_option_that_holds_it(tiny_models, tmp_path):
    """Rows of 96 weights hold no 256-weight K-quant block: --bits 2's Q2_K mix falls back to wide types."""
    r = cli("convert", tiny_models["MistralForCausalLM"], "--bits", "2", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "edgekit.json").read_text())
    assert m["bpw"] > 3.5
    assert "warning: --bits 2 gave" in r.stderr and len(_advice(r.stderr)) == 2
    for i, opt in enumerate(_advice(r.stderr)):  # what it advises runs
        assert cli("convert", tiny_models["MistralForCausalLM"], *opt, *CALIB, "-o", tmp_path / f"a{i}").exit_code == 0
    r = cli("convert", tiny_models["LlamaForCausalLM"], "--bits", "4", "-o", tmp_path / "k")
    assert r.exit_code == 0 and "warning" not in r.stderr  # rows of 256: Q4_K_M is near 4 bits


@pytest.fixture(scope="module")
def odd_rows(tmp_path_factory) -> dict[str, Path]:
    """Rows no K-quant holds: ``some`` (hidden 96: 32-wide types fit; ffn 200: nothing fits ffn_down) and
    ``none`` (hidden 200, ffn 344: no quantized type fits any row)."""
    from tests.helpers import build_tiny_model

    root = tmp_path_factory.mktemp("odd")
    return {"some": build_tiny_model(root / "some", "LlamaForCausalLM", hidden=96, ffn=200, heads=3, kv_heads=3),
            "none": build_tiny_model(root / "none", "LlamaForCausalLM", hidden=200, ffn=344)}


def _advice(stderr: str) -> list[list[str]]:
    import re

    bits = next((w for w in stderr.split("warning:") if "--bits" in w or "--type" in w), "")  # not the tokenizer's
    return [opt.split() for opt in re.findall(r"--bpw [\d.]+|--size [\d.]+MB", bits)]


@pytest.mark.parametrize("flag", [("--bits", "4"), ("--type", "Q4_0")])
def test_the_budget_the_bits_warning_advises_runs_and_is_smaller(odd_rows, tmp_path, flag):
    """ffn_down's rows of 200 hold no quantized type: --bits and --type write them F16, and so does the
    budget, so the --bpw and --size the warning names run and give a smaller file than the one warned of."""
    r = cli("convert", odd_rows["some"], *flag, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "p" / "edgekit.json").read_text())
    advice = _advice(r.stderr)
    assert f"warning: {' '.join(flag)} gave" in r.stderr and len(advice) == 2, r.stderr
    for i, opt in enumerate(advice):
        r = cli("convert", odd_rows["some"], *opt, *CALIB, "-o", tmp_path / f"b{i}")
        assert r.exit_code == 0, (opt, r.output)
        m = json.loads((tmp_path / f"b{i}" / "edgekit.json").read_text())
        assert m["size_bytes"] < written["size_bytes"] and m["bpw"] < written["bpw"]
        assert m["tensors"]["blk.0.ffn_down.weight"]["type"] == "F16"
        assert m["tensors"]["blk.0.ffn_down.weight"]["wanted"]  # the fallback still says why


def test_bits_on_rows_no_type_holds_advises_no_budget(odd_rows, tmp_path):
    r = cli("convert", odd_rows["none"], "--bits", "4", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "no --bpw or --size makes a smaller file: rows of 200, 344 weights hold no quantized type" in r.stderr
    assert not _advice(r.stderr)
    written = (tmp_path / "p" / "model.gguf").stat().st_size
    # the budget places what --bits placed: every tensor F16
    r = cli("convert", odd_rows["none"], "--size", f"{written + 100_000}B", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "model.gguf").stat().st_size == written
    r = cli("convert", odd_rows["none"], "--bpw", "16", "-o", tmp_path / "b")
    assert r.exit_code != 0 and "--bpw stops at 16: give --size instead" in r.output


def test_more_types_are_asked_for_only_when_bpw_types_named_them(odd_rows, tmp_path):
    r = cli("convert", odd_rows["some"], "--bpw", "2", "-o", tmp_path / "a")
    assert r.exit_code != 0 and "is below the smallest file possible here" in r.output
    assert "raise it" in r.output and "types" not in r.output
    r = cli("convert", odd_rows["some"], "--bpw", "2", "--bpw-types", "q4_0,q8_0", "-o", tmp_path / "b")
    assert r.exit_code != 0 and "raise it or allow more types in --bpw-types" in r.output
    r = cli("convert", odd_rows["some"], "--bpw", "8", "--bpw-types", "q4_k", "-o", tmp_path / "c")
    assert r.exit_code != 0 and "none of the allowed types fits blk.0.attn_k.weight (rows of 96)" in r.output
    assert "allow more types in --bpw-types" in r.output


def test_fit_says_a_size_under_a_megabyte_as_it_is():
    """A tiny model's --fit said "-> --size 0MB" (whole MB) while its label said 0.1386mb."""
    from edgekit.runtime.sizing import FitTarget

    t = FitTarget(device="host", size=138_600, n_ctx=256, ram_bytes=1 << 30, ram_kind="available",
                  weight_room=1 << 29, storage_free=None, limited_by="the model")
    assert "-> --size 0.1386MB (limited by the model)" in t.describe()
    big = FitTarget(device="host", size=812_400_000, n_ctx=256, ram_bytes=1 << 30, ram_kind="available",
                    weight_room=1 << 29, storage_free=None, limited_by="RAM")
    assert "-> --size 812MB" in big.describe()
