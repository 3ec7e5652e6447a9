"""Fuzzing edgekit's readers as a user (or an attacker) would hit them: mutated files through the CLI.

    python bench/fuzz.py [--cases 1000] [--seed 0] [--jobs 2] [--timeout 60] [--targets gguf-real,onnx-graph,...]
                         [--out PATH]

Each case mutates one file of a model (tests/fuzzing.py: GGUF header fields, bits and lengths; JSON
values; ONNX protobuf bytes; truncations), then runs the command a user would run on it in a fresh
process with a timeout:

* ``gguf-real``: the real SmolLM2-135M-Instruct Q4_1 GGUF, header mutated -> ``edgekit inspect``;
* ``gguf-tiny``: a tiny Llama GGUF built here -> ``edgekit inspect`` (every 4th case ``edgekit import``);
* ``gguf-manifest``: that tiny GGUF artifact's edgekit.json -> ``edgekit inspect``;
* ``hf-config``: the tiny checkpoint's config.json -> ``edgekit convert --type F16``;
* ``onnx-graph`` / ``onnx-config`` / ``onnx-manifest`` / ``onnx-data``: the real model's 4-bit ONNX artifact
  (its model.onnx, config.json, edgekit.json, or model.onnx.data cut short) -> ``edgekit inspect``.

Manifest mutations reach every key; ``--past-open`` leaves those Artifact.open reads to find the model file
(schema, format, files) alone, to aim the cases at what inspect reads after that.

Outcomes: ``accepted`` (exit 0), ``refused`` (one ``error:`` line, exit 2-6), ``crash`` (a traceback, an
"internal error", a signal or another exit code) and ``hang`` (past the timeout). The target is no crash and
no hang. Writes ``bench/results/fuzz.json`` (every crash and hang with its seed and mutation) and ``fuzz.md``
(``--out PATH``: ``PATH.json`` and ``PATH.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gguf_rtn import cpu_model, log  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.quickstart import fetch_default_gguf  # noqa: E402
from tests.fuzzing import ARTIFACT_KEYS, classify, gguf_layout, mutate_bytes, mutate_gguf, mutate_json  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EDGEKIT = str(Path(sys.executable).parent / "edgekit")
TARGETS = ("gguf-real", "gguf-tiny", "gguf-manifest", "hf-config", "onnx-graph", "onnx-config", "onnx-manifest",
           "onnx-data")


def fixtures(work: Path) -> dict[str, Path]:
    """The unmutated models: the real GGUF and ONNX artifact from edgekit's cache, a tiny checkpoint and GGUF."""
    from edgekit import api
    from tests.helpers import build_tiny_model

    onnx_art = edgekit_home() / "bench-onnx" / "edgekit-rtn-b32"
    if not (onnx_art / "edgekit.json").exists():
        raise SystemExit(f"{onnx_art} is missing; run bench/onnx_vs_peers.py first (it writes the ONNX artifacts)")
    tiny = build_tiny_model(work / "tiny-hf", "LlamaForCausalLM", hidden=64, ffn=128, heads=4, kv_heads=2)
    art = api.convert(tiny, "gguf", output=work / "tiny-gguf", recipe=api.ConvertRecipe(tensor_types=(), bits=8))
    return {"real_gguf": fetch_default_gguf(), "tiny_hf": tiny, "tiny_art": art.path, "tiny_gguf": art.model_file,
            "onnx_art": onnx_art}


class Case:
    def __init__(self, i: int, target: str, seed: int) -> None:
        self.i, self.target, self.seed = i, target, seed
        self.rng = random.Random(seed)
        self.mutation = ""
        self.artifact_keys = False
        self.n_targets = 1


