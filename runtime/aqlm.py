"""Run Hugging Face AQLM checkpoints: transformers with the ``aqlm`` package's layers, edgekit's CPU kernels.

transformers builds the model with ``aqlm.QuantizedLinear`` layers from the checkpoint's ``quantization_config``
(no remote code, safetensors only); the codes stay codes in memory. The matrix products are edgekit's
(``kernel="edgekit"``, the default): for a few tokens a look-up table per input group (``x_group .
codeword`` for every codeword, one matrix product), then a gather-and-sum over the codes compiled by numba
with blocks of output rows split between threads (each thread owns its outputs: no race), or in PyTorch where
numba is missing; for longer inputs the weights are decoded into a temporary for one matrix product. ``kernel="aqlm"`` keeps the package's own CPU kernel
(numba), whose parallel loop adds into shared outputs without atomics (Vahe1994/AQLM#86): with more than
one thread its results vary from run to run; edgekit's are deterministic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import BackendError, InputError, quiet_transformers, require
from edgekit.jit import numba_kernel
from edgekit.runtime.base import register_backend
from edgekit.runtime.torch_ref import TorchBackend

KERNELS = ("edgekit", "aqlm")
#: At most this many tokens go through the look-up tables; more decode the weights once per call.
LUT_MAX_TOKENS = 4


@dataclass
class AQLMMemoryEstimate:
    ram_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    n_ctx: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ram_bytes": self.ram_bytes, "ram_required_bytes": self.ram_bytes, "vram_bytes": 0,
                "parts": self.parts, "n_ctx": self.n_ctx,
                "runtime": "transformers + aqlm on the CPU (codes + float32 rest + float32 KV cache, estimated)"}


def _folder(model_path: str | Path) -> Path:
    p = Path(model_path).expanduser()
    return p if p.is_dir() else p.parent


def _sizes(folder: Path) -> tuple[dict[str, Any], int]:
    """config.json, and the bytes the weights take once loaded (codes as stored, floats as float32): also what
    one decoded token reads."""
    from edgekit.converters.formats.aqlm.layout import MODEL_FILE
    from edgekit.converters.formats.aqlm.read import _header, loaded_bytes, read_config

    cfg, _ = read_config(folder)
    return cfg, loaded_bytes(_header(folder / MODEL_FILE))


def _kv_bytes(cfg: dict[str, Any], tokens: int) -> int:
    n_kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    return 2 * int(cfg["num_hidden_layers"]) * n_kv * head_dim * tokens * 4


def lut_matmul(torch: Any, x: Any, codes: Any, books: Any, scales: Any) -> Any:
    """``x (T, in) @ W^T`` for AQLM codes ``(out, groups, M)`` (long), codebooks ``(M, K, g)`` and row scales
    ``(out,)``: per token, a table of every group's product with every codeword, then a gather-and-sum."""
    M, K, g = books.shape
    out, groups, _ = codes.shape
    T = x.shape[0]
    lut = torch.einsum("tjd,mkd->tjmk", x.reshape(T, groups, g), books).reshape(T, groups * M * K)
    offs = (torch.arange(groups).reshape(1, groups, 1) * M + torch.arange(M).reshape(1, 1, M)) * K
    idx = (codes + offs).reshape(-1)
    return lut[:, idx].reshape(T, out, groups * M).sum(-1) * scales


#: output rows each thread sums at a time in the compiled kernel: their running sums stay in registers and
#: L1 while one input group's table (M x K floats) is read for all of them
ROW_BLOCK = 64


