"""GGUF writer: architecture metadata, tokenizer, and tensors in any ggml type edgekit encodes.

Tensors are streamed: the header (metadata and tensor table) is written first, then each tensor
is loaded, encoded (in the checkpoint's layout), put in llama.cpp's row order (Q/K interleaved for
llama's rope) and written before the next is read, so memory stays at about one tensor.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

import edgekit.converters.formats.gguf.mixes as mixes
from edgekit.arch import permute_for_rope
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.base import (
    ConvertRecipe,
    Format,
    ProgressFn,
    no_progress,
    quantizer_timings,
    register_format,
)
from edgekit.converters.formats.gguf.options import GGUFOptions
from edgekit.converters.formats.gguf.vocab import read_vocab
from edgekit.converters.quantize.base import Quantizer
from edgekit.converters.structure.width import cut_padding, own_shape
from edgekit.errors import CorruptFileError, DiskFullError, EdgekitError, InputError, UnsupportedError
from edgekit.fsutil import check_free_space
from edgekit.model import HFCheckpoint


@dataclass
class PlannedTensor:
    """One tensor of the output: where it comes from, its GGUF name and numpy shape, its type."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    assignment: mixes.Assignment

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return self.assignment.type

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def _order_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def gguf_arch(ckpt: HFCheckpoint) -> str:
    """llama.cpp's architecture for ``ckpt``: its family's, or ``deci`` (the Llama graph with per-block
    widths) when width:auto pruning gave its blocks FFN widths of their own."""
    if ckpt.hparams.ffn_widths is None:
        return ckpt.spec.gguf_arch
    if ckpt.spec.gguf_arch != "llama":
        raise UnsupportedError(f"per-block FFN widths run in llama.cpp's deci architecture, a Llama graph; "
                               f"{ckpt.spec.gguf_arch} models take uniform width pruning (width:ffn=N) instead")
    return "deci"


def _drop_padding(ckpt: HFCheckpoint, t: PlannedTensor, data: np.ndarray) -> np.ndarray:
    """A zero-padded FFN tensor's encoded rows (calibrated methods encode the checkpoint's padded
    weights) cut to ``t``'s own shape; other tensors pass unchanged."""
    if ckpt.hparams.ffn_widths is None:
        return data
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    keep = t.shape[-1] // block * size if data.dtype == np.uint8 else t.shape[-1]
    return cut_padding(data, int(np.prod(t.shape[:-1], dtype=np.int64)), keep)