def _copy_folder(src: Path, dst: Path, mutated: str) -> None:
    """The folder with every file but ``mutated`` hard-linked (the big weights are never copied; an artifact
    holding a symbolic link out of itself is refused, so links would only test that)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != mutated:
            try:
                (dst / f.name).hardlink_to(f.resolve())
            except OSError:  # another file system
                shutil.copy2(f.resolve(), dst / f.name)


def materialize(case: Case, fx: dict[str, Path], layouts: dict[str, tuple], d: Path) -> list[str]:
    """Write the mutated model under ``d`` and return the command line to run on it."""
    t, rng = case.target, case.rng
    if t in ("gguf-real", "gguf-tiny"):
        src = fx["real_gguf" if t == "gguf-real" else "tiny_gguf"]
        spans, end = layouts[t]
        data, case.mutation = mutate_gguf(src.read_bytes(), spans, end, rng)
        out = d / "m.gguf"
        out.write_bytes(data)
        if t == "gguf-tiny" and case.i // case.n_targets % 4 == 0:  # every 4th case of this target
            return ["import", str(out), "-o", str(d / "imported")]
        return ["inspect", str(out)]
    if t == "hf-config":
        _copy_folder(fx["tiny_hf"], d / "hf", "config.json")
        data, case.mutation = mutate_json((fx["tiny_hf"] / "config.json").read_bytes(), rng)
        (d / "hf" / "config.json").write_bytes(data)
        return ["convert", str(d / "hf"), "--to", "gguf", "--type", "F16", "-o", str(d / "out")]
    folder, name = {"gguf-manifest": (fx["tiny_art"], "edgekit.json"), "onnx-graph": (fx["onnx_art"], "model.onnx"),
                    "onnx-config": (fx["onnx_art"], "config.json"), "onnx-manifest": (fx["onnx_art"], "edgekit.json"),
                    "onnx-data": (fx["onnx_art"], "model.onnx.data")}[t]
    art = d / "art"
    _copy_folder(folder, art, name)
    if t == "onnx-data":  # cut short: a sparse file of the first N bytes' length (inspect reads no weights)
        n = rng.randrange((folder / name).stat().st_size)
        with open(art / name, "wb") as f:
            f.truncate(n)
        case.mutation = f"truncate@{n}"
    elif t == "onnx-graph":
        data, case.mutation = mutate_bytes((folder / name).read_bytes(), rng)
        (art / name).write_bytes(data)
    else:
        keep = ARTIFACT_KEYS if name == "edgekit.json" and not case.artifact_keys else ()
        data, case.mutation = mutate_json((folder / name).read_bytes(), rng, keep=keep)
        (art / name).write_bytes(data)
    return ["inspect", str(art)]


def run_case(case: Case, fx: dict[str, Path], layouts: dict[str, tuple], timeout: float) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"fuzz-{case.i}-"))
    try:
        args = materialize(case, fx, layouts, d)
        t0 = time.perf_counter()
        try:
            p = subprocess.run([EDGEKIT, *args], capture_output=True, text=True, errors="replace", timeout=timeout,
                               env={**os.environ, "EDGEKIT_DEBUG": ""}, stdin=subprocess.DEVNULL)
            code, output = (p.returncode if p.returncode >= 0 else 128 - p.returncode), p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            code, output = None, ""
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    outcome = classify(code, output)
    last = next((ln for ln in reversed(output.splitlines()) if ln.strip()), "")
    return {"case": case.i, "target": case.target, "seed": case.seed, "command": args[0], "mutation": case.mutation,
            "outcome": outcome, "exit": code, "seconds": round(seconds, 2), "last_line": last[:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--name", default="fuzz", help="results file name: bench/results/NAME.json and NAME.md "
                    "(without --out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="writes OUT.json and OUT.md (default: bench/results/NAME)")
    ap.add_argument("--past-open", dest="artifact_keys", action="store_false",
                    help="leave the manifest keys Artifact.open reads (schema, format, files) intact")
    a = ap.parse_args()
    targets = [t for t in a.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    work = Path(tempfile.mkdtemp(prefix="edgekit-fuzz-"))
    try:
        log("building the fixtures")
        fx = fixtures(work)
        layouts = {"gguf-real": gguf_layout(fx["real_gguf"]), "gguf-tiny": gguf_layout(fx["tiny_gguf"])}
        master = random.Random(a.seed)
        cases = [Case(i, targets[i % len(targets)], master.getrandbits(32)) for i in range(a.cases)]
        for c in cases:
            c.artifact_keys, c.n_targets = a.artifact_keys, len(targets)
        rows: list[dict] = []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.jobs) as pool:
            for row in pool.map(lambda c: run_case(c, fx, layouts, a.timeout), cases):
                rows.append(row)
                if row["outcome"] in ("crash", "hang"):
                    log(f"{row['outcome']}: case {row['case']} {row['target']} {row['mutation']}: {row['last_line']}")
                if len(rows) % 50 == 0:
                    log(f"{len(rows)}/{a.cases} cases")
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, a, wall)


def report(rows: list[dict], a: argparse.Namespace, wall: float) -> None:
    outcomes = ("accepted", "refused", "crash", "hang")
    by_target: dict[str, Counter] = {}
    for r in rows:
        by_target.setdefault(r["target"], Counter())[r["outcome"]] += 1
    total = Counter(r["outcome"] for r in rows)
    table = Table(title=f"fuzz: {len(rows)} cases, seed {a.seed}, timeout {a.timeout:g} s, {wall:.0f} s wall")
    for col in ("target", "cases", *outcomes, "slowest s"):
        table.add_column(col, justify="left" if col == "target" else "right")
    lines = ["| target | cases | " + " | ".join(outcomes) + " | slowest s |", "|---" * (len(outcomes) + 3) + "|"]
    for target, c in [*by_target.items(), ("all", total)]:
        slow = max((r["seconds"] for r in rows if target in ("all", r["target"])), default=0.0)
        cells = [target, str(sum(c.values())), *(str(c[o]) for o in outcomes), f"{slow:.1f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    by_command = {cmd: dict(Counter(r["outcome"] for r in rows if r["command"] == cmd))
                  for cmd in sorted({r["command"] for r in rows})}
    lines += ["", "By command: " + "; ".join(f"{cmd} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                                          for cmd, c in by_command.items())]
    bad = [r for r in rows if r["outcome"] in ("crash", "hang")]
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "artifact_keys": a.artifact_keys,
            "cases": len(rows), "seed": a.seed, "timeout_s": a.timeout, "jobs": a.jobs, "wall_s": round(wall, 1)}
    out = a.out if a.out is not None else RESULTS / a.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "totals": {o: total[o] for o in outcomes},
                                                    "by_target": {t: dict(c) for t, c in by_target.items()},
                                                    "by_command": by_command,
                                                    "failures": bad}, indent=2) + "\n")
    md = [f"# edgekit fuzz: {len(rows)} cases", "",
          f"{meta['date']}, {meta['cpu']}, seed {a.seed}, timeout {a.timeout:g} s per case, {a.jobs} jobs, "
          f"{wall:.0f} s wall. Replay with `python bench/fuzz.py --cases {len(rows)} --seed {a.seed} --targets {a.targets}`.", "", *lines, ""]
    md += [f"- {r['outcome']}: case {r['case']} ({r['target']}, {r['mutation']}): `{r['last_line']}`" for r in bad]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"crashes {total['crash']}, hangs {total['hang']}; wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