@numba_kernel
def numba_gather(numba: Any) -> Any:
    """The compiled gather-and-sum ``(lut (T, G, M, K), codes (B, G, ROW_BLOCK, M) as :func:`block_codes` lays
    them out, scales (O,), out (T, O))``, or None without numba. Blocks of output rows are split between
    threads (each owns its outputs: no race); within a block the input groups go outermost, so a group's
    table stays in L1 while every row of the block reads it (row-outermost swept the whole table, hundreds
    of KB, for each row). Each row still sums group by group, codebook by codebook: the same floats in the
    same order, so the result is bit-identical to the row-by-row loop."""

    @numba.njit(parallel=True, cache=False)
    def gather(lut: Any, codes: Any, scales: Any, out: Any) -> None:  # pragma: no cover - compiled
        T, G, M, K = lut.shape
        n_rows = out.shape[1]
        for b in numba.prange(codes.shape[0]):
            lo = b * ROW_BLOCK
            n = min(ROW_BLOCK, n_rows - lo)
            acc = np.empty(ROW_BLOCK, np.float32)
            for t in range(T):
                acc[:] = 0
                if M == 2:  # 2x8, the common AQLM shape: the two tables as flat rows, no inner loop
                    for j in range(G):
                        t0, t1, cj = lut[t, j, 0], lut[t, j, 1], codes[b, j]
                        for r in range(n):
                            acc[r] = acc[r] + t0[cj[r, 0]] + t1[cj[r, 1]]
                else:
                    for j in range(G):
                        table, cj = lut[t, j], codes[b, j]
                        for r in range(n):
                            s = acc[r]
                            for m in range(M):
                                s += table[m, cj[r, m]]
                            acc[r] = s
                for r in range(n):
                    out[t, lo + r] = acc[r] * scales[lo + r]

    return gather


