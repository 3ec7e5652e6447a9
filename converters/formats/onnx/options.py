"""Typed options of the ONNX format: what the CLI's ``-O key=value`` and the SDK set."""

from __future__ import annotations

from dataclasses import dataclass, fields

from edgekit.converters.formats.base import ConvertRecipe
from edgekit.converters.quantize.nbits import NBitsType
from edgekit.errors import InputError, UnsupportedError

_OPSETS = range(17, 24)


@dataclass(frozen=True)
class OnnxOptions:
    """How the ONNX artifact is built.

    bits: 4 or 8 (MatMulNBits), 16 or 32 (float graph, no quantization).
    block_size: weights per quantization block along the input dimension (16..256, a power of two).
    symmetric: zero point fixed at 2**(bits-1) (None: asymmetric for 4 bits, symmetric for 8).
    dtype: "fp32" or "fp16" activations and float weights (bits 16 implies fp16).
    embed: "float", "int8" (GatherBlockQuantized), or "shared": the embedding reads the quantized lm_head's
        own tensors (one copy; checkpoints with tied embeddings; the default for them when quantized).
    lm_head: "int8", "int4", "float", or "tied" (a MatMul reading the float embedding table: one copy;
        checkpoints with tied embeddings); default: the body's bit width (int4 for 4-bit, as onnxruntime's
        tools do: the head is read for every token, so an 8-bit head costs about 15% of decode speed on
        SmolLM2; ``int8`` buys back quality), and for a float graph "tied" where the checkpoint ties its
        head to the embedding, else "float" (a second table only where the checkpoint has one).
    accuracy_level: MatMulNBits compute accuracy (4: int8 activations, fastest on CPU; 1: fp32).
    opset: the ai.onnx opset (17..23). external_data: weights in model.onnx.data (False: one file,
    only possible under protobuf's 2 GiB limit).
    sensitivity: how a size budget (``--bpw``/``--size``) weighs each tensor's rounding error: "fisher" (each
        output channel's Hessian-weighted error times how much the loss cares about that channel, measured by
        one backward pass: errors of the head and of every layer on one scale) or "hessian" (the plain
        Hessian-weighted output error, every tensor alike).
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool | None = None
    dtype: str = "fp32"
    embed: str | None = None
    lm_head: str | None = None
    accuracy_level: int = 4
    opset: int = 21
    external_data: bool = True
    sensitivity: str = "fisher"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16, 32):
            raise InputError(f"--bits {self.bits} is not available for ONNX; use 4 or 8 (MatMulNBits), 16 or 32 (float)")
        if self.dtype not in ("fp32", "fp16"):
            raise InputError(f"--dtype {self.dtype!r}: use fp32 or fp16")
        if self.opset not in _OPSETS:
            raise UnsupportedError(f"opset {self.opset} is not supported; use {_OPSETS.start}..{_OPSETS.stop - 1}")
        if self.embed not in (None, "float", "int8", "shared"):
            raise InputError(f"embed={self.embed!r}: use float, int8 or shared")
        if self.lm_head not in (None, "int8", "int4", "float", "tied"):
            raise InputError(f"lm_head={self.lm_head!r}: use int8, int4, float or tied")
        if self.lm_head == "tied" and self.embed_mode == "int8":
            raise InputError("lm_head=tied shares the float embedding table; use it with embed=float")
        if self.sensitivity not in ("fisher", "hessian"):
            raise InputError(f"sensitivity={self.sensitivity!r}: use fisher or hessian")
        if self.accuracy_level not in range(5):
            raise InputError("accuracy_level must be 0..4")
        if self.quantized:
            self.grid  # validates the block size  # noqa: B018

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    @property
    def graph_dtype(self) -> str:
        return "fp16" if self.bits == 16 else self.dtype

    @property
    def grid(self) -> NBitsType:
        sym = self.symmetric if self.symmetric is not None else self.bits == 8
        return NBitsType(self.bits, self.block_size, sym)

    @property
    def embed_mode(self) -> str:
        return self.embed or ("int8" if self.quantized else "float")

    def resolve(self, tied: bool) -> OnnxOptions:
        """Fill in the embedding and head defaults for this checkpoint and check their pairing: a tied
        checkpoint stores one table, shared by a quantized head (``embed=shared``) or read by a float one
        (``lm_head=tied``, as fast as a second copy: measured on SmolLM2, see :func:`.weights._lm_head`)."""
        from dataclasses import replace

        embed = self.embed
        head_quantized = self.lm_head_grid() is not None
        if embed is None:
            embed = "shared" if tied and head_quantized else self.embed_mode
        if embed == "shared" and not (tied and head_quantized):
            raise InputError("embed=shared needs a checkpoint with tied embeddings and a quantized lm_head "
                             "(lm_head=int8 or int4)")
        lm_head = self.lm_head_mode
        if self.lm_head is None and tied and not head_quantized and embed == "float":
            lm_head = "tied"
        if lm_head == "tied" and not tied:
            raise InputError("lm_head=tied reads the head from the embedding table, but this checkpoint has "
                             "lm_head weights of its own; drop lm_head=tied")
        return replace(self, embed=embed, lm_head=lm_head)

    @property
    def lm_head_mode(self) -> str:
        return self.lm_head or ({4: "int4", 8: "int8"}.get(self.bits, "float"))

    def lm_head_grid(self) -> NBitsType | None:
        mode = self.lm_head_mode
        if mode == "int8":
            return NBitsType(8, self.block_size, True)
        if mode == "int4":
            return NBitsType(4, self.block_size, self.grid.symmetric if self.quantized else False)
        return None

    @classmethod
    def from_recipe(cls, recipe: ConvertRecipe) -> OnnxOptions:
        if (recipe.budgeted or recipe.tensor_types) and recipe.bits not in (None, 4, 8):
            raise InputError("--bpw, --size and --tensor-type choose MatMulNBits grids; use them with a quantized "
                             "ONNX model (--bits 4 or 8, or no --bits)")
        for grid in [g for _, g in recipe.tensor_types] + list(recipe.bpw_types):
            NBitsType.parse(grid)  # a ggml type name here is a mistake worth a clear message
        known = {f.name for f in fields(cls)} - {"bits"}
        extra = dict(recipe.extra)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise InputError(f"unknown ONNX option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        bits = recipe.bits
        if recipe.preset:
            p = recipe.preset.upper()
            if p in ("F32", "FP32"):
                bits = 32
            elif p in ("F16", "FP16"):
                bits = 16
            else:
                g = NBitsType.parse(p)
                bits = g.bits
                extra.setdefault("block_size", g.block)
                extra.setdefault("symmetric", g.symmetric)
        return cls(bits=int(bits or 4), **extra)
