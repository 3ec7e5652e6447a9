"""Tokenizer -> GGUF vocabulary: BPE (tokenizer.json, byte-level) and SentencePiece (tokenizer.model).

Special tokens, merges, add-BOS/EOS flags and the chat template are read with gguf-py's
``SpecialVocab``; the pre-tokenizer name llama.cpp needs is looked up in ``BPE_PRE_TOKENIZERS``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from edgekit.errors import CorruptFileError, InputError, UnsupportedError
from edgekit.model import (
    TOKENIZER_FIX,
    check_tokenizer_files,
    prepends_space,
    read_json_object,
    special_token,
    stop_ids,
    tokenizer_steps,
)

_T = gguf.TokenType

# llama.cpp pre-tokenizer name <- the split regex(es) a tokenizer.json's pre_tokenizer uses.
# (Only the pattern matters for identity; a byte-level BPE with no Split is plain GPT-2.)
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel",): "gpt-2",
    ("digits:individual", "bytelevel"): "smollm",
    ("split:" + _LLAMA3_RE, "bytelevel"): "llama-bpe",
    ("split:" + _QWEN2_RE, "bytelevel"): "qwen2",
}
# The reverse, for `edgekit import`: llama.cpp pre name -> tokenizer.json pre_tokenizer.
_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZER_JSON: dict[str, dict] = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_RE}, "behavior": "Isolated", "invert": False},
        {**_BYTELEVEL, "use_regex": False}]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_RE}, "behavior": "Isolated", "invert": False},
        {**_BYTELEVEL, "use_regex": False}]},
}


def _pre_signature(pre: dict | None) -> tuple[str, ...]:
    if not pre:
        return ()
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts or []:
        kind = p.get("type", "")
        if kind == "ByteLevel":
            sig.append("bytelevel")
        elif kind == "Digits":
            sig.append("digits:individual" if p.get("individual_digits") else "digits")
        elif kind == "Split":
            pat = p.get("pattern", {})
            sig.append("split:" + (pat.get("Regex") or pat.get("String") or ""))
        else:
            sig.append(kind.lower())
    return tuple(sig)


def detect_bpe_pre(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer; 'default' (with a warning) if unknown."""
    sig = _pre_signature(tokenizer_json.get("pre_tokenizer"))
    name = BPE_PRE_TOKENIZERS.get(sig)
    if name is None:
        warnings.warn(
            "unrecognised BPE pre-tokenizer; writing 'default' (llama.cpp may split text slightly differently "
            "from the original tokenizer)",
            stacklevel=2,
        )
        return "default"
    return name


