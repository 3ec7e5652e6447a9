"""Weights a checkpoint stores packed, and how to read them as plain arrays (pure numpy).

BitNet b1.58 checkpoints in Hugging Face's ``BitNetForCausalLM`` format (``quantization_config``
``{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}``) store each
decoder linear as uint8 ``(out / 4, in)``: stored row ``p`` holds, in bits ``2i .. 2i+1``, trit + 1 of
logical row ``i * out / 4 + p`` (the four quarters of the matrix share one byte). Beside it a one-element
``weight_scale`` whose inverse multiplies the trits: the layer computes ``(x @ T.T) / weight_scale``.

A :class:`Packing` turns the stored tensors into what the rest of edgekit reads: the trits as float32
(-1, 0, 1) in the logical shape, and the scale as the multiplier ``1 / weight_scale``, which llama.cpp's
``bitnet`` architecture takes as the optional ``blk.N.<linear>.scale`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import CorruptFileError, UnsupportedError

VALUES_PER_BYTE = 4


def pack_ternary(trits: np.ndarray) -> np.ndarray:
    """uint8 ``(rows / 4, cols)`` of int trits ``(rows, cols)`` (rows a multiple of 4) in BitNet's layout."""
    t = np.asarray(trits)
    if t.ndim != 2 or t.shape[0] % VALUES_PER_BYTE or np.any(np.abs(t) > 1):
        raise ValueError("pack_ternary takes a 2-D array of -1/0/1 with a multiple of 4 rows")
    q = (t + 1).astype(np.uint8).reshape(VALUES_PER_BYTE, t.shape[0] // VALUES_PER_BYTE, t.shape[1])
    return q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6)


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """int8 trits ``(4 * rows, cols)`` of BitNet-packed uint8 ``(rows, cols)``."""
    p = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([(p >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])  # (4, rows, cols)
    if np.any(codes == 3):
        raise CorruptFileError("a packed ternary weight holds the unused code 3; the checkpoint is corrupt")
    return (codes.astype(np.int8) - 1).reshape(-1, *p.shape[1:])


@dataclass(frozen=True)
class Packing:
    """How one checkpoint family stores its linears. ``scale_suffix``: the per-tensor scale's name ending."""

    name: str
    scale_suffix: str = ".weight_scale"

    def logical_shape(self, name: str, dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if dtype == "U8" and name.endswith(".weight") and len(shape) == 2:
            return (shape[0] * VALUES_PER_BYTE, shape[1])
        return shape

    def decode(self, name: str, dtype: str, arr: np.ndarray) -> np.ndarray:
        """The float32 array edgekit works with for the stored ``arr``."""
        if dtype == "U8" and name.endswith(".weight"):
            return unpack_ternary(arr).astype(np.float32)
        if name.endswith(self.scale_suffix):
            s = np.asarray(arr, dtype=np.float32).reshape(-1)
            if s.size != 1 or not np.isfinite(s).all() or s[0] == 0:
                raise CorruptFileError(f"{name}: a BitNet weight_scale must be one finite non-zero number")
            return (np.float32(1.0) / s).astype(np.float32)
        return arr

    def check_config(self, cfg: dict, source: str) -> None:
        q = cfg.get("quantization_config") or {}
        if q.get("quant_method") != "bitnet" or q.get("quantization_mode", "offline") != "offline" \
                or q.get("linear_class", "bitlinear") != "bitlinear" or q.get("use_rms_norm"):
            raise UnsupportedError(
                f"{source}: edgekit reads BitNet checkpoints packed offline for BitLinear (quantization_config "
                f"quant_method 'bitnet', linear_class 'bitlinear', quantization_mode 'offline', no use_rms_norm); "
                f"this one has {q!r:.120}")
        act = cfg.get("hidden_act", "relu2")
        if act != "silu":
            raise UnsupportedError(
                f"{source}: hidden_act is {act!r}, but llama.cpp 0.3.36's bitnet graph computes SiLU in the FFN "
                "whatever the file says (llama.cpp PRs #25885, #26751), so the GGUF would give wrong logits; "
                "convert it once edgekit ships a llama.cpp with the fix")


BITNET = Packing("bitnet")
