"""Hugging Face checkpoint folders: validation, config, safetensors (sharded or not), tokenizer files.

Only safetensors are read. Pickle checkpoints (``*.bin``, ``*.pt``) are refused, and no code from
the model folder ever runs.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.arch import ARCHITECTURES, ArchSpec, HParams, spec_for, supported_list
from edgekit.errors import CorruptFileError, InputError, UnsupportedError
from edgekit.validate import check_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A tokenizer's JSON files that converters (and the gguf package, transformers) parse.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FIX = "re-download the tokenizer files of the model"
# safetensors dtype name -> bytes per element, to validate headers without loading data.
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _pair_separator_noise(record: logging.LogRecord) -> bool:
    """gguf's SpecialVocab warns when a tokenizer's two-sequence template (``<s> A <s> B``: Llama and Mistral
    SentencePiece tokenizers) uses a separator it does not model; edgekit never tokenizes sequence pairs, so
    the line only puzzles (it is printed mid-convert). Every other warning of gguf's still shows."""
    msg = record.getMessage()
    return not (msg.startswith(("Unknown separator token", "Unknown second separator token"))
                and msg.endswith("in TemplateProcessing<pair>"))


logging.getLogger("gguf.vocab").addFilter(_pair_separator_noise)


def read_json_object(path: Path, fix: str = TOKENIZER_FIX) -> dict:
    """The JSON object in ``path``; :class:`CorruptFileError` naming the file and ``fix`` when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); {fix}") from exc
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path} is not UTF-8 text; {fix}") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object; {fix}")
    return data


def special_token(folder: Path, key: str, tokenizer_config: dict | None = None) -> str | None:
    """The text of the special token ``key`` (``bos_token``, ``eos_token``...) in the tokenizer files of
    ``folder``, as transformers reads it: tokenizer_config.json's (``tokenizer_config`` when already read),
    overridden by special_tokens_map.json unless the config has ``added_tokens_decoder`` (transformers then
    leaves that file alone); None where neither names one."""
    tc = tokenizer_config
    if tc is None:
        path = folder / "tokenizer_config.json"
        tc = read_json_object(path) if path.is_file() else {}
    value = tc.get(key)
    stm = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in tc and stm.is_file():
        value = read_json_object(stm).get(key, value)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_steps(step: Any) -> list[dict]:
    """A tokenizer.json normalizer, pre-tokenizer or decoder as the list of its steps: a Sequence's members
    (one level, as transformers and mlc_llm look), else the step itself."""
    if not isinstance(step, dict):
        return []
    if step.get("type") != "Sequence":
        return [step]
    parts = next((step[k] for k in ("normalizers", "pretokenizers", "decoders") if isinstance(step.get(k), list)), [])
    return [p for p in parts if isinstance(p, dict)]


def prepends_space(tokenizer_json: dict) -> bool:
    """Whether a tokenizer.json normalizes every text to start with '▁' (a ``Prepend`` normalizer: Llama 2's,
    Mistral's), as llama.cpp's SentencePiece tokenizer always does."""
    return any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581"
               for n in tokenizer_steps(tokenizer_json.get("normalizer")))


def stop_ids(folder: Path) -> list[int]:
    """The ids generation stops on, as transformers reads them: generation_config.json's ``eos_token_id``
    (one id or a list), else config.json's; [] where neither has one."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        value = read_json_object(path).get("eos_token_id")
        ids = value if isinstance(value, list) else [value]
        ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]
        if ids:
            return list(dict.fromkeys(ids))
    return []


def check_tokenizer_files(folder: Path) -> None:
    """Raise :class:`CorruptFileError` for a tokenizer JSON file in ``folder`` that does not parse, before
    any work that needs the tokenizer (missing files are the caller's to judge)."""
    for name in TOKENIZER_JSON_FILES:
        if (folder / name).is_file():
            read_json_object(folder / name)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        st = tj.stat()
        why = _fast_tokenizer_problem(str(tj.resolve()), st.st_size, st.st_mtime_ns)
        if why:
            raise unreadable_tokenizer(tj, why, TOKENIZER_FIX)


def unreadable_tokenizer(path: Path, why: str | BaseException, fix: str) -> CorruptFileError:
    """The error for a ``tokenizer.json`` the tokenizers library refuses (``why``: its message)."""
    text = str(why).splitlines()[0] if str(why) else type(why).__name__
    return CorruptFileError(f"{path} is not a tokenizer the tokenizers library can read ({text}); {fix}")