@dataclass
class GGUFVocab:
    """Everything the GGUF tokenizer block holds, ready for a ``GGUFWriter``."""

    model: str  # "gpt2" (BPE) or "llama" (SentencePiece)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    pre: str | None
    special: gguf.SpecialVocab = field(repr=False)
    # SentencePiece: how transformers starts a text with '▁' (see _spm_prefix); None for BPE
    prefix: str | None = None

    def set_chat_template(self, template: str | None) -> None:
        """Carry ``template`` (the checkpoint's, by transformers' rule: chat_template.jinja first) where
        SpecialVocab read tokenizer_config.json's; named templates keep their others."""
        current = self.special.chat_template
        if isinstance(current, list):
            self.special.chat_template = [{**t, "template": template} if t.get("name") == "default" else t
                                          for t in current]
        else:
            self.special.chat_template = template

    def note(self) -> str | None:
        """A warning when llama.cpp tokenizes text starting with whitespace differently from transformers."""
        if self.prefix != "first":
            return None
        return ("warning: llama.cpp starts every SentencePiece text with '\u2581', also one that starts with a "
                "space, where transformers adds none then: in the GGUF such text (every WikiText line) gets one "
                "extra '\u2581' token, so its eval perplexities differ from ONNX and Core ML, which follow "
                "transformers")

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.model == "llama":  # SentencePiece merges by score; byte-level BPE by its merge list
            writer.add_token_scores(self.scores)
        if self.prefix == "never":  # llama.cpp's default (a '▁' before every text) is the other cases' nearest
            writer.add_add_space_prefix(False)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def _bpe_vocab(folder: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int], str]:
    path = folder / "tokenizer.json"
    tj = read_json_object(path)
    model = tj.get("model", {})
    if not isinstance(model, dict):
        raise CorruptFileError(f"{path} has a malformed 'model' entry; {TOKENIZER_FIX}")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedError(
            f"{folder / 'tokenizer.json'} is not a byte-level BPE tokenizer and the folder has no tokenizer.model; "
            "edgekit converts byte-level BPE (GPT-2/Llama-3/Qwen2 style) and SentencePiece tokenizers"
        )
    vocab, added_list = model.get("vocab"), tj.get("added_tokens", [])
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(t, str) and isinstance(i, int) and i >= 0 for t, i in vocab.items()):
        raise CorruptFileError(f"{path} has no valid BPE vocabulary (model.vocab); {TOKENIZER_FIX}")
    if not isinstance(added_list, list) or not all(
            isinstance(a, dict) and isinstance(a.get("id"), int) and a["id"] >= 0 and isinstance(a.get("content"), str)
            for a in added_list):
        raise CorruptFileError(f"{path} has malformed added_tokens; {TOKENIZER_FIX}")
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in added_list}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode())
            types.append(_T.UNUSED)
            continue
        tokens.append(by_id[i].encode("utf-8"))
        if i in added:
            types.append(_T.CONTROL if added[i].get("special") else _T.USER_DEFINED)
        else:
            types.append(_T.NORMAL)
    return tokens, [0.0] * size, [int(t) for t in types], detect_bpe_pre(tj)


def _spm_vocab(folder: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """tokenizer.model's pieces (user-defined symbols typed USER_DEFINED, as SentencePiece matches them
    whole), then the tokens the Hugging Face files add on top, each with its text and type (CONTROL when
    special), as llama.cpp's converter writes them; ids nothing names are padding."""
    sp = gguf.vocab.SentencePieceVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, ttype in sp.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    for i in _spm_user_defined(folder / "tokenizer.model"):
        if i < len(types) and types[i] == _T.NORMAL:
            types[i] = int(_T.USER_DEFINED)
    added = _hf_added_tokens(folder)
    for i in range(len(tokens), max(n_vocab, max(added, default=-1) + 1)):  # the embedding can be larger
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(_T.UNUSED))
    for i, (content, special) in added.items():
        if types[i] not in (_T.NORMAL, _T.USER_DEFINED, _T.UNUSED):
            continue  # SentencePiece's own <unk>, <s>, </s> and byte pieces keep their types
        if not special:  # SentencePiece's word-boundary mark, as llama.cpp's converter stores it
            content = content.replace("\u2581", " ")
        tokens[i], scores[i] = content.encode("utf-8"), -1000.0
        types[i] = int(_T.CONTROL if special else _T.USER_DEFINED)
    return tokens, scores, types


