"""The Core ML program of a decoder, built with coremltools' MIL builder straight from edgekit's weights.

No torch front end: coremltools' PyTorch converter trails torch releases and re-traces the model, while
edgekit already holds every weight (float, blockwise integers, or palettes) in the checkpoint's own
layout. The program is one iOS18 / macOS15 ``main`` function:

* inputs ``input_ids`` int32 ``(1, L)`` and ``causal_mask`` fp16 ``(1, 1, L, E)`` (0 where a query may see
  a key, -inf elsewhere), ``L`` new tokens after ``E - L`` already in the cache;
* states ``k_cache_{i}`` / ``v_cache_{i}`` fp16 ``(1, n_kv_heads, context, head_dim)`` per layer: the new
  keys and values are written at positions ``E-L .. E-1`` (``read_state`` -> ``slice_update`` ->
  ``coreml_update_state``) and attention reads positions ``0 .. E-1``;
* output ``logits`` float32 ``(1, L, vocab)``.

Why one function with a flexible sequence length rather than a multifunction model (a prefill and a
decode function sharing weights): a flexible ``L`` serves a prompt of any length in one call and decoding
with ``L = 1`` from the same function and the same weight blobs, with nothing to deduplicate; it is the
shape of Apple's own stateful Llama-3.1 example. A multifunction model buys fixed shapes (what the Neural
Engine prefers) at the cost of choosing prefill lengths ahead; that is a later option, not a default.

Numerics: fp16 throughout, as Core ML runs it on the GPU and Neural Engine. RMSNorm is computed as
``layer_norm`` of ``[x, -x]`` (mean 0, so it divides by the root mean square) because squaring the
residual stream in fp16 overflows at values the real model reaches; queries are scaled before ``Q K^T``
for the same reason. Rotary tables are computed in float64 and stored in fp16, so position ``p`` is exact.
Qwen3's per-head query and key norms (one ``head_dim`` weight shared by the heads, before rotary) are the
same ``layer_norm`` of ``[x, -x]`` over each head's values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgekit.arch import HParams
from edgekit.attention import inv_freq
from edgekit.converters.formats.coreml.package import fresh_op_names


@dataclass(frozen=True)
class Dense:
    """A float tensor stored as fp16."""

    value: np.ndarray


@dataclass(frozen=True)
class Blockwise:
    """``constexpr_blockwise_shift_scale``: ``data`` ``(out, in)`` (uint8 codes; signed ``code - 2**(bits-1)``
    when ``offset`` is None), ``scale`` fp16 ``(out, in/block)``, ``offset`` uint8 ``(out, in/block)``."""

    bits: int
    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None


@dataclass(frozen=True)
class Palette:
    """``constexpr_lut_to_dense``: ``indices`` uint8 ``(out, in)``, ``lut`` fp16 ``(out/group, 2**bits)``;
    ``sparse`` (dense-and-sparse outliers): fp16 corrections ``(out, in)``, zero off the outliers, stored by a
    ``constexpr_sparse_to_dense`` (a one-bit mask and the nonzero values) and added to the palette's values."""

    bits: int
    indices: np.ndarray
    lut: np.ndarray
    sparse: np.ndarray | None = None


Weight = Dense | Blockwise | Palette
#: HF tensor name -> its stored form (matrices) ; vectors (norms, biases) always come back as Dense.
WeightSource = Callable[[str], Weight]

INPUTS = ("input_ids", "causal_mask")
#: the two halves of a dense-and-sparse weight ``name``: ``name + suffix`` (their sum is the op ``name``)
SPLIT_SUFFIXES = ("_palette", "_outliers")


def _sub_byte(bits: int, signed: bool) -> np.dtype:
    from coremltools.converters.mil.mil import types

    if signed:
        return {4: types.np_int4_dtype, 8: np.dtype(np.int8)}[bits]
    return {2: types.np_uint2_dtype, 3: types.np_uint3_dtype, 4: types.np_uint4_dtype,
            6: types.np_uint6_dtype, 8: np.dtype(np.uint8)}[bits]