def plan_tensors(ckpt: HFCheckpoint, recipe: ConvertRecipe, has_imatrix: bool = False) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name and ggml type (preset mix, overrides, fallbacks);
    ``has_imatrix``: the quantizer weights its rounding by an importance matrix."""
    hp, spec = ckpt.hparams, ckpt.spec
    mapped: list[tuple[str, str, tuple[int, ...]]] = []
    for hf_name, ref in ckpt.tensors.items():
        if hf_name == "lm_head.weight" and hp.tie_embeddings:
            continue
        name = spec.gguf_name(hf_name)
        if name is not None:
            mapped.append((hf_name, name, own_shape(hp, name, ref.shape)))
    mapped.sort(key=lambda t: _order_key(t[1]))
    infos = [mixes.TensorInfo(name=name, shape=tuple(reversed(shape))) for _, name, shape in mapped]
    arch = mixes.ArchInfo(n_layer=hp.n_layer, n_head=hp.n_head, n_head_kv=hp.n_head_kv, arch=gguf_arch(ckpt))
    opts = GGUFOptions.from_recipe(recipe)
    overrides = [*opts.overrides(hp.tie_embeddings or "lm_head.weight" not in ckpt.tensors), *recipe.tensor_types]
    assignments = mixes.assign_types(infos, _preset_name(recipe), arch, overrides=overrides, has_imatrix=has_imatrix)
    plan = [PlannedTensor(hf, name, shape, assignments[name]) for hf, name, shape in mapped]
    if (factors := hp.rope_freq_factors()) is not None:  # computed, not read: no checkpoint tensor (hf_name "")
        plan.insert(0, PlannedTensor("", ROPE_FREQS, factors.shape,
                                     mixes.Assignment(type=gguf.GGMLQuantizationType.F32, origin="kept")))
    return plan


# Llama 3's rope scaling: one F32 divisor per rotary frequency, which llama.cpp applies in every layer
ROPE_FREQS = "rope_freqs.weight"


def to_gguf_layout(ckpt: HFCheckpoint, gguf_name: str, rows: np.ndarray) -> np.ndarray:
    """HF row order -> llama.cpp row order for this tensor (Q/K rows interleaved for llama's rope).

    Works on float weights and equally on encoded bytes (one row of blocks per weight row).
    """
    if ckpt.spec.permute_qk:
        if gguf_name.endswith("attn_q.weight"):
            return permute_for_rope(rows, ckpt.hparams.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return permute_for_rope(rows, ckpt.hparams.n_head_kv)
    return rows


def _preset_name(recipe: ConvertRecipe) -> str:
    """The preset whose rules shape the file; a --bpw budget starts from Q4_K_M's structure."""
    if recipe.preset:  # as llama-quantize names it, however it was typed (bf16 -> BF16, q4_k -> Q4_K_M)
        try:
            return mixes.preset_from_name(recipe.preset).name
        except EdgekitError:
            return recipe.preset.strip().upper()
    return mixes.preset_for_bits(recipe.bits).name if not recipe.budgeted else "Q4_K_M"


def _written_preset(preset: str, plan: list[PlannedTensor], recipe: ConvertRecipe) -> str:
    """The preset that names the file: the one asked for, or F16 when no tensor could take a quantized
    type (every row too narrow for its blocks), so that the label says what the file holds."""
    if recipe.budgeted or mixes.preset_from_name(preset).base in mixes._FLOAT_TYPES:
        return preset
    if all(t.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) for t in plan):
        return "F16"
    return preset


def window_note(checkpoint: HFCheckpoint) -> str | None:
    """A warning when the model's attention slides over fewer tokens than its trained context: llama.cpp's
    llama and qwen2 graphs attend to every past token, so the file matches the model only up to the window
    (written as its context_length, which the beyond-the-trained-context notes read)."""
    hp = checkpoint.hparams
    if hp.sliding_window is None or hp.sliding_window >= hp.n_ctx_train:
        return None
    return (f"warning: this model attends to the last {hp.sliding_window} tokens only (sliding_window), which "
            f"llama.cpp does not apply: the GGUF matches it up to {hp.sliding_window} tokens of context, recorded "
            "as its context length; for longer contexts convert with --to onnx")


def _budget_split(plan: list[PlannedTensor]) -> tuple[list[PlannedTensor], int]:
    """The tensors a budget re-types (those the preset's rules typed) and the bytes of the others, which
    keep their types."""
    # An embedding table that is only looked up (the head has its own weight) multiplies no activations,
    # so there is no Hessian to weigh its error by: it keeps the preset's type, counted as fixed.
    tied = not any(t.name == "output.weight" for t in plan)
    free = [t for t in plan if t.assignment.origin == "preset" and (tied or t.name != "token_embd.weight")]
    return free, sum(t.nbytes for t in plan) - sum(t.nbytes for t in free)


