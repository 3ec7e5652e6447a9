"""A UNet weight stored on an integer grid, as the diffusion quantizers produce it and the format writers
(ONNX's DequantizeLinear, Core ML's blockwise ints) store it.

``W ≈ scale * (q - zero)`` per block of ``block`` consecutive inputs of each output row (the weight seen as
``[out, in]``, a conv's ``[out, cin*kh*kw]``), plus an optional low-rank branch ``a @ b`` kept in float
(SVDQuant: the outliers the integers cannot hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantWeight:
    """q: integers ``[out, in]`` (int8 when ``signed``, else uint8 holding ``0..2**bits-1``).
    scale: ``[out, in // block]`` float32. zero: same shape as ``scale`` in q's type, or None (symmetric).
    block: inputs per scale (``in``: one scale per output row). shape: the weight's own shape.
    lowrank: ``(a [out, r], b [r, in])`` float32, or None."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    bits: int
    block: int
    signed: bool
    shape: tuple[int, ...]
    lowrank: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        out, cols = self.q.shape
        if out != self.shape[0] or cols != int(np.prod(self.shape[1:])):
            raise ValueError(f"q {self.q.shape} does not flatten weight {self.shape}")
        if cols % self.block or self.scale.shape != (out, cols // self.block):
            raise ValueError(f"scale {self.scale.shape} does not match q {self.q.shape} in blocks of {self.block}")
        if self.zero is not None and self.zero.shape != self.scale.shape:
            raise ValueError("zero must have the scale's shape")
        lo, hi = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)
        if self.q.size and (int(self.q.min()) < lo or int(self.q.max()) > hi):
            raise ValueError(f"q holds values outside {self.bits}-bit {'signed' if self.signed else 'unsigned'} range")

    def dequantize(self) -> np.ndarray:
        """The float32 weight in its own shape (low-rank branch included)."""
        out, cols = self.q.shape
        q = self.q.astype(np.float32).reshape(out, -1, self.block)
        z = 0.0 if self.zero is None else self.zero.astype(np.float32)[..., None]
        w = ((q - z) * self.scale[..., None]).reshape(out, cols)
        if self.lowrank is not None:
            a, b = self.lowrank
            w = w + a.astype(np.float32) @ b.astype(np.float32)
        return w.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed integers, scales (and zeros) in float16/ints, the low-rank factors in float16."""
        n = (self.q.size * self.bits + 7) // 8 + self.scale.size * 2
        if self.zero is not None:
            n += (self.zero.size * self.bits + 7) // 8
        if self.lowrank is not None:
            n += sum(m.size * 2 for m in self.lowrank)
        return n
