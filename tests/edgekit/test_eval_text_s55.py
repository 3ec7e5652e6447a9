"""eval's text file as its bytes say (QA s55 non-English text): a UTF-8 byte-order mark is not text, CRLF is
kept (llama-perplexity reads the bytes as they are), and a UTF-16 or Latin-1 file is a one-line error that
names what it is."""

from __future__ import annotations

import pytest

from edgekit.errors import InputError
from edgekit.evaluate import read_text


def test_a_utf8_bom_is_not_text_and_crlf_is_kept(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbfline one\r\nz\xc3\xa9ro \xe6\x97\xa5\xe6\x9c\xac\r\n")
    assert read_text(f) == "line one\r\nzéro 日本\r\n"


@pytest.mark.parametrize(("data", "words"), [
    ("héllo\n".encode("utf-16"), "is UTF-16 text (its byte-order mark says so)"),
    ("héllo\n".encode("utf-32"), "is UTF-32 text"),
    ("héllo\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 1)"),
])
def test_other_encodings_are_named(tmp_path, data, words):
    f = tmp_path / "t.txt"
    f.write_bytes(data)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        read_text(f)
    assert "\n" not in str(e.value)
