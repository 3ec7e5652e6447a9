"""``edgekit import``: any GGUF of a supported architecture -> a dequantized safetensors checkpoint.

transformers reads the GGUF (dequantizing every ggml type through gguf-py) and rebuilds config and
tokenizer; edgekit drops the GGUF quantization marker so the folder is a plain float checkpoint, and
restores the pre-tokenizer llama.cpp used (transformers' conversion can lose it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

from edgekit.arch import GGUF_TO_HF
from edgekit.converters.formats.base import ProgressFn, no_progress
from edgekit.converters.formats.gguf.check import check_gguf
from edgekit.converters.formats.gguf.read import read_gguf_header
from edgekit.errors import CorruptFileError, InputError, UnsupportedError, quiet_transformers, require
from edgekit.fslimits import is_disk_full, write_error
from edgekit.fsutil import atomic_dir, check_free_space, check_not_inside
from edgekit.hashing import sha256_file


def _field(reader, key: str):
    f = reader.fields.get(key)
    try:
        return None if f is None else f.contents()
    except Exception:  # noqa: BLE001 - a field gguf-py cannot decode; check_gguf names it
        return None


def import_gguf(
    gguf_path: str | Path, output: str | Path, *, force: bool = False, progress: ProgressFn = no_progress
) -> Path:
    """Write a transformers-loadable safetensors checkpoint (with tokenizer) from ``gguf_path``."""
    src = Path(gguf_path).expanduser()
    if src.is_dir() and (src / "edgekit.json").is_file():  # a GGUF artifact folder, as run and eval take it
        from edgekit.artifact import Artifact

        art = Artifact.open(src)
        if art.format != "gguf":
            raise InputError(f"{src} is a {art.format} artifact; import takes a GGUF file or a GGUF artifact")
        src = art.model_file
    reader = read_gguf_header(src, check=False)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_TO_HF:
        raise UnsupportedError(f"GGUF architecture {arch!r:.40} is not supported; edgekit imports: {', '.join(GGUF_TO_HF)}")
    check_gguf(reader, src)
    if not reader.tensors:
        raise InputError(f"{src} holds no tensors (a vocabulary-only GGUF?); import a GGUF with the model's weights")
    pre = _field(reader, "tokenizer.ggml.pre")
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    # what transformers' GGUF config reader leaves at its defaults: heads wider than hidden / heads (Qwen3's
    # key_length) and a head tied to the embedding (no output.weight)
    head_dim = _field(reader, f"{arch}.attention.key_length")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    del reader
    out = Path(output).expanduser()
    check_not_inside(src, out)
    check_free_space(out.parent if out.parent.exists() else Path.cwd(), n_params * 4, "the checkpoint", headroom=64 << 20)

    torch = require("torch", "torch")
    transformers = require("transformers", "torch")
    with atomic_dir(out, force=force) as tmp, quiet_transformers(transformers):
        progress("reading GGUF (dequantizing)", 0, 3)
        try:
            with _no_tqdm():  # transformers' GGUF reader draws its own bar whatever its logging says
                tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name,
                                                                 local_files_only=True)
                config = transformers.AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name,
                                                                 local_files_only=True)
                if isinstance(head_dim, int) and hasattr(config, "head_dim"):
                    config.head_dim = head_dim
                config.tie_word_embeddings = tied
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(src.parent), gguf_file=src.name, config=config, dtype=torch.float32, local_files_only=True
                )
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever transformers trips on, the GGUF is the cause
            detail = (str(exc).splitlines() or [""])[0][:200]
            raise CorruptFileError(f"transformers could not rebuild a model from {src} "
                                   f"({type(exc).__name__}: {detail}); re-download or re-convert it") from exc
        # A plain float checkpoint now: the GGUF marker would make loaders look for the .gguf file.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        progress("writing safetensors", 1, 3)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        except OSError:
            raise  # atomic_dir removes the partial folder and names a full or read-only disk
        except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as SafetensorError, no errno
            if not is_disk_full(exc):
                raise
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out) from exc  # type: ignore[misc]
        tok.save_pretrained(tmp)
        _restore_pre_tokenizer(tmp, pre)
        progress("done", 3, 3)
        (tmp / "edgekit_import.json").write_text(json.dumps(
            {"source": str(src.resolve()), "sha256": sha256_file(src), "architecture": arch,
             "tokenizer_pre": pre}, indent=2) + "\n")
    return out


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """Silence the tqdm bar transformers' GGUF reader draws whatever its logging says: the reader is handed
    a disabled bar. Not ``TQDM_DISABLE``: tqdm reads it once, when it is first imported (the reader has
    imported it by now), and the environment is the whole process's, other threads' bars included."""
    import functools
    import importlib

    try:
        reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        reader = None
    bar = getattr(reader, "tqdm", None)
    if bar is not None:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar


def _restore_pre_tokenizer(folder: Path, pre: str | None) -> None:
    from edgekit.converters.formats.gguf.vocab import PRE_TOKENIZER_JSON

    tj_path = folder / "tokenizer.json"
    if pre not in PRE_TOKENIZER_JSON or not tj_path.exists():
        return
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if tj.get("model", {}).get("type") != "BPE":
        return
    tj["pre_tokenizer"] = PRE_TOKENIZER_JSON[pre]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
