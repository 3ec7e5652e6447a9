"""The ONNX backend's two KV cache layouts: a cache bound in place (GroupQueryAttention graphs) gives the
logits the fed-and-returned cache gives, through growth, rewinds and a KV window, and is chosen only
for graphs whose attention owns the past inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit import api
from edgekit.converters.formats.base import ConvertRecipe

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from edgekit.converters.formats.onnx.read import load_graph  # noqa: E402
from edgekit.runtime import onnx as onnx_backend  # noqa: E402
from edgekit.runtime._onnx_kv import FIRST_CAPACITY, BoundKV, FedKV, capacity_for, kv_in_place  # noqa: E402


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-kv") / "tiny-onnx"
    return api.convert(tiny_llama, "onnx", output=out, recipe=ConvertRecipe(bits=16)).path


def _backends(folder, monkeypatch, **opts):
    bound = onnx_backend.OnnxBackend(folder / "model.onnx", n_threads=1, **opts)
    with monkeypatch.context() as m:
        m.setattr(onnx_backend, "kv_in_place", lambda model: False)
        fed = onnx_backend.OnnxBackend(folder / "model.onnx", n_threads=1, **opts)
    assert isinstance(bound._kv, BoundKV) and isinstance(fed._kv, FedKV)
    return bound, fed


def test_edgekit_graphs_append_in_place(tiny_onnx):
    assert kv_in_place(load_graph(tiny_onnx / "model.onnx"))


def test_graphs_that_read_the_past_elsewhere_are_fed(tiny_onnx):
    """A past input read by another node (a Concat, as exporters without GroupQueryAttention write), or a
    present that is not the graph's output, keeps the fed layout: binding it in place would be wrong."""
    kv = [1, 2, "past", 4]
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv)
    new = helper.make_tensor_value_info("new", TensorProto.FLOAT, kv)
    present = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, kv)
    concat = helper.make_graph([helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2)],
                               "g", [past, new], [present])
    assert not kv_in_place(helper.make_model(concat))
    model = load_graph(tiny_onnx / "model.onnx")
    model.graph.output.pop()  # the last present output
    assert not kv_in_place(model)
    model = load_graph(tiny_onnx / "model.onnx")
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    model.graph.node.append(helper.make_node("Identity", [gqa.input[3]], ["peek"]))
    assert not kv_in_place(model)


def test_capacity_doubles_up_to_the_context():
    assert capacity_for(1, 4096) == FIRST_CAPACITY
    assert capacity_for(FIRST_CAPACITY + 1, 4096) == 2 * FIRST_CAPACITY
    assert capacity_for(700, 1000) == 1000 and capacity_for(700, 600) == 700


def test_bound_cache_gives_the_fed_cache_logits(tiny_onnx, monkeypatch):
    """Prefill past the first capacity (the buffers grow), single steps, a verification batch, and
    rewinds (rejected drafts) give the same logits in both layouts; the cache holds at most the context."""
    bound, fed = _backends(tiny_onnx, monkeypatch, n_ctx=700)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, bound.n_vocab, FIRST_CAPACITY + 40)]
    steps = [("extend", prompt), ("extend", [5]), ("extend", [7, 8, 9, 10, 11]), ("truncate", 3),
             ("extend", [12, 13]), ("truncate", 0), ("extend", [14])]
    pos = 0
    for op, arg in steps:
        if op == "truncate":
            pos -= arg
            for be in (bound, fed):
                be._kv.truncate(pos)
            continue
        a, b = bound._run(arg, last_only=False), fed._run(arg, last_only=False)
        pos += len(arg)
        assert bound._pos == fed._pos == pos
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert bound._kv.buffers[0].shape[2] == 2 * FIRST_CAPACITY
    for v, f in zip(bound._kv.views(), fed._kv.views(), strict=True):
        np.testing.assert_allclose(v, f, rtol=0, atol=1e-6)
    bound.reset()
    bound._run([int(t) for t in rng.integers(3, bound.n_vocab, 690)], last_only=True)
    assert bound._kv.buffers[0].shape[2] == 700  # capped at the context, not the next doubling


def test_bound_cache_through_a_kv_window(tiny_onnx, monkeypatch):
    """Eviction writes the kept, re-rotated rows back into the bound buffers: a stream through a 64-token
    window scores every token as the fed layout does."""
    bound, fed = _backends(tiny_onnx, monkeypatch, kv_window=64, kv_sinks=4)
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, bound.n_vocab, 300)]
    nll_b, info_b = bound.stream_nll(tokens, chunk=16)
    nll_f, info_f = fed.stream_nll(tokens, chunk=16)
    assert info_b["kv"]["evicted"] == info_f["kv"]["evicted"] > 200
    np.testing.assert_allclose(nll_b, nll_f, rtol=0, atol=1e-4)


def test_bound_logits_are_written_into_the_callers_array(tiny_onnx, monkeypatch):
    """onnxruntime writes a run's logits into the array the run returns: an output it allocated would
    stay alive in the binding until the next run (a 512-token chunk's logits are 100-250 MB on SmolLM2:
    its FP16 graph and 8-bit draft after a 1,000-token prompt peaked at 1674 MB that way, 1405 MB now)."""
    bound, _ = _backends(tiny_onnx, monkeypatch)
    logits = bound._run(list(range(3, 40)), last_only=False)
    assert logits.shape == (37, bound.n_vocab)
    assert logits.ctypes.data in {v.data_ptr() for v in bound._kv.io.get_outputs()}
