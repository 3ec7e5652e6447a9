"""MLC-LLM's group quantization (``q4f16_1``, ``q4f32_1``, ``q3f16_1``...) as a grid, and its pure kernels.

Facts of the format (from mlc-llm's ``quantization/group_quantization.py`` and ``utils.py``):

* a row of ``K`` weights (the input dimension of a linear, the hidden size of an embedding row) is cut
  into groups of ``group`` weights (32 for int4, 40 for int3; a last partial group is padded);
* each group has one scale in the model's dtype (fp16 or fp32) and ``bits``-wide unsigned codes that
  decode to ``(code - max_int) * scale`` with ``max_int = 2**(bits-1) - 1`` (7 for int4, 3 for int3);
* codes are packed ``32 // bits`` to a little-endian uint32, element ``j`` of a word at bit ``bits * j``
  (8 int4 codes or 10 int3 codes per word, the top 2 bits of an int3 word zero); padding codes are 0;
* MLC's own quantizer works in the model dtype: the weight is cast to it, ``scale = max|w| / max_int``,
  ``code = clip(round(w / scale + max_int), 0, 2 * max_int)``, every operation rounded to that dtype and
  ``round`` being TVM's ``nearbyint`` (ties to even).

The grid's record for one group is ``[uint32 words (group / (32 // bits)), little-endian][scale]``: the
exact bits MLC stores, so the format's writer only splits a matrix's records into ``q_weight`` /
``q_scale`` and transposes them for the ``_0`` (KN) layouts. :func:`mlc_rtn` reproduces MLC's quantizer
bit for bit; calibrated methods (imatrix RTN, AWQ, GPTQ) choose scales by a weighted search instead (float32 scales
rounded to what MLC's bf16 encoding stores) and may use the top code (``2**bits - 1``, i.e.
``+(max_int + 1) * scale``), which MLC's dequantizer decodes like any other. MLC's own ``q4f32_1``
quantizer computes codes against float32 scales that its tensor cache then stores as bfloat16: the
writer reproduces that too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgekit.converters.quantize.grids.base import F32, Grid, GridSweep, importance_block
from edgekit.errors import InputError, UnsupportedError

_DTYPES = {"float16": np.float16, "float32": np.float32}
_CHUNK = 1 << 18  # weights quantized at a time (rows are independent): 1 MB float32 temporaries
_SHRINK = np.linspace(1.0, 0.70, 16, dtype=F32)


@dataclass(frozen=True, repr=False)
class MLCGroup(Grid):
    """One MLC group-quantization grid: ``bits`` (3 or 4), ``group`` weights per scale, ``dtype`` of the
    scales and of the model ("float16" or "float32")."""

    bits: int
    group: int
    dtype: str = "float16"
    is_float = False
    pads_last_block = True  # a row's last partial group is zero-padded (MLC's ceildiv); see Grid

    def __post_init__(self) -> None:
        if self.bits not in (3, 4):
            raise UnsupportedError(f"MLC group quantization here has 3 or 4 bits; got {self.bits}")
        if self.dtype not in _DTYPES:
            raise UnsupportedError(f"MLC scales are float16 or float32; got {self.dtype}")
        if self.group % self.per_word:
            raise UnsupportedError(f"an MLC group of {self.group} is not a whole number of "
                                   f"{self.per_word}-code words")

    @property
    def name(self) -> str:
        return f"MLC_INT{self.bits}_G{self.group}_{'F16' if self.dtype == 'float16' else 'F32'}"

    @property
    def block(self) -> int:  # type: ignore[override]
        return self.group

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def words(self) -> int:
        """uint32 words per group."""
        return self.group // self.per_word

    @property
    def max_int(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def scale_bytes(self) -> int:
        return np.dtype(_DTYPES[self.dtype]).itemsize

    @property
    def record(self) -> int:
        return 4 * self.words + self.scale_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.record / self.group

    def groups(self, n: int) -> int:
        return -(-n // self.group)

    def row_bytes(self, n: int) -> int:
        return self.groups(n) * self.record

    def quantize_roundtrip(self, x: np.ndarray, imatrix: np.ndarray | None = None, *,
                           want_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Records of float32 ``x`` ``(..., n)``: MLC's own quantizer without ``imatrix``, an
        ``imatrix``-weighted scale search with it."""
        a = np.asarray(x, dtype=F32)
        rows = a.reshape(-1, a.shape[-1])
        step = max(1, _CHUNK // rows.shape[1])
        if rows.shape[0] > step:  # rows are independent: a chunk at a time keeps the float temporaries small
            raw = np.empty((rows.shape[0], self.row_bytes(rows.shape[1])), dtype=np.uint8)
            values = np.empty_like(rows) if want_values else None
            for r0 in range(0, rows.shape[0], step):
                raw[r0:r0 + step], v = self.quantize_roundtrip(rows[r0:r0 + step], imatrix, want_values=want_values)
                if values is not None:
                    values[r0:r0 + step] = v
            return raw.reshape(*a.shape[:-1], -1), (None if values is None else values.reshape(a.shape))
        if not np.all(np.isfinite(rows)):
            raise InputError(f"cannot quantize to {self.name}: the weights contain NaN or infinite values")
        n = rows.shape[1]
        blocks, valid = self._blocks(rows)
        if imatrix is None:
            codes, scale = mlc_rtn(self, blocks, valid)
        else:
            im = np.asarray(imatrix, dtype=F32)
            if im.shape != (n,):
                raise InputError(f"imatrix has shape {im.shape}; expected ({n},), one importance per column")
            qw = self._blocks(np.broadcast_to(im, rows.shape))[0] * valid
            scale = choose_scale(self, blocks, qw)
            codes = round_codes(self, blocks, scale) * valid.astype(np.uint8)
        raw = pack(self, codes, scale).reshape(*a.shape[:-1], -1)
        values = None
        if want_values:
            values = dequantize_codes(self, codes, scale).reshape(rows.shape[0], -1)[:, :n].reshape(a.shape)
        return raw, values

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Float32 values of records ``(..., row_bytes)`` (a padded last group decodes its padding too:
        the caller knows the row length and cuts it)."""
        r = np.asarray(raw, dtype=np.uint8)
        codes, scale = unpack(self, r.reshape(-1, self.record))
        return dequantize_codes(self, codes, scale).reshape(*r.shape[:-1], -1)

    def sweep(self, w: np.ndarray, imatrix: np.ndarray | None) -> GridSweep:
        return _MLCSweep(self, imatrix)

    def _blocks(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` ``(r, n)`` as groups ``(r * groups, group)`` zero-padded, and which entries are real."""
        r, n = rows.shape
        width = self.groups(n) * self.group
        out = np.zeros((r, width), dtype=F32)
        out[:, :n] = rows
        valid = np.zeros((1, width), dtype=bool)
        valid[:, :n] = True
        return out.reshape(-1, self.group), np.broadcast_to(valid, (r, width)).reshape(-1, self.group)

    @classmethod
    def parse(cls, name: str) -> MLCGroup:
        m = re.fullmatch(r"MLC_INT([34])_G(\d+)_F(16|32)", name.upper())
        if not m:
            raise InputError(f"{name!r} is not an MLC grid name (e.g. MLC_INT4_G32_F16)")
        return cls(int(m.group(1)), int(m.group(2)), f"float{m.group(3)}")


def mlc_rtn(g: MLCGroup, blocks: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MLC's quantizer on groups ``(n, group)``: codes uint8 and scales (the model dtype), every step
    rounded to that dtype as TVM computes it. ``valid`` marks real weights (padding gets code 0 and no
    say in the scale). A group of zeros has scale 0 and codes 0, as TVM's clip of ``0 / 0`` gives (it
    decodes to zeros)."""
    dt = _DTYPES[g.dtype]
    w = np.asarray(blocks, dtype=F32).astype(dt)
    if valid is not None:
        w = np.where(valid, w, dt(0))
    max_abs = np.abs(w).max(axis=1)
    # one fp16 division: computed in fp32 and rounded once, which equals the correctly rounded fp16 quotient
    scale = (max_abs.astype(F32) / F32(g.max_int)).astype(dt)
    s = np.where(scale != 0, scale, dt(1)).astype(F32)
    q = (w.astype(F32) / s[:, None]).astype(dt)
    q = (q.astype(F32) + F32(g.max_int)).astype(dt)
    codes = np.clip(np.rint(q.astype(F32)), 0, 2 * g.max_int).astype(np.uint8)
    codes[scale == 0] = 0
    if valid is not None:
        codes = np.where(valid, codes, 0).astype(np.uint8)
    return codes, scale


def choose_scale(g: MLCGroup, blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Scales (the model dtype) of groups ``(n, group)`` minimising the ``qw``-weighted squared error over
    shrinks of the range, mapping either the largest negative weight to code 0 or the largest positive
    one to the top code, each refit by least squares."""
    dt = _DTYPES[g.dtype]
    x = np.asarray(blocks, dtype=F32)
    w = np.ones_like(x) if qw is None else np.asarray(qw, dtype=F32)
    lo, hi = -g.max_int, (1 << g.bits) - 1 - g.max_int
    neg = np.maximum(-x.min(axis=1), 0) / F32(-lo)
    pos = np.maximum(x.max(axis=1), 0) / F32(hi)
    base = np.maximum(neg, pos)
    best_err = np.full(x.shape[0], np.inf)
    best = base.astype(dt)
    for f in _SHRINK:
        d = (base * f).astype(F32)
        q = _round(x, d, lo, hi)
        num = (w * x * q).sum(axis=1)
        den = (w * q * q).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(den > 0, num / den, d).astype(F32)
        d = _storable(np.abs(d).astype(dt).astype(F32), g.dtype)
        q = _round(x, d, lo, hi)
        err = (w * (x - d[:, None] * q) ** 2).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, d.astype(dt), best)
    return best.astype(dt)


