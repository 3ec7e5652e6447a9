"""A chat prompt as segments, so that only the template's own markers become control tokens.

Tokenizing the rendered template with special-token parsing on (as llama.cpp's ``special=True`` and
tokenizers' added-token matching do) would also turn ``<|im_start|>system`` typed in a message into a
real turn: a user could inject a system prompt. Here the template is rendered once with a random
sentinel in place of each message's content; the sentinels mark where the content goes, so the
template's text is split on the tokenizer's special tokens and the content never is. The plain text on
either side of a content piece is kept in one run with it, because tokenizers split on special tokens
first and then tokenize each run between them: for messages with no special-token text the ids are
exactly those of the whole rendered string (the tests check this on SmolLM2's template, both backends).

Pure functions; the backends supply the renderer and the special-token strings. Imported by the
llama.cpp worker, so it imports nothing heavy.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable

Render = Callable[[list[dict[str, str]]], str]
# Every backend refuses chat messages with this line when the model ships no chat template: a guessed
# format (llama.cpp falls back to ChatML) would prompt the model in a way it was never trained on.
NO_CHAT_TEMPLATE = "this model has no chat template; pass raw text (--raw)"
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


def chat_segments(render: Render, messages: list[dict[str, str]], specials: Iterable[str]) -> list[Segment]:
    """The rendered prompt as segments: the template's special tokens alone, everything else (messages'
    content included, whatever it holds) as plain text runs to tokenize with special parsing off."""
    nonce = secrets.token_hex(8)
    # Private-use characters around a fresh nonce: no message can hold the sentinel, no template alters it.
    sentinels = [f"\ue000{nonce}.{i}\ue001" for i in range(len(messages))]
    marked = [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)]
    parts = re.split("(" + "|".join(map(re.escape, sentinels)) + ")", render(marked))
    contents = _contents(render, messages, parts, sentinels)
    split = special_splitter(specials)
    out: list[Segment] = []
    for i, part in enumerate(parts):
        pieces = [(contents[sentinels.index(part)], False)] if i % 2 else split(part)
        for text, special in pieces:
            if not text:
                continue
            if not special and out and not out[-1][1]:
                out[-1] = (out[-1][0] + text, False)
            else:
                out.append((text, special))
    return out


def _contents(render: Render, messages: list[dict[str, str]], parts: list[str], sentinels: list[str]) -> list[str]:
    """Each message's content as the template shows it. Templates that trim content (Llama 3's ``| trim``)
    are matched against the plain rendering; any other transformation keeps the content as given."""
    given = [str(m.get("content") or "") for m in messages]
    plain = render(messages)
    for contents in (given, [c.strip() for c in given]):
        joined = "".join(contents[sentinels.index(p)] if i % 2 else p for i, p in enumerate(parts))
        if joined == plain:
            return contents
    return given


def tokenize_segments(segments: list[Segment], plain: Callable[[str], list[int]],
                      special: Callable[[str], list[int]]) -> list[int]:
    """Token ids of the segments: special tokens through ``special``, text runs through ``plain``."""
    ids: list[int] = []
    for text, is_special in segments:
        ids += special(text) if is_special else plain(text)
    return ids