def _spm_user_defined(path: Path) -> list[int]:
    """Ids of a SentencePiece model's user-defined symbols (ChatML markers and the like)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, whose module path varies by version
        raise CorruptFileError(f"{path} is not a SentencePiece model; {TOKENIZER_FIX}") from exc
    return [i for i, piece in enumerate(proto.pieces) if piece.type == pb.ModelProto.SentencePiece.USER_DEFINED]


def _hf_added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """``{id: (text, special)}`` of the tokens tokenizer.json's ``added_tokens`` and tokenizer_config.json's
    ``added_tokens_decoder`` name (the latter wins, as in transformers)."""
    out: dict[int, tuple[str, bool]] = {}
    if (folder / "tokenizer.json").is_file():
        for a in read_json_object(folder / "tokenizer.json").get("added_tokens") or []:
            if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str):
                out[a["id"]] = (a["content"], bool(a.get("special")))
    if (folder / "tokenizer_config.json").is_file():
        decoder = read_json_object(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for key, a in decoder.items() if isinstance(decoder, dict) else ():
            if str(key).isdigit() and isinstance(a, dict) and isinstance(a.get("content"), str):
                out[int(key)] = (a["content"], bool(a.get("special")))
    return {i: v for i, v in out.items() if i >= 0}


def _spm_prefix(folder: Path) -> str | None:
    """How transformers starts a SentencePiece text with '▁' (the dummy prefix): "always" (a Prepend("▁")
    normalizer, Llama 2's tokenizer.json: what llama.cpp does), "first" (a Metaspace pre-tokenizer, also
    the one transformers builds from tokenizer.model alone: a '▁' unless the text starts with one),
    "never", or None when tokenizer.json does neither."""
    tc = read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if not (folder / "tokenizer.json").is_file():
        return "never" if tc.get("add_prefix_space") is False else "first"
    tj = read_json_object(folder / "tokenizer.json")
    if prepends_space(tj):
        return "always"
    for p in tokenizer_steps(tj.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":  # "always" too skips a text that starts with '▁' (tokenizers' rule)
            scheme = p.get("prepend_scheme") or ("always" if p.get("add_prefix_space", True) else "never")
            return "never" if scheme == "never" else "first"
    return None


def read_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    """Read a checkpoint folder's tokenizer into GGUF form; missing files raise with the fix."""
    has_spm = (folder / "tokenizer.model").exists()
    has_json = (folder / "tokenizer.json").exists()
    if not (has_spm or has_json):
        raise InputError(f"{folder} has no tokenizer.json or tokenizer.model; copy the tokenizer files into it")
    check_tokenizer_files(folder)  # the gguf package parses them too (SpecialVocab)
    if has_spm:
        tokens, scores, types = _spm_vocab(folder, n_vocab)
        kind, pre = "llama", None
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    else:
        tokens, scores, types, pre = _bpe_vocab(folder, n_vocab)
        kind = "gpt2"
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise InputError(f"{folder / 'tokenizer.json'} has no BPE merges; the tokenizer file is incomplete")
    _name_specials(special, folder, tokens)
    _add_stop_ids(special, folder, len(tokens))
    return GGUFVocab(model=kind, tokens=tokens, scores=scores, types=types, pre=pre, special=special,
                     prefix=_spm_prefix(folder) if has_spm else None)


def _name_specials(special: gguf.SpecialVocab, folder: Path, tokens: list[bytes]) -> None:
    """The special tokens transformers names, by its rule (special_tokens_map.json too, see
    :func:`edgekit.model.special_token`), over SpecialVocab's: it reads tokenizer_config.json alone and finds
    names among the added tokens only, so a BOS named in special_tokens_map.json, or a SentencePiece
    ``<s>`` of the vocabulary proper, fell back to config.json's ``bos_token_id``."""
    index: dict[bytes, int] = {}
    for i, tok in enumerate(tokens):
        index.setdefault(tok, i)
    for typ in ("bos", "eos", "unk", "sep", "pad"):
        name = special_token(folder, f"{typ}_token")
        if name is not None and (tid := index.get(name.encode("utf-8"))) is not None:
            special.special_token_ids[typ] = tid


# llama.cpp's end-of-generation ids beyond the EOS: its vocabulary reads these keys into special_eog_ids
_EXTRA_STOP_SLOTS = ("eot", "eom")


def _add_stop_ids(special: gguf.SpecialVocab, folder: Path, n_vocab: int) -> None:
    """Every stop id of the checkpoint as a llama.cpp end-of-generation token: GGUF keeps one EOS, so the
    others go in the EOT and EOM slots (llama.cpp stops on all three). More than fit: a warning naming them."""
    ids = special.special_token_ids
    wanted = [i for i in stop_ids(folder) if i < n_vocab]
    if wanted and "eos" not in ids:
        ids["eos"] = wanted[0]
    extra = [i for i in wanted if i not in {ids.get(k) for k in ("eos", *_EXTRA_STOP_SLOTS)}]
    for slot in _EXTRA_STOP_SLOTS:
        if extra and slot not in ids:
            ids[slot] = extra.pop(0)
    if extra:
        warnings.warn(f"generation stops on token ids {', '.join(map(str, extra))} as well, but a GGUF holds three "
                      "end-of-generation ids (EOS, EOT, EOM): llama.cpp may generate past them", stacklevel=2)
