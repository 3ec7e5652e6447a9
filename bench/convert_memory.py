"""How much memory a conversion takes, per format, against the peers that write the same format.

    python bench/convert_memory.py [--model DIR|synthetic:SPEC] [--formats gguf,onnx,mlc,coreml]
                                   [--genai-path DIR] [--out bench/results/convert_memory]

The default model is convert_speed.py's TinyLlama-shaped Llama (hidden 2048, FFN 5632, 22 layers, bf16,
random weights) with SmolLM2's tokenizer (vocabulary 49152, untied head): the embedding and the head are
100M parameters each, which is where a converter that holds a whole tensor in float32 more than once pays.
Each row is one child process; its peak resident memory is sampled from ``/proc/PID/status`` every 20 ms
(anonymous memory, which the machine must find, and file-backed pages, which it can drop) together with
``VmHWM``, the kernel's own high-water mark of both (the figure ``/usr/bin/time`` prints as maxrss), which
catches a spike between two samples. (``getrusage``'s children maximum would not do: a child forked from this
process counts the parent's memory until it execs.)

Rows: ``edgekit convert --bits 4`` to each format (GGUF Q4_K_M, ONNX MatMulNBits 4-bit, MLC q4f16_1, Core ML
4-bit blockwise), and the peers: llama.cpp's ``convert_hf_to_gguf.py --outtype auto`` (its first step; the
bf16 intermediate that ``llama-quantize`` then reads) and onnxruntime-genai's model builder (``-p int4 -e
cpu``) when it can be imported (``--genai-path`` adds a folder it was installed into with ``pip install
--target``). Wall times are printed for context only (the machine may be shared).
Prints a table and writes ``.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import get_model, log, machine_info, publish  # noqa: E402
from convert_speed import DEFAULT_MODEL, resolve_model  # noqa: E402
from gguf_rtn import EDGEKIT_CLI, llamacpp_converter  # noqa: E402
from rich.table import Table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = "gguf,onnx,mlc,coreml"


def _status_kb(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of ``pid`` in KiB (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measured_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall time, sampled peaks of anonymous and file-backed memory, and its ``VmHWM``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}

    def sample() -> None:
        while proc.poll() is None:
            for k, v in _status_kb(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-10:])
        raise RuntimeError(f"{cmd[0]} ... failed (exit {proc.returncode}): {tail}")
    return {"wall_s": round(wall, 1), "peak_anon_mb": round(peak["RssAnon"] / 1024, 1),
            "peak_file_mb": round(peak["RssFile"] / 1024, 1), "vmhwm_mb": round(peak["VmHWM"] / 1024, 1)}


def genai_importable(extra: str | None) -> bool:
    env = dict(os.environ, PYTHONPATH=extra) if extra else None
    return subprocess.run([sys.executable, "-c", "import onnxruntime_genai.models.builder"], env=env,
                          capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--genai-path", default=None, help="a folder onnxruntime-genai was pip-installed into")
    ap.add_argument("--out", type=Path, default=RESULTS / "convert_memory")
    args = ap.parse_args()
    t_start = time.perf_counter()
    machine = machine_info()
    hf = resolve_model(args.model) if args.model.startswith("synthetic:") else Path(args.model).expanduser()
    get_model()  # the tokenizer source of a synthetic model, imported once
    ckpt_mb = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        work = Path(tmp)
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            log(f"edgekit convert --to {fmt} --bits 4")
            r = measured_child([str(EDGEKIT_CLI), "convert", str(hf), "--to", fmt, "--bits", "4",
                                "-o", str(work / f"edgekit-{fmt}")])
            rows.append({"row": f"edgekit --to {fmt} --bits 4", "format": fmt, "peer": False, **r})
            subprocess.run(["rm", "-rf", str(work / f"edgekit-{fmt}")], check=True)
            if fmt == "gguf":
                peer, info = llamacpp_converter()
                if peer is None:
                    log(f"llama.cpp's converter unavailable: {info.get('error')}")
                    continue
                log("convert_hf_to_gguf.py --outtype auto")
                env = dict(os.environ, PYTHONPATH=str(peer / "gguf-py"))
                r = measured_child([sys.executable, str(peer / "convert_hf_to_gguf.py"), str(hf), "--outtype",
                                    "auto", "--outfile", str(work / "peer.gguf")], env)
                rows.append({"row": "llama.cpp convert_hf_to_gguf.py (auto)", "format": fmt, "peer": True, **r})
                (work / "peer.gguf").unlink(missing_ok=True)
            if fmt == "onnx":
                if not genai_importable(args.genai_path):
                    log("onnxruntime-genai is not importable; no ONNX peer row")
                    continue
                log("onnxruntime-genai model builder -p int4 -e cpu")
                env = dict(os.environ, PYTHONPATH=args.genai_path) if args.genai_path else None
                r = measured_child([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                                    str(work / "genai"), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")],
                                   env)
                rows.append({"row": "onnxruntime-genai builder int4", "format": fmt, "peer": True, **r})
                subprocess.run(["rm", "-rf", str(work / "genai"), str(work / "genai-cache")], check=True)
    for r in rows:
        r["anon_vs_checkpoint"] = round(r["peak_anon_mb"] / ckpt_mb, 3)
        peers = [p for p in rows if p["peer"] and p["format"] == r["format"]]
        if not r["peer"] and peers:
            r["anon_vs_peer"] = round(r["peak_anon_mb"] / peers[0]["peak_anon_mb"], 3)
    table = Table(title=f"conversion memory: {hf.name} ({ckpt_mb:.0f} MB of safetensors)")
    for col in ("row", "peak anon MB", "peak file MB", "VmHWM MB", "anon / checkpoint", "anon / peer", "wall s"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(r["row"], f"{r['peak_anon_mb']:.0f}", f"{r['peak_file_mb']:.0f}",
                      f"{r['vmhwm_mb']:.0f}", f"{r['anon_vs_checkpoint']:.2f}",
                      f"{r['anon_vs_peer']:.2f}" if "anon_vs_peer" in r else "", f"{r['wall_s']:.0f}")
    lines = ["peak anon: memory the machine must find (sampled every 20 ms); file: checkpoint pages it can drop; "
             "VmHWM: the kernel's high-water mark of both (maxrss)"]
    report = {"model": str(hf), "checkpoint_mb": round(ckpt_mb, 1), "rows": rows, "machine": machine,
              "total_s": time.perf_counter() - t_start}
    publish(report, table, lines, args.out)


if __name__ == "__main__":
    main()
