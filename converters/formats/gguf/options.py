"""Typed options of the GGUF format: what the CLI's ``-O key=value`` and the SDK set.

The size and type choices (``--bits``, ``--type``, ``--bpw``, ``--tensor-type``) live on the recipe,
shared with every format; these are GGUF's own, named as llama-quantize names them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from edgekit.errors import InputError

if TYPE_CHECKING:
    from edgekit.converters.formats.base import ConvertRecipe


@dataclass(frozen=True)
class GGUFOptions:
    """How the GGUF file is written.

    output_type: ggml type of the output head (llama-quantize's ``--output-tensor-type``); with tied
        embeddings the token embedding is the head, so it takes this type.
    embed_type: ggml type of the token embedding (``--token-embedding-type``), when the head does not
        already set it.
    name: ``general.name`` in the file (default: the checkpoint folder's name).
    sparse_ffn: write the hot/cold sparse FFN (``--sparse-ffn S``): the share S of FFN neurons skipped per
        token; the file is a Qwen2-MoE whose shared expert is the hot set (see ``gguf/sparse.py``).
    sparse_clusters: cold clusters per layer (a power of two, default 16).
    """

    output_type: str | None = None
    embed_type: str | None = None
    name: str | None = None
    sparse_ffn: str | None = None
    sparse_clusters: str | None = None

    def __post_init__(self) -> None:
        from edgekit.converters.formats.gguf.mixes import type_from_name

        for value in (self.output_type, self.embed_type):
            if value is not None:
                type_from_name(value)  # an unknown type lists the known ones
        if self.name is not None and not str(self.name).strip():
            raise InputError("name= needs a non-empty model name")
        if self.sparse_ffn is not None or self.sparse_clusters is not None:
            self.sparse_config()

    def sparse_config(self):  # -> SparseFFNConfig (imported lazily: it is only needed with --sparse-ffn)
        from edgekit.converters.sparse_ffn.config import SparseFFNConfig

        try:
            s = float(self.sparse_ffn if self.sparse_ffn is not None else 0.5)
            clusters = int(self.sparse_clusters) if self.sparse_clusters is not None else 16
        except ValueError:
            raise InputError("--sparse-ffn takes a number like 0.5 and sparse_clusters an integer like 16") from None
        return SparseFFNConfig(sparsity=s, clusters=clusters)

    def overrides(self, tied: bool) -> tuple[tuple[str, str], ...]:
        """The options as ``--tensor-type`` pairs, ahead of the user's (the first match wins)."""
        out: list[tuple[str, str]] = []
        if self.output_type:
            out.append((r"^token_embd\.weight$" if tied else r"^output\.weight$", self.output_type))
        if self.embed_type:
            out.append((r"^token_embd\.weight$", self.embed_type))
        return tuple(out)

    @classmethod
    def from_recipe(cls, recipe: ConvertRecipe) -> GGUFOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(recipe.extra) - known)
        if unknown:
            raise InputError(f"unknown GGUF option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: (str(v) if v is not None else None) for k, v in recipe.extra.items()})