def weight_var(mb, name: str, w: Weight):
    """The MIL variable of one stored weight: a const, or the constexpr op that decodes it."""
    if isinstance(w, Dense):
        return mb.const(val=w.value.astype(np.float16), name=name)
    if isinstance(w, Blockwise):
        if w.offset is None:
            data = (w.data.astype(np.int16) - (1 << (w.bits - 1))).astype(np.int8)
            return mb.constexpr_blockwise_shift_scale(data=data.astype(_sub_byte(w.bits, True)),
                                                      scale=w.scale.astype(np.float16), name=name)
        dt = _sub_byte(w.bits, False)
        return mb.constexpr_blockwise_shift_scale(data=w.data.astype(dt), scale=w.scale.astype(np.float16),
                                                  offset=w.offset.astype(dt), name=name)
    lut = w.lut.astype(np.float16).reshape(w.lut.shape[0], 1, w.lut.shape[1], 1)
    if w.sparse is None:
        return mb.constexpr_lut_to_dense(indices=w.indices.astype(_sub_byte(w.bits, False)), lut=lut, name=name)
    from coremltools.converters.mil.mil import types

    dense = mb.constexpr_lut_to_dense(indices=w.indices.astype(_sub_byte(w.bits, False)), lut=lut,
                                      name=name + SPLIT_SUFFIXES[0])
    mask = w.sparse.astype(np.float32) != 0  # a -0.0 correction adds nothing
    sparse = mb.constexpr_sparse_to_dense(nonzero_data=w.sparse[mask].astype(np.float16),
                                          mask=mask.astype(types.np_uint1_dtype), name=name + SPLIT_SUFFIXES[1])
    return mb.add(x=dense, y=sparse, name=name)