def block_codes(stored: np.ndarray, K: int) -> np.ndarray:
    """Codes ``(O, G, M)`` as the checkpoint stores them (int8/int16, a code of K/2 or more as ``code - K``)
    laid out for :func:`numba_gather`: unsigned, in blocks of :data:`ROW_BLOCK` rows, group-major within a
    block ``(O / ROW_BLOCK, G, ROW_BLOCK, M)`` (the last block padded with code 0)."""
    n_rows, G, M = stored.shape
    codes = stored.astype(np.int64)
    codes = np.where(codes < 0, codes + K, codes).astype(np.uint8 if K <= 256 else np.uint16)
    n_blocks = -(-n_rows // ROW_BLOCK)
    padded = np.zeros((n_blocks * ROW_BLOCK, G, M), codes.dtype)
    padded[:n_rows] = codes
    return np.ascontiguousarray(padded.reshape(n_blocks, ROW_BLOCK, G, M).transpose(0, 2, 1, 3))


def unblock_codes(blocked: np.ndarray, n_rows: int) -> np.ndarray:
    """:func:`block_codes` undone: unsigned codes ``(O, G, M)``."""
    n_blocks, G, _, M = blocked.shape
    return blocked.transpose(0, 2, 1, 3).reshape(n_blocks * ROW_BLOCK, G, M)[:n_rows]


def dequantize(torch: Any, codes: Any, books: Any, scales: Any) -> Any:
    out, groups, M = codes.shape
    w = books[0][codes[..., 0]]
    for m in range(1, M):
        w = w + books[m][codes[..., m]]
    return w.reshape(out, -1) * scales[:, None]


def _edgekit_ops(torch: Any, module: Any) -> None:
    """Install edgekit's kernels on one ``aqlm.QuantizedLinear`` (before its first forward, so the package
    never re-lays its codes out for its own kernel)."""
    K = module.codebooks.shape[1]
    M = module.codebooks.shape[0]
    n_rows = module.codes.shape[0]
    # the one copy of the codes the layer keeps, in the compiled kernel's layout (module.codes holds it)
    blocked = block_codes(module.codes.detach().numpy(), K)
    module.codes.data = torch.from_numpy(blocked)

    def operands() -> tuple[Any, Any, Any]:
        codes = torch.from_numpy(unblock_codes(blocked, n_rows)).long()
        return codes, module.codebooks[:, :, 0, :], module.scales.reshape(-1)

    gather = numba_gather()
    books2d = module.codebooks.detach()[:, :, 0, :].reshape(-1, module.codebooks.shape[-1])  # (M*K, g)
    scales = module.scales.detach().reshape(-1).contiguous().numpy()

    def gemv(x: Any, *_: Any) -> Any:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if gather is None:
            y = lut_matmul(torch, x2, *operands())
        else:
            T, groups = x2.shape[0], blocked.shape[1]
            lut = (x2.detach().reshape(T, groups, -1) @ books2d.T).reshape(T, groups, M, K)
            y = torch.empty(T, n_rows)
            gather(lut.contiguous().numpy(), blocked, scales, y.numpy())
        y = y + module.bias if module.bias is not None else y
        return y.reshape(*shape[:-1], -1)

    def gemm(x: Any, *_: Any) -> Any:
        y = torch.nn.functional.linear(x, dequantize(torch, *operands()), module.bias)
        return y

    class _Op:
        def __init__(self, fn: Any) -> None:
            self.apply = fn

    module.gemv_op, module.gemm_op = _Op(gemv), _Op(gemm)
    module.use_gemv_rule = lambda x: int(np.prod(x.shape[:-1])) <= LUT_MAX_TOKENS


@register_backend("aqlm")
class AQLMBackend(TorchBackend):
    """An AQLM checkpoint (config.json with an AQLM ``quantization_config`` + model.safetensors).

    ``n_ctx``: most tokens a sequence may hold. ``n_threads``: PyTorch threads. ``kernel``: edgekit (the
    default) or aqlm (the package's numba kernel). ``n_batch``: accepted for the profiler; unused.
    """

    name = "aqlm"
    formats = ("aqlm",)
    preference = 0
    incremental = True

    @classmethod
    def memory_estimate(cls, model_file: Path, n_ctx: int, n_batch: int = 512) -> AQLMMemoryEstimate:
        """The weights as loaded (codes, float32 codebooks, scales and float tensors), transformers' float32 KV
        cache for ``n_ctx`` tokens, one batch's logits. A model, not a measurement."""
        cfg, loaded = _sizes(_folder(model_file))
        parts = {"weights": loaded, "kv_cache": _kv_bytes(cfg, n_ctx),
                 "logits": min(n_batch, n_ctx) * int(cfg["vocab_size"]) * 4}
        return AQLMMemoryEstimate(sum(parts.values()), parts, n_ctx)

    @classmethod
    def decode_bytes_per_token(cls, model_file: Path, depth: int, n_ctx: int, type_k: str = "f16",
                               type_v: str = "f16") -> int:
        cfg, per_token = _sizes(_folder(model_file))
        return per_token + _kv_bytes(cfg, min(depth, n_ctx))

    def __init__(self, model_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 kernel: str = "edgekit", n_batch: int = 512):
        if kernel not in KERNELS:
            raise InputError(f"kernel {kernel!r}: use one of {', '.join(KERNELS)}")
        torch = require("torch", "torch")
        transformers = require("transformers", "torch")
        require("aqlm", "aqlm")
        from edgekit.converters.formats.aqlm.read import read_config
        from edgekit.runtime import hostinfo

        folder = _folder(model_path)
        read_config(folder)  # an AQLM checkpoint, or a one-line error
        self._torch, self.n_ctx, self.kernel, self.folder = torch, n_ctx, kernel, folder
        # process-wide settings (transformers' logging, torch's thread pool): close() gives the caller's back
        with contextlib.ExitStack() as scope:
            scope.enter_context(quiet_transformers(transformers))
            scope.enter_context(hostinfo.torch_threads(torch, hostinfo.check_threads(n_threads)
                                                       or hostinfo.physical_cores()))
            self._load(transformers, folder, kernel)
            self._restore = scope.pop_all()
        self._past: Any = None
        self._pos = 0

    def _load(self, transformers: Any, folder: Path, kernel: str) -> None:
        torch = self._torch
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                                                        local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
                local_files_only=True).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackendError(f"transformers could not load the AQLM checkpoint {folder}: {str(exc)[:300]}") from exc
        from aqlm import QuantizedLinear

        self.n_quantized = 0
        for module in self.model.modules():
            if isinstance(module, QuantizedLinear):
                self.n_quantized += 1
                if kernel == "edgekit":
                    _edgekit_ops(torch, module)
        if not self.n_quantized:
            raise BackendError(f"{folder}: transformers built no AQLM layers; is the aqlm package current?")

    def reset(self) -> None:
        self._past, self._pos = None, 0

    def decode(self, tokens: list[int]) -> None:
        if self._pos + len(tokens) > self.n_ctx:
            raise InputError(f"the context holds {self.n_ctx} tokens; {self._pos + len(tokens)} would overflow it")
        torch = self._torch
        with torch.inference_mode():
            res = self.model(torch.tensor([tokens]), past_key_values=self._past, use_cache=True, logits_to_keep=1)
        self._past, self._pos = res.past_key_values, self._pos + len(tokens)
