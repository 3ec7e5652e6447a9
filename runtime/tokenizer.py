"""The tokenizer and chat template of an artifact folder, without transformers when ``tokenizer.json`` is
there: the fast tokenizer, special tokens from ``tokenizer_config.json`` and ``special_tokens_map.json``, and
the chat template rendered in transformers' Jinja environment (:func:`edgekit.chat_template.make_renderer`)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from edgekit.errors import InputError, require


class FolderTokenizer:
    """tokenizers' fast tokenizer plus the chat template and special tokens from tokenizer_config.json: what
    the ONNX and Core ML backends read from the files ``convert`` copies beside the model."""

    # the special tokens transformers passes to a chat template by name (SPECIAL_TOKENS_ATTRIBUTES)
    TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    def __init__(self, folder: Path) -> None:
        cfg_file = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.folder = folder
        # encode_text flips a flag of the shared tokenizer: no other encode may run meanwhile
        self._lock = threading.Lock()
        tj = folder / "tokenizer.json"
        if tj.exists():
            tokenizers = require("tokenizers", "onnx")
            try:
                # read here, not by from_file: tokenizers takes a path as strict UTF-8, and Linux names need not be
                self._tok = tokenizers.Tokenizer.from_str(tj.read_text(encoding="utf-8"))
            except Exception as exc:  # a bare Exception with serde's message
                from edgekit.model import unreadable_tokenizer

                raise unreadable_tokenizer(tj, exc, "re-run 'edgekit convert' (it copies the model's tokenizer)") from exc
            self._hf = None
        elif (folder / "tokenizer.model").exists():
            transformers = require("transformers", "torch")
            self._tok = None
            self._hf = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                                              local_files_only=True)
        else:
            raise InputError(f"{folder} has no tokenizer.json or tokenizer.model next to the model; "
                             "re-run 'edgekit convert' (it copies them)")
        jinja = folder / "chat_template.jinja"
        tmpl = jinja.read_text() if jinja.exists() else self.config.get("chat_template")
        if isinstance(tmpl, list):
            tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
        self.chat_template: str | None = tmpl

    def special(self, key: str) -> str | None:
        """A special token's text, from tokenizer_config.json and special_tokens_map.json as transformers
        merges them (:func:`edgekit.model.special_token`)."""
        from edgekit.model import special_token

        return special_token(self.folder, key, self.config)

    def encode(self, text: str, add_special: bool, special: bool = True) -> list[int]:
        """Ids of ``text``; ``special=False`` turns special-token parsing off (``<|im_start|>`` in it stays plain
        text, as llama.cpp's ``parse_special=false``). Thread-safe: the flag is flipped under the lock."""
        with self._lock:
            if self._hf is not None:  # transformers flips the same flag on its backend tokenizer
                return list(self._hf(text, add_special_tokens=add_special, split_special_tokens=not special)["input_ids"])
            self._tok.encode_special_tokens = not special
            try:
                return self._tok.encode(text, add_special_tokens=add_special).ids
            finally:
                self._tok.encode_special_tokens = False

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token parsing off and no BOS: ``<|im_start|>`` in it stays plain text."""
        return self.encode(text, False, special=False)

    def special_tokens(self) -> list[str]:
        """The added tokens matched as control tokens in text (those ``encode_text`` leaves alone)."""
        added = self._hf.added_tokens_decoder if self._hf is not None else self._tok.get_added_tokens_decoder()
        return [t.content for t in added.values() if t.special]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's ids: its own markers as special tokens, the messages' text as plain text."""
        from edgekit.runtime.chat_tokens import chat_segments, tokenize_segments

        segments = chat_segments(self.render, messages, self.special_tokens())
        return tokenize_segments(segments, self.encode_text, lambda t: self.encode(t, add_special=False))

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if self._hf is not None:
            return self._hf.convert_tokens_to_ids(text)
        return self._tok.token_to_id(text)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template's text for ``messages`` with the generation prompt, as ``apply_chat_template``
        renders it (InputError when there is no template, it cannot be read or it refuses the messages)."""
        from edgekit.chat_template import make_renderer

        tokens = {k: self.special(k) for k in self.TEMPLATE_TOKENS}
        return make_renderer(self.chat_template, tokens)(messages)


def eos_ids(folder: Path, tokenizer: FolderTokenizer) -> set[int]:
    """The ids generation stops on for an artifact folder: its checkpoint's (edgekit.model.stop_ids) and the
    tokenizer's eos_token."""
    from edgekit.model import stop_ids

    ids = set(stop_ids(folder))
    eos = tokenizer.token_id(tokenizer.special("eos_token"))
    if eos is not None:
        ids.add(eos)
    return ids