def rotary_tables(hp: HParams, context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``(context, head_dim)`` (rotate-half layout), float64 then fp16, with the rope scalings
    :func:`..attention.inv_freq` takes (default, linear, llama3)."""
    ang = np.outer(np.arange(context, dtype=np.float64), inv_freq(hp, np.float64))
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)


class _Layers:
    """The ops of one program; ``mb`` is coremltools' builder."""

    def __init__(self, mb, hp: HParams, weights: WeightSource) -> None:
        self.mb, self.hp, self.w = mb, hp, weights

    def rms_norm(self, x, name: str, width: int | None = None):
        """RMSNorm over the last axis (``width`` values: the hidden size unless given) times the weight ``name``."""
        mb = self.mb
        rank = x.rank
        both = mb.concat(values=[x, mb.mul(x=x, y=np.float16(-1))], axis=-1)
        n = mb.layer_norm(x=both, axes=[-1], epsilon=np.float16(max(self.hp.rms_eps, 1e-7)))
        half = mb.slice_by_index(x=n, begin=[0] * rank, end=[0] * (rank - 1) + [width or self.hp.n_embd],
                                 begin_mask=[True] * rank, end_mask=[True] * (rank - 1) + [False])
        return mb.mul(x=half, y=self.vec(name), name=name.replace(".", "_") + "_out")

    def vec(self, hf: str):
        w = self.w(hf)
        assert isinstance(w, Dense)
        return self.mb.const(val=w.value.astype(np.float16), name=hf.replace(".", "_"))

    def linear(self, x, hf: str, bias: str | None = None, var=None):
        mb = self.mb
        weight = var if var is not None else weight_var(mb, hf.replace(".", "_"), self.w(hf))
        if bias is not None:
            return mb.linear(x=x, weight=weight, bias=self.vec(bias))
        return mb.linear(x=x, weight=weight)

    def heads(self, x, n: int):
        """``(1, L, n*hd)`` -> ``(1, n, L, hd)``."""
        mb = self.mb
        return mb.transpose(x=mb.reshape(x=x, shape=[1, -1, n, self.hp.head_dim]), perm=[0, 2, 1, 3])

    def qk_heads(self, x, n: int, norm: str):
        """Queries or keys split into ``n`` heads; Qwen3's RMSNorm over each head's ``head_dim`` values (one
        weight shared by the heads) when the checkpoint has ``norm``, before rotary as transformers applies it."""
        x = self.heads(x, n)
        return self.rms_norm(x, norm, self.hp.head_dim) if self.has(norm) else x

    def rope(self, x, cos, sin):
        mb = self.mb
        h = self.hp.head_dim // 2
        x1 = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[0, 0, 0, h], begin_mask=[True] * 4,
                               end_mask=[True, True, True, False])
        x2 = mb.slice_by_index(x=x, begin=[0, 0, 0, h], end=[0, 0, 0, 0], begin_mask=[True, True, True, False],
                               end_mask=[True] * 4)
        rot = mb.concat(values=[mb.mul(x=x2, y=np.float16(-1)), x1], axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rot, y=sin))

    def cache_write(self, state, new, begin, end):
        """Write ``new`` ``(1, kv, L, hd)`` at positions ``begin..end`` of ``state``; the cache up to ``end``."""
        mb = self.mb
        hp = self.hp
        cache = mb.read_state(input=state)
        lo = mb.concat(values=[np.array([0, 0], np.int32), begin, np.array([0], np.int32)], axis=0)
        hi = mb.concat(values=[np.array([1, hp.n_head_kv], np.int32), end, np.array([hp.head_dim], np.int32)],
                       axis=0)
        cache = mb.slice_update(x=cache, update=new, begin=lo, end=hi)
        mb.coreml_update_state(state=state, value=cache)
        zero = np.zeros(4, np.int32)
        return mb.slice_by_index(x=cache, begin=zero, end=hi)

    def attention(self, h, i: int, cos, sin, mask, begin, end, k_state, v_state):
        mb, hp = self.mb, self.hp
        p = f"model.layers.{i}.self_attn."
        has_bias = self.has(p + "q_proj.bias")
        q = self.linear(h, p + "q_proj.weight", p + "q_proj.bias" if has_bias else None)
        k = self.linear(h, p + "k_proj.weight", p + "k_proj.bias" if has_bias else None)
        v = self.linear(h, p + "v_proj.weight", p + "v_proj.bias" if has_bias else None)
        q = mb.mul(x=self.rope(self.qk_heads(q, hp.n_head, p + "q_norm.weight"), cos, sin),
                   y=np.float16(hp.head_dim ** -0.5))
        k = self.rope(self.qk_heads(k, hp.n_head_kv, p + "k_norm.weight"), cos, sin)
        keys = self.cache_write(k_state, k, begin, end)
        values = self.cache_write(v_state, self.heads(v, hp.n_head_kv), begin, end)
        # query heads j*rep .. j*rep+rep-1 share kv head j (transformers' repeat_kv): group them by kv head
        qg = mb.reshape(x=q, shape=[1, hp.n_head_kv, -1, hp.head_dim])
        scores = mb.matmul(x=qg, y=keys, transpose_y=True)  # (1, kv, rep*L, E)
        e_len = mb.slice_by_index(x=mb.shape(x=keys), begin=[2], end=[3])
        per_head = mb.reshape(x=scores, shape=mb.concat(values=[np.array([1, hp.n_head, -1], np.int32), e_len],
                                                        axis=0))
        probs = mb.softmax(x=mb.add(x=per_head, y=mask), axis=-1)
        probs = mb.reshape(x=probs, shape=mb.concat(values=[np.array([1, hp.n_head_kv, -1], np.int32), e_len],
                                                    axis=0))
        out = mb.matmul(x=probs, y=values)  # (1, kv, rep*L, hd)
        out = mb.reshape(x=out, shape=[1, hp.n_head, -1, hp.head_dim])
        out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, -1, hp.n_head * hp.head_dim])
        return self.linear(out, p + "o_proj.weight")

    def mlp(self, h, i: int):
        mb = self.mb
        p = f"model.layers.{i}.mlp."
        g = self.linear(h, p + "gate_proj.weight")
        u = self.linear(h, p + "up_proj.weight")
        return self.linear(mb.mul(x=mb.silu(x=g), y=u), p + "down_proj.weight")

    def has(self, hf: str) -> bool:
        return hf in self.w.names  # type: ignore[attr-defined]


