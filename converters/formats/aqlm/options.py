"""Typed options of the AQLM format: the codebook scheme (``--bits``, ``-O scheme=``) or a size budget."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from edgekit.converters.formats.base import ConvertRecipe
from edgekit.converters.quantize.aqlm_kernel import AQLMScheme, parse_scheme
from edgekit.errors import InputError

#: ``--bits N``: N codebooks of 256 entries over groups of 8 weights (N bits per weight before scales).
_BITS = {1: "1x8", 2: "2x8", 3: "3x8", 4: "4x8"}
#: How the embedding (and an untied head) is stored: fp16 as AQLM's toolkit writes it, or float8 e4m3.
EMBEDDINGS = ("f16", "fp8")


@dataclass(frozen=True)
class AQLMOptions:
    """How the AQLM checkpoint is encoded.

    scheme: ``CODEBOOKSxBITS`` (``2x8``: two 256-entry codebooks per group, 2 bits per weight, the default;
        ``1x16``: one 65536-entry codebook, 1 MiB per linear). With ``--size``/``--bpw`` the number of 8-bit
        codebooks is chosen to fit.
    in_group: input columns per code group (8, as AQLM's kernels expect).
    embedding: ``f16`` (AQLM's own layout) or ``fp8``: the embedding and an untied head stored as float8 e4m3
        (round to nearest, no scale: transformers casts the stored values exactly to the model's dtype on
        load), half the bytes of the largest float tensors; a size budget then buys more codebooks.
    """

    scheme: str = "2x8"
    in_group: int = 8
    embedding: str = "f16"

    def __post_init__(self) -> None:
        parse_scheme(self.scheme, self.in_group)
        if self.embedding not in EMBEDDINGS:
            raise InputError(f"-O embedding={self.embedding}: give {' or '.join(EMBEDDINGS)}")

    @property
    def aqlm(self) -> AQLMScheme:
        return parse_scheme(self.scheme, self.in_group)

    @classmethod
    def from_recipe(cls, recipe: ConvertRecipe) -> AQLMOptions:
        if recipe.preset is not None or recipe.tensor_types or recipe.bpw_types:
            raise InputError("AQLM encodes every linear with one codebook scheme: give --bits 2 (2x8), "
                             "-O scheme=1x16, or a --size budget; not --type or --tensor-type")
        extra: dict[str, Any] = dict(recipe.extra)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise InputError(f"unknown AQLM option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if isinstance(extra.get("in_group"), str):
            try:
                extra["in_group"] = int(extra["in_group"])
            except ValueError:
                raise InputError(f"-O in_group={extra['in_group']!r}: give 4, 8, 16 or 32") from None
        if "scheme" not in extra and not recipe.budgeted:
            if recipe.bits not in _BITS:
                raise InputError(f"--bits {recipe.bits} has no AQLM scheme; use 2 (2x8), 1, 3, 4, or -O scheme=MxB")
            extra["scheme"] = _BITS[recipe.bits]
        return cls(**extra)
