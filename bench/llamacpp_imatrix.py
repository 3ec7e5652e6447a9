"""llama.cpp with its importance matrix, as careful users run it: the peer of the quality benchmarks.

``llama-imatrix -m model-f32.gguf -f calibration.txt`` collects each matmul input's mean square over the
calibration text; ``llama-quantize --imatrix imatrix.gguf`` (which calls ``llama_model_quantize`` with
it) then quantizes. Both tools are built from the same llama.cpp sources as the llama-cpp-python wheel
by ``.ci/setup.sh --bench`` and cached in ``~/.cache/edgekit/bin/``; :func:`tools` finds them.

Used by ``bench/gguf_quality.py`` (its ``imatrix`` rows), ``bench/low_bit.py`` and ``bench/imatrix_vs_llamacpp.py``
(which also writes edgekit's importances in llama-imatrix's format, :func:`save_imatrix`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from edgekit.converters.formats.gguf.mixes import preset_from_name
from edgekit.converters.quantize.imatrix_file import read_imatrix, write_imatrix
from edgekit.runtime import llamacpp_build as build

N_THREADS = 2


def tools() -> tuple[Path, Path] | None:
    """``(llama-imatrix, llama-quantize)`` built for this CPU, or None when setup could not build them.

    Setup builds them for the CPU level it chose for this venv (``--cpu``, or the safer level it fell back
    to after a crash), so they are looked up under that level's key."""
    ver = version("llama_cpp_python")
    tag = f"{ver}-{build.key(build.resolve(build.remembered_level()))}"
    paths = (build.cache_dir() / "bin" / f"llama-imatrix-{tag}", build.cache_dir() / "bin" / f"llama-quantize-{tag}")
    return paths if all(p.is_file() for p in paths) else None


def have_tools() -> bool:
    """Whether :func:`tools` finds both; if not, says on stderr how to build them."""
    if tools() is not None:
        return True
    print("llama-imatrix / llama-quantize are not built for this CPU: run bash .ci/setup.sh --bench", file=sys.stderr)
    return False


def _run(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")
    return time.perf_counter() - t0


def make_imatrix(model: Path, text_file: Path, out: Path, chunks: int, ctx: int = 512) -> dict[str, float]:
    """Run llama-imatrix on ``chunks`` chunks of ``ctx`` tokens of ``text_file``; returns its wall time."""
    found = tools()
    if found is None:
        raise RuntimeError("llama-imatrix is not built: run bash .ci/setup.sh --bench")
    cmd = [str(found[0]), "-m", str(model), "-f", str(text_file), "-o", str(out), "--chunks", str(chunks),
           "-c", str(ctx), "-t", str(N_THREADS), "--no-ppl"]
    return {"imatrix_s": _run(cmd, "llama-imatrix"), "imatrix_chunks": chunks}


def quantize(src: Path, dst: Path, preset: str, imatrix: Path | None) -> dict[str, float]:
    """``llama-quantize [--imatrix FILE] src dst PRESET``; returns its wall time."""
    found = tools()
    if found is None:
        raise RuntimeError("llama-quantize is not built: run bash .ci/setup.sh --bench")
    name = preset_from_name(preset).name
    cmd = [str(found[1]), *(["--imatrix", str(imatrix)] if imatrix else []), str(src), str(dst), name,
           str(N_THREADS)]
    return {"quantize_s": _run(cmd, f"llama-quantize {name}")}


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """The per-column importances llama-quantize derives from an imatrix file (``in_sum2 / counts`` per expert,
    1 where a tensor saw no tokens), keyed by tensor name, flat: edgekit's reader (``--imatrix FILE``)."""
    return {name: im.reshape(-1) for name, im in read_imatrix(path).importances.items()}


# edgekit's importances written as llama-imatrix's GGUF file, which llama-quantize --imatrix reads
save_imatrix = write_imatrix


if __name__ == "__main__":  # a helper module: --help says what it is; a bare run says where the tools are
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run on its own it only reports whether llama-imatrix and llama-quantize are built.").parse_args()
    found = tools()
    print(f"llama-imatrix: {found[0]}\nllama-quantize: {found[1]}" if found else
          "llama-imatrix / llama-quantize: not built for this CPU (run .ci/setup.sh --bench)")