def _storable(d: np.ndarray, dtype: str) -> np.ndarray:
    """Scales as MLC's tensor cache will hold them: float32 arrays are stored as bfloat16 (its
    ``f32-to-bf16`` encoding), so a float32 scale is rounded to bfloat16 here (nearest, ties to even) and
    what the method chose is what the runtime decodes."""
    if dtype != "float32":
        return d
    bits = np.ascontiguousarray(d, dtype=F32).view(np.uint32)
    return ((bits + ((bits >> 16) & 1) + np.uint32(0x7FFF)) & np.uint32(0xFFFF0000)).view(F32)


def _round(x: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    return np.clip(np.rint(x * inv[:, None]), lo, hi)


def round_codes(g: MLCGroup, blocks: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest codes (uint8, ``0 .. 2**bits - 1``) of groups under fixed scales."""
    lo, hi = -g.max_int, (1 << g.bits) - 1 - g.max_int
    return (_round(np.asarray(blocks, dtype=F32), scale.astype(F32), lo, hi) + g.max_int).astype(np.uint8)


def dequantize_codes(g: MLCGroup, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(code - max_int) * scale`` rounded to the model dtype (as MLC's dequantize computes it), float32."""
    dt = _DTYPES[g.dtype]
    v = (codes.astype(F32) - F32(g.max_int)) * scale.astype(F32)[:, None]
    return v.astype(dt).astype(F32)


def pack_words(g: MLCGroup, codes: np.ndarray) -> np.ndarray:
    """uint32 words ``(n, words)`` of codes ``(n, group)``: ``per_word`` codes each, the first lowest."""
    c = np.asarray(codes, dtype=np.uint32).reshape(codes.shape[0], g.words, g.per_word)
    shifts = (np.arange(g.per_word, dtype=np.uint32) * np.uint32(g.bits))
    return np.bitwise_or.reduce(c << shifts, axis=2).astype(np.uint32)


def unpack_words(g: MLCGroup, words: np.ndarray) -> np.ndarray:
    """Codes ``(n, group)`` uint8 of words ``(n, words)``."""
    w = np.asarray(words, dtype=np.uint32)[..., None]
    shifts = (np.arange(g.per_word, dtype=np.uint32) * np.uint32(g.bits))
    return ((w >> shifts) & np.uint32((1 << g.bits) - 1)).astype(np.uint8).reshape(w.shape[0], -1)


def pack(g: MLCGroup, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Records ``(n, record)``: the group's words (little-endian) then its scale."""
    words = pack_words(g, codes).astype("<u4").view(np.uint8).reshape(codes.shape[0], -1)
    sc = np.asarray(scale, dtype=_DTYPES[g.dtype]).astype(np.dtype(_DTYPES[g.dtype]).newbyteorder("<"))
    return np.concatenate([words, sc.view(np.uint8).reshape(-1, g.scale_bytes)], axis=1)


def unpack(g: MLCGroup, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``(n, group)`` and scales ``(n,)`` of records ``(n, record)``."""
    r = np.ascontiguousarray(np.asarray(records, dtype=np.uint8).reshape(-1, g.record))
    words = np.ascontiguousarray(r[:, : 4 * g.words]).view("<u4").reshape(-1, g.words)
    scale = np.ascontiguousarray(r[:, 4 * g.words:]).view(np.dtype(_DTYPES[g.dtype]).newbyteorder("<")).reshape(-1)
    return unpack_words(g, words), scale.astype(_DTYPES[g.dtype])


def split(g: MLCGroup, records: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A matrix's records ``(N, row_bytes)`` as MLC's ``q_weight`` uint32 ``(N, groups * words)`` and
    ``q_scale`` ``(N, groups)`` (the NK layout)."""
    r = np.ascontiguousarray(np.asarray(records, dtype=np.uint8).reshape(n_rows, -1, g.record))
    nb = r.shape[1]
    words = np.ascontiguousarray(r[:, :, : 4 * g.words]).view("<u4").reshape(n_rows, nb * g.words)
    scale = np.ascontiguousarray(r[:, :, 4 * g.words:]).view(np.dtype(_DTYPES[g.dtype]).newbyteorder("<"))
    return words.astype(np.uint32), scale.reshape(n_rows, nb).astype(_DTYPES[g.dtype])


def dequantize_split(g: MLCGroup, q_weight: np.ndarray, q_scale: np.ndarray, k: int) -> np.ndarray:
    """The ``(N, k)`` float32 weight of MLC's ``q_weight`` / ``q_scale`` (NK layout)."""
    n = q_weight.shape[0]
    codes = unpack_words(g, q_weight.reshape(-1, g.words)).reshape(n, -1)
    v = (codes.astype(F32) - F32(g.max_int)).reshape(n, -1, g.group) * q_scale.astype(F32)[:, :, None]
    return v.astype(_DTYPES[g.dtype]).astype(F32).reshape(n, -1)[:, :k]


class _MLCSweep(GridSweep):
    """GPTQ onto an MLC grid: one scale per group of columns, chosen from the columns as updated."""

    def __init__(self, g: MLCGroup, im: np.ndarray | None) -> None:
        self.g, self.im = g, im

    def block(self, cols: np.ndarray, c0: int) -> tuple:
        blocks = np.ascontiguousarray(cols.T)
        scale = choose_scale(self.g, blocks, importance_block(self.im, c0, blocks.shape))
        d = scale.astype(F32)
        lo, hi = -self.g.max_int, (1 << self.g.bits) - 1 - self.g.max_int
        dt = _DTYPES[self.g.dtype]

        def rnd(j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.clip(np.rint(np.where(d != 0, x / np.where(d != 0, d, F32(1)), F32(0))), lo, hi)
            return q + self.g.max_int, (q * d).astype(dt).astype(F32)

        return rnd, scale

    def stack(self, ps: list) -> np.ndarray:
        return np.stack(ps, axis=1).reshape(-1)

    def pack(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        return pack(self.g, codes, params)

    def dequantize(self, codes: np.ndarray, params: np.ndarray) -> np.ndarray:
        return dequantize_codes(self.g, codes, params)