def apply_budget(ckpt: HFCheckpoint, plan: list[PlannedTensor], recipe: ConvertRecipe, calib: CalibConfig,
                 progress: ProgressFn, metadata_bytes: int = 0, imatrix: bool = True) -> dict[str, Any]:
    """Re-type the preset's quantized tensors so the file lands at ``recipe.bpw`` (see budget.py), or at
    ``recipe.size`` bytes: the tensors get what the file's ``metadata_bytes`` (header, vocabulary, tensor
    table) and the worst-case alignment padding leave. ``imatrix``: the method rounds with an importance
    matrix (else the types llama.cpp refuses to write unweighted are not candidates)."""
    import edgekit.converters.formats.gguf.budget as budget

    free, fixed = _budget_split(plan)
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    allowed = frozenset(mixes.type_from_name(n) for n in recipe.bpw_types) or None
    bpw, what = recipe.bpw, None
    if recipe.size is not None:
        tensor_room = recipe.size - metadata_bytes - _ALIGN * len(plan)
        bpw, what = 8 * max(tensor_room, 0) / n_params, f"--size {recipe.size / 1e6:.4g}MB"
    assert bpw is not None
    types, report = budget.assign(ckpt, {t.name: t.shape for t in free}, fixed, n_params, bpw, calib,
                                  progress, allowed, what=what, metadata_bytes=metadata_bytes, imatrix=imatrix)
    for t in free:
        # rows no block type holds stay F16 as under the preset: the fallback it recorded still says why
        was = t.assignment if t.shape[-1] % 32 else mixes.Assignment(type=types[t.name], origin="budget")
        t.assignment = mixes.Assignment(type=types[t.name], origin="budget", wanted=was.wanted, reason=was.reason)
    if recipe.size is not None:
        report.update(size_target=recipe.size, metadata_bytes=metadata_bytes)
    return report


_ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT  # each tensor's data starts on this boundary


