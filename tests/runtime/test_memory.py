"""The memory model: exact parts against the GGUF and llama.cpp, and predicted peak against measured RSS."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edgekit.errors import InputError
from edgekit.runtime.memory import MemoryConfig, decode_bytes_per_token, estimate_memory, read_shape

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")


@pytest.fixture(scope="module")
def tiny_q8(tiny_llama, tmp_path_factory) -> Path:
    from edgekit import api

    out = tmp_path_factory.mktemp("mem") / "tiny-q8"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=None, preset="Q8_0")).model_file


def test_shape_from_header(tiny_q8):
    from edgekit.artifact import Artifact
    from edgekit.describe import describe

    shape = read_shape(tiny_q8)
    info = describe(Artifact.open(tiny_q8), ctx=1024)
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv, shape.n_ff) == (2, 256, 4, 2, 512)
    assert shape.weight_bytes == info["weight_bytes"] and shape.n_vocab == info["hparams"]["vocab_size"]
    est = estimate_memory(shape, MemoryConfig(n_ctx=1024))
    assert est.parts["kv_cpu"] == info["memory"]["kv_cache_f16"]  # the same f16 KV arithmetic as inspect
    assert est.parts["weights_cpu"] == shape.weight_bytes and est.vram_bytes == 0


def test_parts_respond_to_config(tiny_q8):
    shape = read_shape(tiny_q8)
    base = estimate_memory(shape, MemoryConfig(n_ctx=4096))
    q8 = estimate_memory(shape, MemoryConfig(n_ctx=4096, type_k="q8_0", type_v="q8_0"))
    assert q8.parts["kv_cpu"] == pytest.approx(base.parts["kv_cpu"] * 34 / 64, rel=1e-6)
    fa = estimate_memory(shape, MemoryConfig(n_ctx=4096, flash_attn=True))
    assert fa.parts["compute_cpu"] < base.parts["compute_cpu"]
    assert estimate_memory(shape, MemoryConfig(n_ctx=8192)).parts["kv_cpu"] == 2 * base.parts["kv_cpu"]
    gpu = estimate_memory(shape, MemoryConfig(n_ctx=4096, n_gpu_layers=99))
    assert gpu.parts["kv_gpu"] == base.parts["kv_cpu"] and gpu.parts["kv_cpu"] == 0
    embd = sum(t.n_bytes for t in shape.tensors if t.name.startswith("token_embd"))
    assert gpu.parts["weights_cpu"] == embd  # the input embedding stays on the CPU
    kept = estimate_memory(shape, MemoryConfig(n_ctx=4096, n_gpu_layers=99, tensor_overrides=((r"ffn_", "CPU"),)))
    ffn = sum(t.n_bytes for t in shape.tensors if "ffn_" in t.name)
    assert kept.parts["weights_cpu"] == embd + ffn
    reads = decode_bytes_per_token(shape, depth=100)
    assert 0 < reads["cpu"] <= shape.weight_bytes + 2 * 100 * 2 * 2 * 64 * 2
    with pytest.raises(InputError):
        MemoryConfig(type_k="q3_x")
    with pytest.raises(InputError):
        MemoryConfig(tensor_overrides=(("(", "CPU"),))


def _measured_vs_predicted(path: Path, ctx: int) -> tuple[int, int]:
    from edgekit.runtime import hostinfo
    from edgekit.runtime.profile import ProfileConfig, TestSpec, profile

    run = profile([path], ProfileConfig(tests=(TestSpec(n_prompt=512, n_depth=ctx - 512),), reps=1, warmup=False,
                                        ctx=(ctx,), threads=(2,), energy=False, roofline=False))
    est = estimate_memory(read_shape(path), MemoryConfig(n_ctx=ctx), baseline_bytes=hostinfo.baseline_rss())
    return run.rows[0].peak_rss_bytes, est.ram_bytes


@needs_llama
@pytest.mark.parametrize("ctx", [512, 2048])
def test_predicted_peak_matches_measured_rss_tiny(tiny_q8, ctx):
    measured, predicted = _measured_vs_predicted(tiny_q8, ctx)
    assert predicted == pytest.approx(measured, rel=0.10)


@needs_llama
@pytest.mark.real
def test_predicted_peak_matches_measured_rss_real(real_gguf):
    measured, predicted = _measured_vs_predicted(real_gguf, 2048)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_ngl_offloads_the_output_layer_first():
    """llama.cpp's -ngl N offloads the last N of (blocks + output layer): the output layer and N - 1 blocks. The
    figures are those llama.cpp logged on an H200 (bench/results/sparse_ffn_gpu.json) for a 22-block model with a
    Q6_K output head: -ngl 14 put 386.09 MiB of weights and 13 blocks' KV cache on the GPU."""
    from edgekit.runtime.memory import ModelShape, TensorInfo, gpu_blocks

    MiB = 1 << 20
    block = int(23.64 * MiB)
    tensors = [TensorInfo("token_embd.weight", "Q4_0", 1, 54 * MiB, 49152, None),
               TensorInfo("output.weight", "Q6_K", 1, int(78.73 * MiB), 49152, None)]
    tensors += [TensorInfo(f"blk.{i}.ffn_up.weight", "Q4_0", 1, block, 5632, i) for i in range(22)]
    shape = ModelShape("llama", 22, 2048, 32, 4, 64, 64, 5632, 49152, 2048, tuple(tensors))
    kv_block = estimate_memory(shape, MemoryConfig(n_ctx=128)).parts["kv_cpu"] // 22
    for ngl, blocks in ((0, 0), (1, 0), (14, 13), (22, 21), (23, 22), (99, 22)):
        cfg = MemoryConfig(n_ctx=128, n_gpu_layers=ngl)
        est = estimate_memory(shape, cfg)
        assert gpu_blocks(shape, cfg) == blocks
        assert est.parts["weights_gpu"] == (blocks * block + int(78.73 * MiB) if ngl else 0)
        assert est.parts["kv_gpu"] == blocks * kv_block and est.parts["kv_cpu"] == (22 - blocks) * kv_block
    assert estimate_memory(shape, MemoryConfig(n_ctx=128, n_gpu_layers=14)).parts["weights_gpu"] / MiB \
        == pytest.approx(386.09, abs=0.05)
    # A tied output head is a second copy of the embedding on the GPU; -ngl 0 on a GPU host still takes a
    # compute buffer there (op offload).
    tied = ModelShape("llama", 22, 2048, 32, 4, 64, 64, 5632, 49152, 2048, (tensors[0], *tensors[2:]))
    assert tied.output_tied
    assert estimate_memory(tied, MemoryConfig(n_ctx=128, n_gpu_layers=1)).parts["weights_gpu"] == 54 * MiB
    assert estimate_memory(shape, MemoryConfig(n_ctx=128)).vram_bytes == 0
    assert estimate_memory(shape, MemoryConfig(n_ctx=128, gpu_present=True)).vram_bytes > 78 * MiB