@functools.lru_cache(maxsize=8)
def _fast_tokenizer_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """Why a ``tokenizer.json`` that is JSON is still not a tokenizer (no vocabulary, an unknown model type),
    so it fails with its name, not later inside transformers. Once per file version (~50 ms for 49k tokens)."""
    try:
        import tokenizers
    except ImportError:  # the converters that need it say so themselves
        return None
    try:
        # read here, not by from_file: tokenizers takes a path as strict UTF-8, and a Linux name need not be
        tokenizers.Tokenizer.from_str(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # the library raises a bare Exception with serde's message
        return str(exc) or type(exc).__name__
    return None


@dataclass
class TensorRef:
    """Where one tensor lives: its file, dtype and shape (numpy order, outer dimension first)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate a safetensors header: a truncated or corrupt file fails here, cheaply."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(
            f"{path} is not a valid safetensors file ({exc}); re-download or re-save the checkpoint"
        ) from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} is not a valid safetensors file (its header is not a JSON object); "
                               "re-download or re-save the checkpoint")
    refs = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(info["shape"])
            if not all(type(x) is int and x >= 0 for x in (start, stop, *shape)) or stop < start:
                raise ValueError("offsets and dimensions must be whole numbers >= 0")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path} has a malformed entry for {name!r}; re-save the checkpoint") from exc
        expected = int(np.prod(shape)) * _ST_SIZES.get(dtype, 0) if shape else _ST_SIZES.get(dtype, 0)
        if dtype in _ST_SIZES and stop - start != expected:
            raise CorruptFileError(f"{path}: tensor {name!r} has inconsistent size; the file is corrupt")
        end = max(end, stop)
        refs[name] = TensorRef(name, path, dtype, shape)
    if 8 + n + end > size:
        raise CorruptFileError(
            f"{path} is truncated ({size} bytes, header needs {8 + n + end}); re-download or re-save the checkpoint"
        )
    return refs


# A config that disagrees with its weights converts into a file that only fails when it runs, far from the
# cause: checked here from the safetensors headers alone.
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def check_shapes(spec: ArchSpec, hp: HParams, tensors: dict[str, TensorRef], source: str) -> None:
    """Check every tensor the architecture knows against the shape config.json implies, and that each of
    the ``num_hidden_layers`` layers is present with nothing beyond them."""
    dims = {"embd": hp.n_embd, "q": hp.n_head * hp.head_dim, "kv": hp.n_head_kv * hp.head_dim,
            "ff": hp.n_ff, "vocab": hp.n_vocab, "head": hp.head_dim}
    layers: dict[int, set[str]] = {}
    table = list(spec.tensor_shapes)

    def order(name: str) -> tuple[int, int]:
        # Global tensors first, then layer by layer in the table's order: q_proj is named before o_proj.
        m = _LAYER_RE.fullmatch(name)
        key = m.group(2) if m else name
        return (int(m.group(1)) if m else -1, table.index(key) if key in table else len(table))

    for name, ref in sorted(tensors.items(), key=lambda item: order(item[0])):
        m = _LAYER_RE.fullmatch(name)
        if m:
            i = int(m.group(1))
            if i >= hp.n_layer:
                raise CorruptFileError(f"{source}: tensor {name!r} is beyond num_hidden_layers {hp.n_layer} in "
                                       "config.json; fix num_hidden_layers or re-download the model")
            layers.setdefault(i, set()).add(m.group(2))
            wanted = spec.tensor_shapes.get(m.group(2))
        else:
            wanted = spec.tensor_shapes.get(name)
        if wanted is None:
            continue
        expected = tuple(dims[d] for d in wanted)
        if tuple(ref.shape) != expected:
            raise CorruptFileError(
                f"{source}: tensor {name!r} has shape {list(ref.shape)} but config.json implies {list(expected)} "
                f"({', '.join(f'{d}={dims[d]}' for d in dict.fromkeys(wanted))}); the config does not match the "
                "weights: fix config.json or re-download the model")
    required = [s for s in spec.layer_tensors if s not in spec.optional_layer_tensors]
    for i in range(hp.n_layer):
        missing = [s for s in required if s not in layers.get(i, ())]
        if missing:
            raise CorruptFileError(
                f"{source}: tensor 'model.layers.{i}.{missing[0]}' is missing, but config.json says "
                f"num_hidden_layers {hp.n_layer}; fix num_hidden_layers or give the complete checkpoint")
    if "model.embed_tokens.weight" not in tensors:
        raise CorruptFileError(f"{source}: tensor 'model.embed_tokens.weight' is missing; give the complete checkpoint")


def check_architectures(config: dict, source: str) -> None:
    """A config.json without ``architectures`` (older exports, hand-written configs) is refused with the line
    to add, the class named from ``model_type`` where that is a family edgekit converts."""
    if config.get("architectures"):
        return  # a malformed or unsupported list is spec_for's to refuse
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CorruptFileError(f"{source} names no model class (no 'architectures', no 'model_type'); add "
                               f'"architectures": ["<Family>ForCausalLM"] for the model; edgekit converts: '
                               f"{supported_list()}")
    # transformers names a family's causal LM class after its model_type: llama -> LlamaForCausalLM
    want = model_type.replace("_", "").lower() + "forcausallm"
    cls = next((c for c in ARCHITECTURES if c.lower() == want), None)
    if cls is None:
        raise UnsupportedError(f"{source} has no 'architectures', and its model_type {model_type!r} is not a family "
                               f"edgekit converts ({supported_list()})")
    raise CorruptFileError(f'{source} has no \'architectures\'; its model_type {model_type!r} is {cls}: add '
                           f'"architectures": ["{cls}"] to it')


_BF16_CHUNK = 1 << 24  # elements converted at a time: 32 MB of bf16 beside the float32 result


def _bf16_to_f32(f: Any, name: str) -> np.ndarray:
    """A bf16 tensor of an open ``safe_open(framework="pt")`` file as float32, converted a slice of rows at
    a time: the whole bf16 copy beside the float32 one was half again the float32's size at the peak (200
    MB more for a 100M-parameter vocabulary table)."""
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if len(shape) < 2 or int(np.prod(shape)) <= _BF16_CHUNK:
        return f.get_tensor(name).float().numpy()
    out = np.empty(shape, dtype=np.float32)
    step = max(1, _BF16_CHUNK // int(np.prod(shape[1:])))
    for r0 in range(0, shape[0], step):
        out[r0:r0 + step] = sl[r0:r0 + step].float().numpy()
    return out


@dataclass
class HFCheckpoint:
    """A validated Hugging Face checkpoint folder."""

    path: Path
    config: dict
    spec: ArchSpec
    hparams: HParams
    tensors: dict[str, TensorRef] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> HFCheckpoint:
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"{p} does not exist; give a Hugging Face model folder (config.json + *.safetensors)")
        if p.is_file() and p.suffix.lower() == ".gguf":
            raise InputError(f"{p} is a GGUF file; turn it into a checkpoint first with: edgekit import {p} -o DIR")
        if not p.is_dir() or not (p / "config.json").exists():
            raise InputError(f"{p} is not a Hugging Face model folder (no config.json)")
        try:
            config = json.loads((p / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{p / 'config.json'} is not valid JSON ({exc}); fix or re-download it") from exc
        source = str(p / "config.json")
        check_config(config, source)
        check_architectures(config, source)
        spec = spec_for(config.get("architectures"))
        hparams = HParams.from_config(config, source)
        spec.check_config(config, source)
        files = cls._weight_files(p)
        tensors: dict[str, TensorRef] = {}
        for f in files:
            tensors.update(_read_safetensors_header(f))
        if spec.packing is not None:  # packed weights are checked and planned in their unpacked shape
            for ref in tensors.values():
                ref.shape = spec.packing.logical_shape(ref.name, ref.dtype, ref.shape)
        check_shapes(spec, hparams, tensors, str(p))
        return cls(path=p, config=config, spec=spec, hparams=hparams, tensors=tensors)

    @staticmethod
    def _weight_files(p: Path) -> list[Path]:
        index = p / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CorruptFileError(f"{index} is malformed; re-download the checkpoint") from exc
            files = sorted({p / f for f in weight_map.values()})
            # A shard named outside the folder ("../x", "/etc/x") is never read.
            outside = [f for f in weight_map.values() if (p / f).resolve().parent != p.resolve()]
            if outside:
                raise CorruptFileError(f"{index} names shard {outside[0]!r} outside {p}; shards must sit in the "
                                       "model folder: re-download the checkpoint")
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise InputError(f"{p} lacks shard(s) {', '.join(missing)} named in {index.name}; download them all")
            return files
        files = sorted(p.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{p} holds only pickle weights ({', '.join(pickles)}); edgekit never loads pickles. "
                "Re-save it as safetensors where you trust its source: "
                "model.save_pretrained(DIR, safe_serialization=True)"
            )
        raise InputError(f"{p} has no *.safetensors weights; is the download complete?")

    @functools.cached_property
    def weight_files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def load(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array (bf16/f16 upcast; packed weights unpacked, see
        :mod:`edgekit.packing`)."""
        arr = self._load_stored(name)
        packing = self.spec.packing
        return arr if packing is None else packing.decode(name, self.tensors[name].dtype, arr)

    def _load_stored(self, name: str) -> np.ndarray:
        ref = self.tensors[name]
        try:
            if ref.dtype == "BF16":
                from safetensors import safe_open

                with safe_open(ref.file, framework="pt") as f:
                    return _bf16_to_f32(f, name)
            from safetensors import safe_open

            with safe_open(ref.file, framework="numpy") as f:
                t = f.get_tensor(name)
                if ref.dtype == "U8" and self.spec.packing is not None:
                    return t  # the packing decodes it
                return np.ascontiguousarray(t, dtype=np.float32)
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptFileError(f"cannot read tensor {name!r} from {ref.file}: {exc}") from exc

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.load(name)

    @functools.cached_property
    def tokenizer_config(self) -> dict:
        f = self.path / "tokenizer_config.json"
        return read_json_object(f) if f.exists() else {}

    def require_tokenizer(self) -> None:
        """Raise unless the folder has a tokenizer, and one whose JSON files parse."""
        if not (self.path / "tokenizer.json").exists() and not (self.path / "tokenizer.model").exists():
            raise InputError(
                f"{self.path} has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files "
                "from the original model into the folder"
            )
        check_tokenizer_files(self.path)

    def chat_template(self) -> str | None:
        jinja = self.path / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        tmpl = self.tokenizer_config.get("chat_template")
        if isinstance(tmpl, list):  # named templates: take the default one
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        return tmpl