def _add_header(writer: gguf.GGUFWriter, checkpoint: HFCheckpoint, recipe: ConvertRecipe, vocab: Any, preset: str,
                kv: dict[str, Any]) -> None:
    """The file's metadata: name, file type, the architecture's keys ``kv``, the vocabulary, the chat template."""
    writer.add_name(GGUFOptions.from_recipe(recipe).name or checkpoint.path.name)
    writer.add_file_type(mixes.preset_from_name(preset).ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in kv.items():
        _add_kv(writer, key, value)
    vocab.set_chat_template(checkpoint.chat_template())
    vocab.add_to(writer)


def _new_writer(checkpoint: HFCheckpoint, recipe: ConvertRecipe, vocab: Any, preset: str,
                plan: list[PlannedTensor]) -> gguf.GGUFWriter:
    """A writer holding the file's metadata and tensor table (nothing written yet)."""
    arch = gguf_arch(checkpoint)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    kv = {**checkpoint.hparams.gguf_kv(arch), **{f"{arch}.{k}": v for k, v in checkpoint.spec.gguf_extra.items()}}
    _add_header(writer, checkpoint, recipe, vocab, preset, kv)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return writer


def metadata_bytes(checkpoint: HFCheckpoint, recipe: ConvertRecipe, vocab: Any, plan: list[PlannedTensor],
                   scratch: Path) -> int:
    """Bytes of the file before its tensor data (header, metadata with the vocabulary, tensor table),
    measured by writing them to a scratch file: a tensor's entry in the table has the same size whatever
    its type, so this holds for any types a budget then picks."""
    probe = scratch / ".metadata-probe.gguf"
    writer = _new_writer(checkpoint, recipe, vocab, _preset_name(recipe), plan)
    try:
        writer.write_header_to_file(probe)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return probe.stat().st_size
    finally:
        probe.unlink(missing_ok=True)


def _encode_in_order(
    ckpt: HFCheckpoint, plan: list[PlannedTensor], quantizer: Quantizer
) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Load and encode tensors on a few threads (numpy releases the GIL in the kernels), yielding them in
    file order; at most ``2 * threads`` tensors are in memory at once. Quantizers see the checkpoint's own
    layout; llama.cpp's row order is applied here, to the encoded rows (each row's blocks stay whole)."""

    def encode(t: PlannedTensor) -> np.ndarray:
        if t.name == ROPE_FREQS:
            return ckpt.hparams.rope_freq_factors()
        w = ckpt.load(t.hf_name)
        if w.shape != t.shape:  # per-block FFN widths: the checkpoint's zero padding is not written
            w = w[tuple(slice(0, n) for n in t.shape)]
        # the kernels' own check cannot say which tensor; a float64 sum is non-finite exactly when a value is
        if w.dtype.kind == "f" and not np.isfinite(np.sum(w, dtype=np.float64)):
            raise CorruptFileError(f"{ckpt.path}: tensor {t.hf_name} holds NaN or infinite values; re-download the "
                                   "model (or fix the training run that wrote it)")
        return to_gguf_layout(ckpt, t.name, _drop_padding(ckpt, t, quantizer.quantize(t.name, w, t.qtype)))

    threads = min(os.cpu_count() or 1, 8) if quantizer.parallel_safe else 1
    if threads == 1:
        yield from ((t, encode(t)) for t in plan)
        return
    window: deque[tuple[PlannedTensor, Future[np.ndarray]]] = deque()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            for t in plan:
                window.append((t, pool.submit(encode, t)))
                if len(window) >= 2 * threads:
                    head, fut = window.popleft()
                    yield head, fut.result()
            while window:
                head, fut = window.popleft()
                yield head, fut.result()
        finally:
            for _, fut in window:
                fut.cancel()


def _add_kv(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, list):  # per-layer values (deci's feed_forward_length)
        writer.add_array(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


@register_format("gguf")
class GGUFFormat(Format):
    """llama.cpp's single-file format."""

    name = "gguf"
    options_class = GGUFOptions
    model_filename = "model.gguf"

    def convert(
        self,
        checkpoint: HFCheckpoint,
        out_dir: Path,
        recipe: ConvertRecipe,
        quantizer: Quantizer,
        progress: ProgressFn = no_progress,
    ) -> dict[str, Any]:
        checkpoint.require_tokenizer()
        if GGUFOptions.from_recipe(recipe).sparse_ffn is not None and checkpoint.hparams.ffn_widths is not None:
            raise InputError("--sparse-ffn splits FFNs of one width; this checkpoint has per-block widths "
                             "(width:auto): convert its unpruned source, or drop --sparse-ffn")
        if GGUFOptions.from_recipe(recipe).sparse_ffn is not None and checkpoint.hparams.rope_kind == "llama3":
            raise UnsupportedError("--sparse-ffn writes a Qwen2-MoE file, which has no place for Llama 3's rope "
                                   "scaling; drop --sparse-ffn")
        plan = plan_tensors(checkpoint, recipe, quantizer.uses_imatrix)
        vocab = read_vocab(checkpoint.path, checkpoint.hparams.n_vocab)
        budget_report = None
        if recipe.budgeted:
            calib = recipe.calib or getattr(quantizer.config, "calib", None) or CalibConfig()
            meta = metadata_bytes(checkpoint, recipe, vocab, plan, out_dir) if recipe.size is not None else 0
            budget_report = apply_budget(checkpoint, plan, recipe, calib, progress, meta, quantizer.uses_imatrix)
        total = sum(t.nbytes for t in plan)
        check_free_space(out_dir, total, "the GGUF file", headroom=64 << 20)
        quantizer.prepare(checkpoint, {t.name: t.qtype for t in plan}, progress)

        preset = _written_preset(_preset_name(recipe), plan, recipe)
        path = out_dir / self.model_filename
        opts = GGUFOptions.from_recipe(recipe)
        if opts.sparse_ffn is not None:
            def header(w: gguf.GGUFWriter, kv: dict[str, object]) -> None:
                _add_header(w, checkpoint, recipe, vocab, preset, kv)

            return self._convert_sparse(checkpoint, path, recipe, quantizer, opts, plan, progress, header, preset,
                                        vocab.pre, vocab.note())
        writer = _new_writer(checkpoint, recipe, vocab, preset, plan)
        try:
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, (t, data) in enumerate(_encode_in_order(checkpoint, plan, quantizer)):
                progress(f"encoding {t.name} as {t.qtype.name}", i, len(plan))
                if data.nbytes != t.nbytes:
                    raise AssertionError(f"{t.name}: encoder gave {data.nbytes} bytes, expected {t.nbytes}")
                writer.write_tensor_data(data)
            progress("done", len(plan), len(plan))
        except OSError as exc:
            if exc.errno == 28:
                raise DiskFullError("the disk filled up while writing the GGUF file; free space and retry") from exc
            raise
        finally:
            writer.close()
        fields = self._manifest_fields(plan, path, recipe.budget_label() or preset, vocab.pre)
        if budget_report is not None:
            fields["budget"] = {k: v for k, v in budget_report.items() if k != "errors"}
        notes = [bits_note(recipe, plan, fields, quantizer.uses_imatrix, checkpoint), window_note(checkpoint),
                 vocab.note()]
        if any(notes):
            fields["notes"] = [n for n in notes if n]
        return {**fields, **quantizer_timings(quantizer)}

    def default_output_suffix(self, recipe: ConvertRecipe) -> str:
        """``gguf-q4_k_m`` (the preset that ``--bits`` stands for), ``gguf-q4_0``, ``gguf-90mb``, ``gguf-3.5bpw``."""
        return f"gguf-{(recipe.budget_label() or _preset_name(recipe)).lower()}"

    @staticmethod
    def _convert_sparse(checkpoint: HFCheckpoint, path: Path, recipe: ConvertRecipe, quantizer: Quantizer,
                        opts: GGUFOptions, plan: list[PlannedTensor], progress: ProgressFn, header: Any, preset: str,
                        pre: str | None, vocab_note: str | None = None) -> dict[str, Any]:
        """``--sparse-ffn S``: the hot/cold FFN as a Qwen2-MoE file (see :mod:`.sparse`)."""
        import edgekit.converters.formats.gguf.sparse as sparse

        cfg = opts.sparse_config()
        tensors, step = sparse.write_sparse(
            checkpoint, path, recipe, quantizer, cfg, plan, progress,
            lambda w: header(w, sparse.hparams_kv(checkpoint, cfg)))
        planned = [PlannedTensor("", t.name, t.shape, mixes.Assignment(type=t.qtype, origin="sparse_ffn"))
                   for t in tensors]
        fields = GGUFFormat._manifest_fields(planned, path, f"{preset}+sparse", pre)
        fields["sparse_ffn"] = sparse.sparse_fields(cfg, checkpoint, step)
        fields["notes"] = [n for n in (sparse.quality_note(fields["sparse_ffn"]), vocab_note) if n]
        return fields

    def describe(self, art: Any, ctx: int = 4096) -> dict[str, Any]:
        from edgekit.converters.formats.gguf.read import describe_gguf

        return describe_gguf(art, ctx)

    @staticmethod
    def _manifest_fields(plan: list[PlannedTensor], path: Path, preset: str, pre: str | None) -> dict[str, Any]:
        n_params = sum(int(np.prod(t.shape)) for t in plan)
        tensors = {}
        for t in plan:
            entry: dict[str, Any] = {"type": t.qtype.name, "shape": list(reversed(t.shape))}
            if t.assignment.wanted is not None:
                entry["wanted"] = t.assignment.wanted.name
                entry["fallback_reason"] = t.assignment.reason
            tensors[t.name] = entry
        size = path.stat().st_size
        return {
            "files": {"model": path.name},
            "preset": preset,
            "n_params": n_params,
            "size_bytes": size,
            "tensor_bytes": sum(t.nbytes for t in plan),
            "bpw": round(8 * sum(t.nbytes for t in plan) / n_params, 4),
            "tokenizer_pre": pre,
            "tensors": tensors,
        }


