"""Conversion memory: no converter holds a whole tensor in float32 more than it must.

A large vocabulary's embedding and head are the largest tensors of a model (Llama-3's are 525M parameters
each, 2.1 GB in float32), and a copy of either too many is gigabytes at the peak. Peak memory is measured
with ``tracemalloc``, which counts numpy's buffers (not torch's), around the work itself.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edgekit.errors import InputError


def _peak(fn) -> tuple[object, int]:
    """``fn()`` and the peak of memory traced while it ran, above what was traced before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "numba"])
def test_nbits_rows_make_no_whole_matrix_mask(compiled, monkeypatch):
    """MatMulNBits encoding checks for NaN a chunk at a time: a whole-matrix mask was 1 byte a weight. Both
    search paths work a chunk at a time (the compiled one warmed first: numba's compilation is Python objects
    too, once per process, not the encoder's memory)."""
    from edgekit.converters.quantize import nbits

    t = nbits.NBitsType(4, 32, True)
    x = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)
    if compiled:
        monkeypatch.setattr(nbits, "COMPILE_AFTER", 0)
        nbits.quantize_rows(t, x[:8], None, want_values=False)
    else:
        monkeypatch.setattr(nbits, "compiled_search", lambda: None)
    (raw, _), peak = _peak(lambda: nbits.quantize_rows(t, x, None, want_values=False))
    assert peak < raw.nbytes + x.size // 4, (peak, raw.nbytes)


def test_nbits_rows_still_refuse_a_nan_in_the_last_chunk():
    from edgekit.converters.quantize import nbits

    x = np.ones((300, 256), np.float32)
    x[-1, -1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        nbits.quantize_rows(nbits.NBitsType(4, 32, True), x, None, want_values=False)


def test_mlc_group_quantization_works_a_chunk_of_rows_at_a_time():
    """MLC's q4f16 encoder made several float32 copies of the whole matrix (padded groups, scales, codes)."""
    from edgekit.converters.quantize.mlcgroup import MLCGroup

    g = MLCGroup(4, 32, "float16")
    x = np.random.default_rng(1).standard_normal((2048, 4096)).astype(np.float32)
    (raw, _), peak = _peak(lambda: g.quantize_roundtrip(x, want_values=False))
    assert peak < raw.nbytes + x.nbytes // 4, (peak, raw.nbytes, x.nbytes)


@pytest.mark.parametrize("imatrix", [False, True])
def test_mlc_chunks_encode_as_one_pass(monkeypatch, imatrix):
    """Rows are independent: records and values are the same whatever the chunk (a last short chunk too)."""
    from edgekit.converters.quantize import mlcgroup

    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 200)).astype(np.float32)  # 200: a padded last group of 8
    im = rng.random(200).astype(np.float32) + 0.1 if imatrix else None
    for g in (mlcgroup.MLCGroup(4, 32, "float16"), mlcgroup.MLCGroup(3, 40, "float16")):
        whole = g.quantize_roundtrip(x, im)
        monkeypatch.setattr(mlcgroup, "_CHUNK", 3 * 200)
        parts = g.quantize_roundtrip(x, im)
        monkeypatch.setattr(mlcgroup, "_CHUNK", 1 << 18)
        assert np.array_equal(whole[0], parts[0])
        assert np.array_equal(whole[1], parts[1])
        assert parts[0].shape == (37, g.row_bytes(200))


def test_bf16_tensors_load_a_slice_at_a_time(tmp_path, monkeypatch):
    """A bf16 tensor is converted to float32 in row slices (no whole bf16 copy beside the result), exactly."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file

    import edgekit.model as model

    w = torch.randn(1001, 96).to(torch.bfloat16)
    save_file({"w": w, "v": torch.randn(7).to(torch.bfloat16)}, tmp_path / "m.safetensors")
    monkeypatch.setattr(model, "_BF16_CHUNK", 96 * 10)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        got, vec = model._bf16_to_f32(f, "w"), model._bf16_to_f32(f, "v")
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, w.float().numpy())
    assert vec.shape == (7,)


@pytest.fixture(scope="module")
def vocab_heavy(tmp_path_factory):
    """A Llama whose embedding and head are its largest tensors, as a real vocabulary makes them."""
    from tests.helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vocab") / "llama", "LlamaForCausalLM", hidden=1024, ffn=512,
                            layers=1, heads=8, kv_heads=2, vocab_size=4000)  # 2347 tokens: 9.6 MB in float32


@pytest.mark.parametrize("to", ["onnx", "mlc"])
def test_a_conversion_holds_one_float_copy_of_the_largest_tensor(vocab_heavy, tmp_path, to):
    """The peak is about one float32 copy of the largest tensor plus its encoded form. The ONNX writer
    decoded every quantized tensor back to float32 (unused), kept the embedding's float table through every
    layer, and copied each initializer once more on the way to the data file; MLC's encoder made several
    float32 copies of the whole matrix."""
    from edgekit import api
    from edgekit.model import HFCheckpoint

    ckpt = HFCheckpoint.open(vocab_heavy)
    largest = max(r.numel for r in ckpt.tensors.values()) * 4
    assert largest == ckpt.hparams.n_vocab * 1024 * 4
    options = None
    if to == "mlc":  # MLC's shards are buffered up to their cap (32 MiB): here that would be the whole model
        from edgekit.converters.formats.mlc.options import MLCOptions

        options = MLCOptions(shard_mb=1)
    api.convert(vocab_heavy, to, output=tmp_path / "warm", recipe=api.ConvertRecipe(bits=4), options=options)
    _, peak = _peak(lambda: api.convert(vocab_heavy, to, output=tmp_path / to, recipe=api.ConvertRecipe(bits=4),
                                        options=options))
    assert peak < 1.9 * largest, (peak / largest, largest)