# llama.cpp's logged "CPU compute buffer size" in MiB (sched_reserve, llama-cpp-python 0.3.36, x86-64, verbose
# load of Llama(n_ctx, n_batch=n_ubatch=b), flash attention off unless said), for the QA report's tiny Llama
# (build_tiny_model hidden 256, ffn 512, 2 layers, BPE: 4 heads, 2 KV heads, 384 tokens; GGUF Q4_K_M) and
# SmolLM2-135M-Instruct Q4_1 (30 layers, 576 wide, 9 heads, 3 KV heads, ffn 1536, 49152 tokens). Keys: (ctx, b, fa).
_TINY = ("llama", 2, 256, 4, 2, 64, 64, 512, 384, 1024)
_SMOL = ("llama", 30, 576, 9, 3, 64, 64, 1536, 49152, 8192)
LOGGED_COMPUTE_MIB = {
    _TINY: {(512, 512, False): 8.01, (1000, 512, False): 13.01, (1024, 256, False): 6.50, (1024, 128, False): 3.25,
            (1024, 2048, False): 26.02, (2048, 512, False): 23.01, (4096, 512, False): 43.01,
            (4096, 2048, False): 172.04, (8192, 512, False): 83.01, (16384, 512, False): 163.01,
            (1024, 512, True): 5.01, (4096, 512, True): 8.01, (16384, 512, True): 20.01},
    _SMOL: {(512, 512, False): 98.25, (1024, 512, False): 98.25, (1024, 128, False): 24.56,
            (1024, 2048, False): 196.50, (2048, 512, False): 99.38, (4096, 512, False): 99.38,
            (4096, 2048, False): 397.51, (8192, 512, False): 166.38, (16384, 512, False): 326.38,
            (16384, 512, True): 98.25},
}