def windowed(mb, mask, begin, end, window: int, context: int):
    """``mask`` with the keys more than ``window - 1`` positions behind each query masked too (transformers'
    sliding window: query ``q`` sees keys ``q - window < k <= q``), for the layers that slide."""
    pos = mb.const(val=np.arange(context, dtype=np.int32), name=f"positions_w{window}")
    keys = mb.slice_by_index(x=pos, begin=np.array([0], np.int32), end=end)  # (E,)
    queries = mb.reshape(x=mb.slice_by_index(x=pos, begin=begin, end=end), shape=[-1, 1])  # (L, 1)
    far = mb.greater_equal(x=mb.sub(x=queries, y=keys), y=np.int32(window))  # (L, E)
    return mb.select(cond=far, a=np.float16(-np.inf), b=mask, name=f"causal_mask_w{window}")


def build(hp: HParams, context: int, weights: WeightSource, progress: Callable[[str, int, int], None],
          windows: list[int] | None = None):
    """The MIL program (``coremltools.converters.mil.Program``) of the decoder whose weights ``weights`` gives
    by Hugging Face name (it also has ``names``, the set of names present, and ``tied``). ``windows``: each
    layer's sliding window (0 or absent: full causal attention), applied inside the program on top of the
    ``causal_mask`` input, so layers may differ."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    fresh_op_names(mb)
    L, E = get_new_symbol(), get_new_symbol()
    specs = {"input_ids": mb.TensorSpec((1, L), dtype=types.int32),
             "causal_mask": mb.TensorSpec((1, 1, L, E), dtype=types.fp16)}
    for i in range(hp.n_layer):
        for kind in ("k", "v"):
            specs[f"{kind}_cache_{i}"] = mb.StateTensorSpec((1, hp.n_head_kv, context, hp.head_dim), dtype=types.fp16)
    cos_t, sin_t = rotary_tables(hp, context)
    with Function(specs, ct.target.iOS18) as fn:
        lay = _Layers(mb, hp, weights)
        ids, mask = fn.inputs["input_ids"], fn.inputs["causal_mask"]
        mshape = mb.shape(x=mask)
        end = mb.slice_by_index(x=mshape, begin=[3], end=[4])
        begin = mb.sub(x=end, y=mb.slice_by_index(x=mshape, begin=[2], end=[3]))
        rows = mb.concat(values=[begin, np.array([0], np.int32)], axis=0)
        stop = mb.concat(values=[end, np.array([hp.head_dim], np.int32)], axis=0)
        cos = mb.slice_by_index(x=mb.const(val=cos_t, name="rope_cos"), begin=rows, end=stop)
        sin = mb.slice_by_index(x=mb.const(val=sin_t, name="rope_sin"), begin=rows, end=stop)
        progress("embedding", 0, hp.n_layer + 2)
        table = weight_var(mb, "model_embed_tokens_weight", weights("model.embed_tokens.weight"))
        x = mb.gather(x=table, indices=ids, axis=0)  # (1, L, D)
        masks = {0: mask}
        for w in sorted(set(windows or ()) - {0}):
            if w < context:  # a window the context never exceeds masks nothing
                masks[w] = windowed(mb, mask, begin, end, w, context)
        for i in range(hp.n_layer):
            progress(f"layer {i + 1}/{hp.n_layer}", i + 1, hp.n_layer + 2)
            p = f"model.layers.{i}."
            h = lay.rms_norm(x, p + "input_layernorm.weight")
            m = masks.get(windows[i] if windows and i < len(windows) else 0, mask)
            x = mb.add(x=x, y=lay.attention(h, i, cos, sin, m, begin, end, fn.inputs[f"k_cache_{i}"],
                                            fn.inputs[f"v_cache_{i}"]))
            x = mb.add(x=x, y=lay.mlp(lay.rms_norm(x, p + "post_attention_layernorm.weight"), i))
        progress("lm_head", hp.n_layer + 1, hp.n_layer + 2)
        h = lay.rms_norm(x, "model.norm.weight")
        tied = weights.tied  # type: ignore[attr-defined]
        logits = lay.linear(h, "lm_head.weight", var=table if tied else None)
        fn.set_outputs([mb.cast(x=logits, dtype="fp32", name="logits")])
    prog = Program()
    prog.add_function("main", fn)
    return prog
