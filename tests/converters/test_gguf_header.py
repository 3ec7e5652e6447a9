"""The fast GGUF header scan (plan, inspect, push's fit check, run --offload auto) gives what gguf-py's
reader gives, field for field and tensor for tensor, and a damaged file is a corrupt-file error."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from edgekit import api
from edgekit.converters.formats.gguf.header import GGUFHeader
from edgekit.converters.formats.gguf.read import read_gguf_header
from edgekit.errors import CorruptFileError, InputError


def _same(fast, full) -> None:
    assert list(fast.fields) == list(full.fields)
    for k, f in full.fields.items():
        a, b = _contents(fast.fields[k]), _contents(f)  # strings decode when asked, in both
        assert a == b or (isinstance(b, float) and np.isnan(a) and np.isnan(b)), k
        assert len(fast.fields[k].data) == len(f.data), k
    assert len(fast.tensors) == len(full.tensors)
    for x, y in zip(fast.tensors, full.tensors, strict=True):
        assert (x.name, x.tensor_type, [int(d) for d in x.shape], x.n_elements, x.n_bytes, x.data_offset,
                x.data.nbytes) == (y.name, y.tensor_type, [int(d) for d in y.shape], int(y.n_elements),
                                   int(y.n_bytes), int(y.data_offset), y.data.nbytes)


def _contents(field):
    try:
        return field.contents()
    except UnicodeDecodeError:
        return "not UTF-8"


@pytest.fixture(scope="module")
def tiny_files(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("hdr")
    return {p: api.convert(tiny_llama, "gguf", output=root / p,
                           recipe=api.ConvertRecipe(bits=None, preset=p)).model_file for p in ("F16", "Q8_0", "Q4_K_M")}


@pytest.mark.parametrize("preset", ["F16", "Q8_0", "Q4_K_M"])
def test_the_scan_equals_gguf_py_on_converted_files(tiny_files, preset):
    path = tiny_files[preset]
    _same(read_gguf_header(path, vocab=False), read_gguf_header(path))
    assert isinstance(read_gguf_header(path, vocab=False), GGUFHeader)


def test_the_scan_equals_gguf_py_on_the_real_model(real_gguf):
    _same(GGUFHeader(real_gguf), read_gguf_header(real_gguf))


def test_a_truncated_file_is_corrupt(tiny_files, tmp_path):
    src = tiny_files["Q8_0"]
    data = src.read_bytes()
    for cut in (0, 3, 20, 200, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError):
            read_gguf_header(p, vocab=False)


def test_damaged_headers_are_corrupt_file_errors_or_agree_with_gguf_py(tiny_files, tmp_path):
    """Random byte changes in the metadata and tensor table: the scan either reads what gguf-py reads or
    says the file is corrupt, never another error."""
    src = tiny_files["Q4_K_M"]
    data = bytearray(src.read_bytes())
    head = GGUFHeader(src).tensors[0].data_offset
    rng = random.Random(0)
    p = tmp_path / "bad.gguf"
    for _ in range(150):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(head)] = rng.randrange(256)
        p.write_bytes(bad)
        try:
            fast = read_gguf_header(p, vocab=False)
        except (CorruptFileError, InputError):
            continue
        try:
            full = read_gguf_header(p)
        except (CorruptFileError, InputError):
            continue  # gguf-py decodes some fields eagerly that the scan leaves for later (a token's bytes)
        _same(fast, full)


def test_a_v1_file_goes_to_gguf_py(tiny_files, tmp_path):
    p = tmp_path / "v1.gguf"
    shutil.copy(tiny_files["F16"], p)
    with open(p, "r+b") as f:
        f.seek(4)
        f.write((1).to_bytes(4, "little"))
    with pytest.raises(CorruptFileError):  # gguf-py does not read v1 either; the error is its own
        read_gguf_header(p, vocab=False)
