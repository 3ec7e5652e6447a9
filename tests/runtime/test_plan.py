"""The offload planner on synthetic budgets (70B-like dense and MoE shapes), tensor overrides reaching
llama.cpp, and the `plan` / `run --offload auto` commands on this CPU-only host."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from edgekit.errors import InputError
from edgekit.runtime.memory import ModelShape, TensorInfo
from edgekit.runtime.plan import Bandwidths, Budget, parse_size, plan_offload

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
GiB = 1 << 30
Q4K = 144 / 256  # bytes per weight


def _shape(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256, n_expert=0, n_used=0):
    tensors = [TensorInfo("token_embd.weight", "Q4_K", n_embd * vocab, int(n_embd * vocab * Q4K), vocab, None),
               TensorInfo("output.weight", "Q6_K", n_embd * vocab, int(n_embd * vocab * 210 / 256), vocab, None)]
    kv = n_embd // n_head * n_head_kv
    for i in range(n_layer):
        for name, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", kv, n_embd), ("attn_v", kv, n_embd),
                                 ("attn_output", n_embd, n_embd)):
            tensors.append(TensorInfo(f"blk.{i}.{name}.weight", "Q4_K", rows * cols, int(rows * cols * Q4K), rows, i))
        suffix, mult = ("_exps", n_expert) if n_expert else ("", 1)
        for name in ("ffn_up", "ffn_gate", "ffn_down"):
            n = n_ff * n_embd * mult
            tensors.append(TensorInfo(f"blk.{i}.{name}{suffix}.weight", "Q4_K", n, int(n * Q4K), n_ff, i))
    return ModelShape("llama", n_layer, n_embd, n_head, n_head_kv, n_embd // n_head, n_embd // n_head, n_ff, vocab,
                      8192, tuple(tensors), n_expert=n_expert, n_expert_used=n_used)


BW = Bandwidths(cpu_Bps=60e9, gpu_Bps=400e9)


def test_parse_size():
    assert parse_size("6GiB") == 6 * GiB == parse_size("6G") == parse_size("6 gb")
    assert parse_size("512MB") == 512 << 20 and parse_size("1.5T") == int(1.5 * (1 << 40)) and parse_size(42) == 42
    with pytest.raises(InputError):
        parse_size("lots")


def test_70b_split_within_small_vram():
    shape = _shape()
    plan = plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=6 * GiB), 8192, BW)
    cpu = plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=6 * GiB), 8192, BW, gpu_available=False)
    assert plan.device == "split" and 0 < plan.n_gpu_layers < shape.n_layer
    assert plan.memory.vram_bytes <= 6 * GiB and plan.memory.ram_required_bytes <= 64 * GiB
    assert plan.predicted_tps > cpu.predicted_tps and cpu.n_gpu_layers == 0
    # No fitting candidate is predicted faster than the chosen one.
    assert all(c["predicted_tps"] <= round(plan.predicted_tps, 2) for c in plan.candidates if c["fits"])
    # More VRAM never gives a slower plan, and enough VRAM puts everything on the GPU.
    bigger = plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=24 * GiB), 8192, BW)
    assert bigger.n_gpu_layers > plan.n_gpu_layers and bigger.predicted_tps > plan.predicted_tps
    allin = plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=80 * GiB), 8192, BW)
    assert allin.device == "gpu" and allin.n_gpu_layers == shape.n_layer + 1 and allin.offload_kqv
    assert allin.backend_options()["n_gpu_layers"] == shape.n_layer + 1


def test_70b_does_not_fit_32gib_ram_and_6gib_vram():
    with pytest.raises(InputError, match="nothing fits"):
        plan_offload(_shape(), Budget(ram_bytes=32 * GiB, vram_bytes=6 * GiB), 8192, BW)


def test_a_vram_budget_below_the_gpu_compute_buffer_says_so():
    # A GPU build allocates its compute buffer even at -ngl 0; when only that is short, the refusal says so and
    # names --vram 0 (a CPU-only build's plan), which then fits.
    shape = _shape(n_layer=4, n_embd=1024, n_ff=4096, n_head=16, n_head_kv=4, vocab=32000)
    with pytest.raises(InputError, match=r"even at -ngl 0 .* give --vram 0") as exc:
        plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=1 << 20), 4096, BW)
    assert "smaller quantization" not in str(exc.value)
    assert plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=0), 4096, BW).device == "cpu"
    with pytest.raises(InputError, match="this model needs at least"):  # RAM short too: the general refusal
        plan_offload(shape, Budget(ram_bytes=1 << 20, vram_bytes=1 << 20), 4096, BW)


def test_cpu_only_host_says_why():
    plan = plan_offload(_shape(n_layer=8), Budget(ram_bytes=64 * GiB, vram_bytes=6 * GiB), 4096, BW, gpu_available=False)
    assert plan.device == "cpu" and plan.n_gpu_layers == 0 and "no GPU" in plan.reason
    assert plan.backend_options() == {"n_gpu_layers": 0, "n_ctx": 4096}


def test_moe_keeps_experts_on_cpu():
    shape = _shape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, vocab=32000, n_expert=8, n_used=2)
    plan = plan_offload(shape, Budget(ram_bytes=128 * GiB, vram_bytes=8 * GiB), 4096, BW)
    assert plan.tensor_overrides and all(b == "CPU" and "_exps" in p for p, b in plan.tensor_overrides)
    assert plan.n_gpu_layers == shape.n_layer + 1 and plan.memory.vram_bytes <= 8 * GiB
    layers_only = max(c["predicted_tps"] for c in plan.candidates if c["fits"] and "-ngl" in c["label"]
                      and "CPU" not in c["label"])
    assert plan.predicted_tps > layers_only


def test_kv_cache_type_changes_what_fits():
    shape = _shape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, vocab=32000)
    f16 = plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=6 * GiB), 32768, BW)
    q8 = plan_offload(shape, Budget(ram_bytes=64 * GiB, vram_bytes=6 * GiB), 32768, BW, type_k="q8_0", type_v="q8_0")
    assert q8.memory.parts["kv_cpu"] + q8.memory.parts["kv_gpu"] < f16.memory.parts["kv_cpu"] + f16.memory.parts["kv_gpu"]
    assert q8.predicted_tps >= f16.predicted_tps


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    from edgekit import api

    out = tmp_path_factory.mktemp("plan") / "tiny-f16"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="F16")).path


@needs_llama
def test_tensor_overrides_reach_llama_cpp(tiny_gguf, capfd):
    from edgekit.artifact import Artifact
    from edgekit.runtime.llamacpp import LlamaCppBackend

    model = Artifact.open(tiny_gguf).model_file
    with LlamaCppBackend(model, n_ctx=256, tensor_overrides=[(r"ffn_.*", "CPU")], verbose=True) as b:
        assert b.info["tensor_overrides"] == [["ffn_.*", "CPU"]]
        b.reset()
        b.decode(b.tokenize("hello there"))
    # llama.cpp logs each override it applies
    assert "blk.0.ffn_up.weight (0 MiB f16) buffer type overridden to CPU" in capfd.readouterr().err
    with pytest.raises(InputError, match="unknown buffer type"):
        LlamaCppBackend(model, n_ctx=256, tensor_overrides=[(r"ffn_.*", "NOPE0")])


@needs_llama
def test_plan_and_run_offload_auto_cli(tiny_gguf, tmp_path, monkeypatch):
    from edgekit.cli.main import app

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(tiny_gguf), "--ctx", "1024", "--ram", "4GiB", "--json",
                              "--cpu-bandwidth", "20"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["device"] == "cpu" and data["fits"] and data["memory"]["ram_bytes"] > data["memory"]["parts"]["baseline"]
    res = runner.invoke(app, ["plan", str(tiny_gguf), "--ram", "1MB", "--cpu-bandwidth", "20"])
    assert res.exit_code == 2 and "nothing fits" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["run", str(tiny_gguf), "-p", "hi", "-n", "4", "--offload", "auto", "--temp", "0"])
    assert res.exit_code == 0, res.output
    assert "offload: CPU only: no GPU device in this llama.cpp build" in res.stderr


def test_draft_ram_comes_out_of_the_budget():
    """A draft loads on the CPU beside the target: a RAM budget the target fits alone refuses the pair, and
    the refusal counts the draft in what is needed."""
    from edgekit.runtime.plan import DraftMemory

    shape = _shape(n_layer=16, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, vocab=32000)
    alone = plan_offload(shape, Budget(ram_bytes=8 * GiB), 4096, BW, gpu_available=False)
    need = alone.memory.ram_required_bytes
    draft = DraftMemory("d.gguf", ram_bytes=GiB + 100, parts={"weights_cpu": GiB, "weights_repacked": 100})
    assert draft.required_bytes == GiB
    with pytest.raises(InputError, match=r"this model and its draft \(1.00 GiB RAM\) need at least"):
        plan_offload(shape, Budget(ram_bytes=need + GiB // 2), 4096, BW, gpu_available=False, draft=draft)
    both = plan_offload(shape, Budget(ram_bytes=need + GiB + 1), 4096, BW, gpu_available=False, draft=draft)
    assert both.draft is draft and "of the RAM is the draft's" in both.reason
    data = both.to_json()
    assert data["ram_total_bytes"] == both.memory.ram_bytes + draft.ram_bytes and data["draft"]["path"] == "d.gguf"
    with pytest.raises(InputError, match="the draft alone needs"):
        plan_offload(shape, Budget(ram_bytes=GiB // 2), 4096, BW, gpu_available=False, draft=draft)
    # with a GPU the draft takes no VRAM: the target's placement is planned within the RAM that is left
    gpu = plan_offload(shape, Budget(ram_bytes=need + GiB + 1, vram_bytes=8 * GiB), 4096, BW, draft=draft)
    assert gpu.memory.ram_required_bytes + draft.required_bytes <= need + GiB + 1


@needs_llama
def test_plan_counts_draft_and_kv_window_cli(tiny_gguf, tmp_path, monkeypatch):
    """``plan --draft D --kv-window W``: the draft's weights, KV and buffers at the window's length, as the
    worker loads it (a second llama.cpp context beside the target's); a draft of another format is refused."""
    from edgekit.cli.main import app
    from edgekit.runtime.memory import MemoryConfig, estimate_memory, read_shape

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    base = ["plan", str(tiny_gguf), "--ram", "4GiB", "--json", "--cpu-bandwidth", "20"]
    plain = json.loads(runner.invoke(app, base + ["--ctx", "1024"]).stdout)
    res = runner.invoke(app, base + ["--ctx", "1024", "--draft", str(tiny_gguf), "--kv-window", "256"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["n_ctx"] == 256 and data["memory"]["parts"]["kv_cpu"] == plain["memory"]["parts"]["kv_cpu"] // 4
    draft = data["draft"]
    shape = read_shape(next(tiny_gguf.glob("*.gguf")))
    own = estimate_memory(shape, MemoryConfig(n_ctx=256))
    assert draft["ram_bytes"] == own.ram_bytes and draft["parts"]["kv_cpu"] == own.parts["kv_cpu"]
    assert "baseline" not in draft["parts"]  # one process: the target counts it
    assert data["ram_total_bytes"] == data["memory"]["ram_bytes"] + draft["ram_bytes"]
    res = runner.invoke(app, ["plan", str(tiny_gguf), "--draft", str(tiny_gguf), "--kv-window", "256",
                              "--cpu-bandwidth", "20"])
    assert res.exit_code == 0 and "a KV window of 256" in res.stdout and "draft" in res.stdout, res.output
    # the run it suggests is the one planned: budget, context, window and draft (run's defaults differ)
    said = " ".join(res.stdout.split())
    assert f"--offload auto --vram 0 -c 4096 --kv-window 256 --draft {tiny_gguf}" in said, res.stdout
    for args, msg in ((["--draft", str(tmp_path / "nope")], "not found"),
                      (["--kv-window", "16"], "at least 64 tokens")):
        res = runner.invoke(app, ["plan", str(tiny_gguf), "--cpu-bandwidth", "20", *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["run", str(tiny_gguf), "-p", "hi", "-n", "4", "--offload", "auto", "--temp", "0",
                              "--draft", str(tiny_gguf)])
    assert res.exit_code == 0, res.output
    assert "of the RAM is the draft's" in res.stderr


@needs_llama
def test_offload_options_takes_a_path_as_plan_does(tiny_gguf):
    """QA s54: a str path reached ``art.format`` (str.format) and failed as "no runtime for <built-in method>"."""
    from edgekit.artifact import Artifact
    from edgekit.runtime.plan import offload_options

    by_artifact = offload_options(Artifact.open(tiny_gguf), "auto", 512, vram_bytes=0)
    assert offload_options(str(tiny_gguf), "auto", 512, vram_bytes=0) == by_artifact
    assert offload_options(tiny_gguf, "auto", 512, vram_bytes=0) == by_artifact
    with pytest.raises(InputError):
        offload_options(str(tiny_gguf) + "-missing", "auto", 512)


@needs_llama
def test_plan_refuses_a_window_past_the_trained_context_as_run_does(tiny_gguf):
    """QA s54: run and serve refuse --kv-window past the positions a GGUF was trained for; plan planned it."""
    from edgekit.api import plan
    from edgekit.artifact import Artifact
    from edgekit.runtime.memory import read_shape

    trained = read_shape(Artifact.open(tiny_gguf).model_file).n_ctx_train
    with pytest.raises(InputError, match=f"longer than the {trained} positions"):
        plan(tiny_gguf, kv_window=trained * 2, ram_bytes=8 << 30)
    plan(tiny_gguf, kv_window=trained, ram_bytes=8 << 30)