# How far above --bits N (or a --type's own type) a file may land before the user is told (Q4_K_M is about
# 4.9 bpw on models whose rows hold whole K-quant blocks; rows of 576 weights fall back to wider legacy types).
BITS_SLACK = 1.5


def _budget_floor(checkpoint: HFCheckpoint, recipe: ConvertRecipe, imatrix: bool) -> tuple[int, list[PlannedTensor]]:
    """Tensor bytes of the smallest file a ``--bpw``/``--size`` budget can write of ``checkpoint`` with the
    method's ``imatrix`` (from Q4_K_M's structure, as apply_budget starts), and the tensors it re-types."""
    import edgekit.converters.formats.gguf.budget as budget

    plan = plan_tensors(checkpoint, replace(recipe, bits=None, preset=None, bpw=budget.MAX_BPW), imatrix)
    free, fixed = _budget_split(plan)
    return budget.floor_bytes({t.name: t.shape for t in free}, fixed, imatrix=imatrix), free


def bits_note(recipe: ConvertRecipe, plan: list[PlannedTensor], fields: dict[str, Any], imatrix: bool,
              checkpoint: HFCheckpoint) -> str | None:
    """A warning when ``--bits N`` (or ``--type T``) gave a file far from N (T's) bits per weight, saying why
    and, where one makes a smaller file, the ``--bpw``/``--size`` budget that holds it nearest: never below
    the smallest file a budget can write of ``checkpoint`` (its rows, the method's ``imatrix``), never above
    the --bpw limit or the file just written. ``fields``: the manifest fields of that file."""
    import edgekit.converters.formats.gguf.budget as budget

    if recipe.budgeted:
        return None
    if recipe.preset is not None:
        base = mixes.preset_from_name(recipe.preset).base
        if base not in budget.candidates(256):
            return None  # float and ternary presets: no budget type stands for them
        nominal, asked = round(budget.type_bpw(base), 2), f"--type {recipe.preset}"
    elif recipe.bits is not None:
        nominal, asked = recipe.bits, f"--bits {recipe.bits}"
    else:
        return None
    bpw = fields["bpw"]
    if bpw - nominal <= BITS_SLACK:
        return None
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    fell_back = sum(1 for t in plan if t.assignment.wanted is not None)
    why = f"{fell_back} tensors fell back to wider types (see 'edgekit inspect')" if fell_back else \
        "the preset keeps some tensors wide"
    head = f"warning: {asked} gave {bpw:.2f} bits per weight: {why}"
    floor, free = _budget_floor(checkpoint, recipe, imatrix)
    floor_bpw = 8 * floor / n_params
    target = max(nominal + 0.5, math.ceil(floor_bpw * 10) / 10)
    while int(target * n_params / 8) < floor:  # the budget's own rounding, to the byte
        target = round(target + 0.1, 1)
    # --size leaves room for the metadata and each tensor's worst-case alignment padding (apply_budget)
    size_mb = _ceil_mb(target * n_params / 8 + fields["size_bytes"] - fields["tensor_bytes"] + _ALIGN * len(plan))
    advice = [f"--bpw {target:g}"] if target <= budget.MAX_BPW and target < bpw else []
    advice += [f"--size {size_mb:g}MB"] if size_mb * 1e6 < fields["size_bytes"] else []
    if not advice:
        narrow = sorted({t.shape[-1] for t in free if t.shape[-1] % 32})
        rows = f": rows of {', '.join(map(str, narrow))} weights hold no quantized type (a multiple of 32 is " \
            "needed), so they stay F16" if narrow else f" (the smallest these rows allow is {floor_bpw:.2f} bpw)"
        return f"{head}; no --bpw or --size makes a smaller file{rows}"
    if target <= nominal + 0.5:
        return (f"{head}. For a file near {nominal:g} bits use {' or '.join(advice)} (the smallest these rows "
                f"allow is {floor_bpw:.2f} bpw)")
    return f"{head}. These rows allow no file below {floor_bpw:.2f} bpw: for the smallest, use {' or '.join(advice)}"


def _ceil_mb(n_bytes: float) -> float:
    """``n_bytes`` in MB rounded up to 3 significant digits (what a --size of that many MB holds)."""
    step = 10.0 ** (math.floor(math.log10(n_bytes / 1e6)) - 2)
    return round(math.ceil((n_bytes + 1) / 1e6 / step) * step, 6)
