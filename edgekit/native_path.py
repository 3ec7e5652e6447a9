"""Model paths for native runtimes (llama.cpp, onnxruntime, Core ML, MLC's engine), which take them as UTF-8.

Linux lets a name hold any bytes; Python hands those that are not UTF-8 over as lone surrogates
(``surrogateescape``) and its own file calls turn them back, but llama-cpp-python and onnxruntime's bindings
encode a path as strict UTF-8 and fail in words that blame the file ("surrogates not allowed", "incompatible
constructor arguments": reported as a damaged model). So such a model is opened through a symbolic link, made
in a temporary folder, to the folder that holds it: the runtime reads the same file, and its neighbours (ONNX
external data, split GGUF parts), under a UTF-8 path. Where no link can do it (the file's own name is not
UTF-8, the temporary folder takes no link) or the runtime may read the path again later (Core ML, MLC's
engine), the model is refused before loading, in one line that says what to rename.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgekit.errors import EdgekitError, InputError


def undecodable(text: str) -> str | None:
    """What in ``text`` is not UTF-8 (``"byte 0xe9"``: a byte the file system held that Python keeps as a lone
    surrogate), or None when all of it encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
    return None


def not_utf8(path: str | Path, runtime: str, bad: str, fix: str = "the folder or the file") -> InputError:
    return InputError(f"{path} is not valid UTF-8 (the name holds {bad}), which {runtime} cannot open: "
                      f"rename {fix}")


def check_utf8_path(path: str | Path, runtime: str) -> None:
    """Refuse ``path`` before ``runtime``, which cannot encode it and may read it again after loading, gets it."""
    if bad := undecodable(str(path)):
        raise not_utf8(path, runtime, bad)


def utf8_path(path: str | Path, runtime: str, folder: Callable[[], str]) -> str:
    """``path`` as ``runtime`` can open it: itself (resolved, where that is UTF-8), else the same file through
    a symbolic link to the folder holding it, made in ``folder()`` (a folder the caller removes once the runtime
    is done with the path). An :class:`InputError` that says what to rename where no link can do it."""
    text = str(path)
    bad = undecodable(text)
    if bad is None:
        return text
    real = Path(path).resolve()
    if undecodable(str(real)) is None:  # a link with an odd name to a file whose own path is plain
        return str(real)
    if bad_name := undecodable(real.name):
        raise not_utf8(path, runtime, bad_name, "the file")
    try:
        where = folder()
        if undecodable(where) is None:
            link = Path(tempfile.mkdtemp(prefix="utf8-", dir=where)) / "folder"
            link.symlink_to(real.parent, target_is_directory=True)
            return str(link / real.name)
    except (OSError, EdgekitError):  # no temporary folder, or one that takes no links: the plain refusal
        pass
    raise not_utf8(path, runtime, bad, "the folder")


@contextlib.contextmanager
def utf8_path_to_load(path: str | Path, runtime: str) -> Iterator[str]:
    """:func:`utf8_path` for a runtime that is done with the path once it has loaded (onnxruntime reads the
    graph and its external data while the session is made): the link goes when the block ends."""
    made: list[str] = []

    def folder() -> str:
        made.append(tempfile.mkdtemp(prefix="edgekit-path-"))
        return made[-1]

    try:
        yield utf8_path(path, runtime, folder)
    finally:
        for f in made:
            shutil.rmtree(f, ignore_errors=True)
