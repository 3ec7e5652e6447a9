"""What an AQLM checkpoint's files hold: the weights file's name and how codes are stored."""

from __future__ import annotations

import numpy as np

MODEL_FILE = "model.safetensors"


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Codes in ``[0, 2^B)`` as the signed integers AQLM checkpoints store (``aqlm.utils.pack_int_data``: a
    code of ``2^(B-1)`` or more is stored as ``code - 2^B``; the reader takes it modulo ``2^B``)."""
    wide = codes.astype(np.int64)
    wide[wide >= 1 << (nbits - 1)] -= 1 << nbits
    return wide.astype(np.int8 if nbits <= 8 else np.int16)


def unpack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    return codes.astype(np.int64) % (1 << nbits)