def test_compute_buffer_is_sized_as_llamacpp_logs():
    """The compute buffer is the larger of the attention phase (KQ + mask: 4 (n_head + 1) bytes a cell and token,
    the slope of the tiny model's log from 512 to 16384 cells) and the output phase (every row's logits: the
    SmolLM2 log up to ctx 4096); the ubatch is min(n_ubatch, n_batch, n_ctx) (ctx 1024, batch 2048: 1024)."""
    from edgekit.runtime.memory import ModelShape, compute_bytes, work_bytes

    for hp, logged in LOGGED_COMPUTE_MIB.items():
        shape = ModelShape(*hp, tensors=())
        for (ctx, b, fa), mib in logged.items():
            got = compute_bytes(shape, MemoryConfig(n_ctx=ctx, n_batch=b, n_ubatch=b, flash_attn=fa)) / 2**20
            assert got == pytest.approx(mib, rel=0.015), (hp[1], ctx, b, fa, got, mib)
    tiny = ModelShape(*_TINY, tensors=())
    # resident when a batch computes one row of logits: the attention phase only (SmolLM2 at 1024: 26.38 MiB)
    smol = ModelShape(*_SMOL, tensors=())
    assert compute_bytes(smol, MemoryConfig(n_ctx=1024), n_outputs=1) / 2**20 == pytest.approx(26.38, abs=0.01)
    # the work buffer: KQ as f16 for KQ x V; the tiny model at 16384 peaked 67 MB above the logged buffers + overhead
    assert work_bytes(tiny, MemoryConfig(n_ctx=16384)) == 4 * 16384 * 512 * 2
    assert work_bytes(tiny, MemoryConfig(n_ctx=16384, flash_attn=True)) < 1 << 20


# measured peak RSS (MB) of `edgekit profile ppN --ctx N -t 1` (the worker's VmHWM), with the worker's baseline
# then 44.74 MB: the totals estimate_memory must come within a few % of, and never more than 3% under
MEASURED_PEAK_MB = {
    _TINY: {512: 65.29, 1024: 74.25, 4096: 121.60, 16384: 312.12},
    _SMOL: {512: 198.46, 1024: 226.59, 2048: 280.50, 4096: 388.32, 8192: 605.11, 16384: 1039.01},
}


def test_predicted_peak_against_measured_peaks():
    from edgekit.runtime.memory import ModelShape, TensorInfo

    weights = {_TINY: (846848, 571392), _SMOL: (96576768, 0)}  # bytes mapped, bytes repacked (CPU_REPACK)
    for hp, peaks in MEASURED_PEAK_MB.items():
        mapped, repacked = weights[hp]
        tensors = [TensorInfo("blk.0.ffn_up.weight", "Q4_K", 1, repacked, 512, 0)] if repacked else []
        tensors.append(TensorInfo("token_embd.weight", "Q8_0", 1, mapped - repacked, hp[8], None))
        shape = ModelShape(*hp, tensors=tuple(tensors))
        for ctx, mb in peaks.items():
            predicted = estimate_memory(shape, MemoryConfig(n_ctx=ctx), baseline_bytes=44744704).ram_bytes / 1e6
            assert -0.03 <= predicted / mb - 1 <= 0.04, (hp[1], ctx, predicted, mb)


_LOG_PROBE = """
import sys, llama_cpp
llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=512, verbose=True, n_threads=1)
"""


@needs_llama
def test_compute_buffer_matches_llamacpp_log(tiny_q8):
    import re
    import subprocess
    import sys

    from edgekit.runtime.memory import compute_bytes

    shape = read_shape(tiny_q8)
    for ctx in (1024, 4096):
        out = subprocess.run([sys.executable, "-c", _LOG_PROBE, str(tiny_q8), str(ctx)], capture_output=True,
                             text=True, timeout=120)
        found = re.findall(r"CPU compute buffer size\s*=\s*([\d.]+) MiB", out.stdout + out.stderr)
        assert found, (out.stdout + out.stderr)[-2000:]
        assert compute_bytes(shape, MemoryConfig(n_ctx=ctx)) / 2**20 == pytest.approx(float(found[-1]), rel=0.05)


def test_onnx_plan_counts_the_cli_process(tiny_llama, tmp_path):
    """The ONNX plan's baseline is the edgekit CLI before it creates a session, not a bare Python with
    onnxruntime (44.4 MiB): with the latter a tiny 4-bit graph's plan at ctx 1024 said 100.1 MB where
    `edgekit run` peaked at 117.4 MB. Measured here: the peak RSS of `edgekit run` against the plan."""
    import subprocess
    import sys

    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe
    from edgekit.runtime.memory_onnx import estimate_onnx_memory

    art = api.convert(tiny_llama, "onnx", output=tmp_path / "o4", recipe=ConvertRecipe(bits=4)).path
    planned = estimate_onnx_memory(art / "model.onnx", 1024).ram_bytes
    # a small parent of its own: its largest child is that run (a child of pytest could be a fork of it)
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, str(Path(sys.executable).with_name("edgekit")), "run",
                          str(art), "--raw", "-p", "hello", "-n", "8", "-c", "1024", "-t", "1", "--no-stats"],
                         check=True, capture_output=True, text=True, timeout=300)
    peak = int(out.stdout.split()[-1]) * 1024  # kB
    assert 0.95 < planned / peak < 1.25, (planned, peak)
