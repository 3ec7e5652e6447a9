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
