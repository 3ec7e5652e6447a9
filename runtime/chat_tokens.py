"""A chat prompt as segments, so that only the template's own markers become control tokens. The template
is rendered by :func:`edgekit.chat_template.make_renderer` (transformers' environment) on every backend.

Tokenizing: tokenizing the rendered template with special-token parsing on (as llama.cpp's
``special=True`` and tokenizers' added-token matching do) would also turn ``<|im_start|>system`` typed in
a message into a real turn: a user could inject a system prompt. When no message holds special-token
text, the rendered string is split on the special tokens exactly as a tokenizer does (so the ids are
those of ``apply_chat_template``). When one does, the template is rendered once more with a random
sentinel in place of each such content; the sentinels mark the template's own text, the contents are
found between those pieces of the real rendering (as given, stripped or JSON-escaped, the way templates
show them; or by position where that is unambiguous), and only the template's text is split on special
tokens. A template that rewrites such a message beyond recognition is refused rather than guessed at.

Pure functions; imported by the llama.cpp worker, so it imports nothing heavy.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from edgekit.chat_template import Render
from edgekit.errors import InputError

# (text, special): special is True only for one of the template's own special tokens
Segment = tuple[str, bool]


def special_splitter(specials: Iterable[str]) -> Callable[[str], list[Segment]]:
    """Splits template text into plain runs and special tokens, longest token first (as tokenizers match)."""
    names = sorted({s for s in specials if s}, key=len, reverse=True)
    pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def split(text: str) -> list[Segment]:
        if pattern is None:
            return [(text, False)]
        return [(part, i % 2 == 1) for i, part in enumerate(pattern.split(text)) if part]

    return split


def chat_segments(render: Render, messages: list[dict[str, Any]], specials: Iterable[str]) -> list[Segment]:
    """The rendered prompt as segments: the template's special tokens alone, everything else (messages'
    content included, whatever it holds) as plain text runs to tokenize with special parsing off."""
    specials = [s for s in specials if s]
    split = special_splitter(specials)
    plain = render(messages)
    risky = {i for i, m in enumerate(messages)
             if isinstance(m.get("content"), str) and any(s in m["content"] for s in specials)}
    if not risky:  # nothing to keep apart: the rendered text splits as a tokenizer splits it
        return _merged([split(plain)])
    nonce = secrets.token_hex(8)
    # Private-use characters around a fresh nonce: no message holds the sentinel by chance.
    sentinels = {f"\ue000{nonce}.{i}\ue001": messages[i]["content"] for i in sorted(risky)}
    by_index = {i: s for s, i in zip(sentinels, sorted(risky), strict=True)}
    marked = [{**m, "content": by_index[i]} if i in risky else m for i, m in enumerate(messages)]
    parts = re.split("(" + "|".join(map(re.escape, sentinels)) + ")", render(marked))
    texts = parts[0::2]
    spans = _content_spans(plain, texts, [sentinels[p] for p in parts[1::2]])
    if spans is None:
        typed = next(s for i in sorted(risky) for s in specials if s in messages[i]["content"])
        raise InputError(f"the chat template rewrites a message that holds special-token text ({typed!r}) in a way "
                         "edgekit cannot keep apart from the template's own tokens; remove that text from the "
                         "message or pass raw text (--raw)")
    pieces: list[list[Segment]] = []
    for i, text in enumerate(texts):
        pieces.append(split(text))
        if i < len(spans):
            pieces.append([(spans[i], False)])
    return _merged(pieces)


def _merged(pieces: Iterable[list[Segment]]) -> list[Segment]:
    """One list of segments, adjacent plain runs joined: tokenizers split on special tokens first and then
    tokenize each run between them, so a message's text is tokenized with the template text around it."""
    out: list[Segment] = []
    for piece in pieces:
        for text, special in piece:
            if not text:
                continue
            if not special and out and not out[-1][1]:
                out[-1] = (out[-1][0] + text, False)
            else:
                out.append((text, special))
    return out


def _content_spans(plain: str, texts: list[str], contents: list[str]) -> list[str] | None:
    """The text each content occurrence renders as in ``plain``, which is ``texts[0] + c0 + texts[1] + c1
    ... + texts[-1]``: first as the content is given, stripped or JSON-escaped (the template's ``| trim`` or
    ``| tojson``), else by position when only one split of ``plain`` fits; None when neither is certain."""
    found = _as_shown(plain, texts, contents)
    return found if found is not None else _by_position(plain, texts)


def _shown(content: str) -> list[str]:
    forms = [content, content.strip()]
    forms += [json.dumps(f, ensure_ascii=False)[1:-1] for f in forms]
    return list(dict.fromkeys(forms))


def _as_shown(plain: str, texts: list[str], contents: list[str]) -> list[str] | None:
    if not plain.startswith(texts[0]):
        return None
    # reach[k]: where content k may start, with the form that led there (for walking back)
    reach: list[dict[int, tuple[int, str]]] = [{len(texts[0]): (-1, "")}]
    for k, content in enumerate(contents):
        nxt: dict[int, tuple[int, str]] = {}
        for pos in reach[k]:
            for form in _shown(content):
                end = pos + len(form)
                if plain.startswith(form, pos) and plain.startswith(texts[k + 1], end):
                    nxt.setdefault(end + len(texts[k + 1]), (pos, form))
        if not nxt:
            return None
        reach.append(nxt)
    if len(plain) not in reach[-1]:
        return None
    out, pos = [], len(plain)
    for k in range(len(contents), 0, -1):
        pos, form = reach[k][pos]
        out.append(form)
    return out[::-1]


def _by_position(plain: str, texts: list[str]) -> list[str] | None:
    """The contents as what lies between the template's pieces of text, when the leftmost and the rightmost
    placements of those pieces agree (then no other placement exists)."""
    n = len(texts) - 1
    if n == 0:
        return [] if plain == texts[0] else None
    if not (plain.startswith(texts[0]) and plain.endswith(texts[-1])) or len(texts[0]) + len(texts[-1]) > len(plain):
        return None
    left, pos = [], len(texts[0])
    for k in range(1, n):
        j = plain.find(texts[k], pos)
        if j < 0:
            return None
        left.append((pos, j))
        pos = j + len(texts[k])
    last_end = len(plain) - len(texts[-1])
    if pos > last_end:
        return None
    left.append((pos, last_end))
    right, end = [], last_end
    for k in range(n - 1, 0, -1):
        j = plain.rfind(texts[k], 0, end)
        if j < 0:
            return None
        right.append((j + len(texts[k]), end))
        end = j
    right.append((len(texts[0]), end))
    if left != right[::-1]:
        return None
    return [plain[a:b] for a, b in left]


def tokenize_segments(segments: list[Segment], plain: Callable[[str], list[int]],
                      special: Callable[[str], list[int]]) -> list[int]:
    """Token ids of the segments: special tokens through ``special``, text runs through ``plain``."""
    ids: list[int] = []
    for text, is_special in segments:
        ids += special(text) if is_special else plain(text)
    return ids
