"""The bad-input catalogue of the hardening issue, re-run as a user would: every case through the CLI.

    python bench/bad_input_catalogue.py [--only NAME,...] [--out PATH]

Each case builds its bad input in a scratch folder (tiny random checkpoints for converts, copies of the
real SmolLM2-135M-Instruct for run/inspect/import), runs ``edgekit`` as a child process and checks what a
user would check:

* refused: exit code non-zero (or, for cases with a right answer, exit 0 and that answer);
* one line: the refusal is one line on stderr, with no traceback and no "internal error";
* what was expected: the message says the thing (``expect``), and nothing leaks (``forbid``);
* nothing lost or left behind: the user's files are intact, no hidden ``.partial`` folders remain.

Writes ``bench/results/bad_input_catalogue.json`` and ``.txt`` (``--out PATH``: ``PATH.json``/``.txt``; a run
with ``--only`` writes nothing unless ``--out`` is given). Needs root (or user namespaces) for the
full-disk and read-only mounts; without them those cases say "skipped".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
EDGEKIT = [sys.executable, "-m", "edgekit.cli.main"]
TIMEOUT = 180


@dataclass
class Outcome:
    case: str
    command: str
    code: int | None
    seconds: float
    stderr_lines: int
    message: str
    passed: bool
    checks: dict[str, bool] = field(default_factory=dict)
    note: str = ""


def edgekit(*args: object, cwd: Path | None = None, stdin: bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> tuple[int | None, str, str, float]:
    cmd = [*EDGEKIT, *(os.fsencode(a) if isinstance(a, bytes) else str(a) for a in args)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, cwd=cwd, input=stdin, timeout=timeout,
                           env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})})
    except subprocess.TimeoutExpired as exc:
        return None, (exc.stdout or b"").decode(errors="replace"), "TIMEOUT", time.perf_counter() - t0
    return (p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"),
            time.perf_counter() - t0)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".partial" in p.name or ".old-" in p.name)


def judge(case: str, args: tuple, res: tuple, *, refuse: bool = True, expect: tuple[str, ...] = (),
          forbid: tuple[str, ...] = (), extra: dict[str, bool] | None = None, note: str = "") -> Outcome:
    code, out, err, secs = res
    lines = [ln for ln in err.splitlines() if ln.strip()]
    text = out + err
    checks = {
        "no hang": code is not None,
        "exit": (code not in (0, None)) if refuse else code == 0,
        "no traceback": "Traceback" not in text and "internal error" not in text,
        "one line": (len(lines) == 1) if refuse else True,
        **{f"says {e!r}": e.lower() in text.lower() for e in expect},
        **{f"no {f!r}": f not in text for f in forbid},
        **(extra or {}),
    }
    shown = " ".join(str(a) for a in args)
    message = lines[-1] if lines else (out.strip().splitlines() or [""])[-1]
    return Outcome(case, f"edgekit {shown}", code, round(secs, 2), len(lines), message[:300],
                   all(checks.values()), checks, note)


# ---------------------------------------------------------------- fixtures


class Fixtures:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._tiny: Path | None = None
        self._tiny_gguf: Path | None = None

    def tiny(self) -> Path:
        if self._tiny is None:
            from tests.helpers import build_tiny_model

            self._tiny = build_tiny_model(self.scratch / "tiny", "LlamaForCausalLM", hidden=256, ffn=512)
        return self._tiny

    def tiny_copy(self, name: str) -> Path:
        dst = self.scratch / name
        shutil.copytree(self.tiny(), dst)
        return dst

    def tiny_gguf(self) -> Path:
        if self._tiny_gguf is None:
            out = self.scratch / "tiny-gguf"
            code, _, err, _ = edgekit("convert", self.tiny(), "--type", "Q8_0", "-o", out)
            assert code == 0, err
            self._tiny_gguf = out
        return self._tiny_gguf

    def real_gguf_artifact(self, name: str) -> Path:
        from edgekit.quickstart import fetch_default_gguf

        dst = self.scratch / name
        dst.mkdir()
        shutil.copy(fetch_default_gguf(), dst / "model.gguf")
        return dst / "model.gguf"

    def real_hf(self) -> Path:
        from edgekit.fsutil import edgekit_home

        return edgekit_home() / "SmolLM2-135M-Instruct"

    def real_artifact(self) -> Path:
        """A converted Q8_0 GGUF artifact of the real model (cached across runs)."""
        from edgekit.fsutil import edgekit_home

        out = edgekit_home() / "bench-catalogue" / "real-q8_0"
        manifest = out / "edgekit.json"
        if not manifest.exists() or "sha256" not in json.loads(manifest.read_text()):
            code, _, err, _ = edgekit("convert", self.real_hf(), "--type", "Q8_0", "-o", out, "--force")
            assert code == 0, err
        return out

    def onnx_artifact(self) -> Path:
        out = self.scratch / "tiny-onnx"
        if not out.exists():
            code, _, err, _ = edgekit("convert", self.tiny(), "--to", "onnx", "--bits", "4", "-o", out)
            assert code == 0, err
        return out


def mount(target: Path, *opts: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ---------------------------------------------------------------- cases


def manifest_escape(fx: Fixtures) -> Outcome:
    art = fx.scratch / "escape"
    shutil.copytree(fx.tiny_gguf(), art)
    m = json.loads((art / "edgekit.json").read_text())
    m["files"]["model"] = "../../../../../../etc/passwd"
    (art / "edgekit.json").write_text(json.dumps(m))
    args = ("inspect", art)
    # the old behaviour opened /etc/passwd and complained about its GGUF magic
    return judge("manifest path outside the artifact", args, edgekit(*args), forbid=("root:x:0", "magic"))


def manifest_shapes(fx: Fixtures) -> list[Outcome]:
    res = []
    for label, content in [("a list", "[1, 2]"), ("without files", '{"schema": "edgekit.artifact/1", "format": "gguf"}')]:
        art = fx.scratch / f"manifest-{label.replace(' ', '-')}"
        shutil.copytree(fx.tiny_gguf(), art)
        (art / "edgekit.json").write_text(content)
        args = ("inspect", art)
        res.append(judge(f"manifest that is {label}", args, edgekit(*args)))
    return res


def push_symlink(fx: Fixtures) -> Outcome:
    art = fx.scratch / "symlinked"
    shutil.copytree(fx.tiny_gguf(), art)
    (art / "extra").symlink_to("/etc/shadow")
    dest = fx.scratch / "push-dest-1"
    args = ("push", art, "host", "--dest", dest)
    out = judge("push of an artifact holding a symlink out of it", args, edgekit(*args))
    shadow_sent = any(p.name == "extra" for p in dest.rglob("*")) if dest.exists() else False
    out.checks["/etc/shadow not copied"] = not shadow_sent
    out.passed = all(out.checks.values())
    return out


def force_non_artifact(fx: Fixtures) -> Outcome:
    folder = fx.scratch / "my-project"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    args = ("convert", fx.tiny(), "--type", "Q8_0", "-o", folder, "--force")
    res = edgekit(*args)
    return judge("convert --force onto a folder that is not an artifact", args, res,
                 extra={"user's file kept": (folder / "thesis.tex").exists()})


def force_artifact_says(fx: Fixtures) -> Outcome:
    out = fx.scratch / "replace-me"
    edgekit("convert", fx.tiny(), "--type", "Q8_0", "-o", out)
    args = ("convert", fx.tiny(), "--type", "Q4_0", "-o", out, "--force")
    return judge("convert --force onto an artifact says what it replaced", args, edgekit(*args), refuse=False,
                 expect=("replac",))


def concurrent_converts(fx: Fixtures) -> Outcome:
    out = fx.scratch / "race"
    cmd = [*EDGEKIT, "convert", str(fx.tiny()), "--type", "Q8_0", "-o", str(out)]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    results = [(p.wait(timeout=TIMEOUT), *(s.decode() for s in p.communicate())) for p in procs]
    secs = time.perf_counter() - t0
    codes = sorted(r[0] for r in results)
    loser = next((r for r in results if r[0] != 0), (0, "", ""))
    lines = [ln for ln in loser[2].splitlines() if ln.strip()]
    checks = {"one succeeded": codes[0] == 0, "one refused": codes[1] != 0,
              "refusal is one line": len(lines) == 1,
              "no traceback": all("Traceback" not in r[1] + r[2] for r in results),
              "nothing left behind": not leftovers(fx.scratch)}
    return Outcome("two concurrent converts into one -o", "edgekit convert ... -o race  (x2 at once)",
                   codes[1], round(secs, 2), len(lines), lines[-1][:300] if lines else "", all(checks.values()), checks)


def corrupt_tensor_data(fx: Fixtures) -> Outcome:
    art = fx.scratch / "corrupt-data"
    shutil.copytree(fx.real_artifact(), art)
    model = art / "model.gguf"
    size = model.stat().st_size
    with open(model, "r+b") as f:  # flip bytes in the middle of the tensor data
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    args = ("run", art, "-p", "Hello", "-n", "4")
    return judge("GGUF whose tensor data was corrupted", args, edgekit(*args), expect=("changed",))


def markup_in_path(fx: Fixtures) -> Outcome:
    p = fx.scratch / "x[/bold]y[ios]"
    args = ("inspect", p)
    return judge("a path containing [/bold] and [ios]", args, edgekit(*args), expect=("x[/bold]y[ios]",))


def gguf_block_count(fx: Fixtures) -> list[Outcome]:
    import gguf
    import numpy as np

    path = fx.real_gguf_artifact("huge-layers")
    reader = gguf.GGUFReader(path)
    fld = reader.fields["llama.block_count"]
    offset = int(fld.parts[fld.data[0]].ctypes.data - reader.data.ctypes.data)
    del reader
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.uint32(2_155_872_286).tobytes())
    res = []
    for args in [("inspect", path), ("import", path, "-o", fx.scratch / "huge-import")]:
        res.append(judge(f"GGUF with block_count 2,155,872,286: {args[0]}", args, edgekit(*args, timeout=60)))
    return res


def bad_configs(fx: Fixtures) -> list[Outcome]:
    res = []
    cases: list[tuple[str, Callable[[dict], object]]] = [
        ("config.json that is a list", lambda c: [c]),
        ("config.json with zero heads", lambda c: {**c, "num_attention_heads": 0}),
        ("architectures as a string", lambda c: {**c, "architectures": "LlamaForCausalLM"}),
    ]
    for label, mutate in cases:
        folder = fx.tiny_copy(label.replace(" ", "-").replace(".", ""))
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(mutate(cfg)))
        args = ("convert", folder, "--type", "Q8_0", "-o", fx.scratch / f"out-{folder.name}")
        res.append(judge(label, args, edgekit(*args), forbid=("L, l, a",)))
    return res


def config_disagrees(fx: Fixtures) -> list[Outcome]:
    res = []
    for key, value in [("num_attention_heads", 8), ("num_hidden_layers", 40)]:
        folder = fx.scratch / f"real-{key}"
        folder.mkdir()
        for f in fx.real_hf().iterdir():
            (folder / f.name).symlink_to(f) if f.name != "config.json" else None
        cfg = json.loads((fx.real_hf() / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        out = fx.scratch / f"out-real-{key}"
        args = ("convert", folder, "--type", "Q8_0", "-o", out)
        r = judge(f"config {key} {cfg.get(key)} disagrees with the weights", args, edgekit(*args),
                  extra={"no output": not out.exists()})
        res.append(r)
    return res


def onnx_cases(fx: Fixtures) -> list[Outcome]:
    res = []
    art = fx.scratch / "onnx-corrupt"
    shutil.copytree(fx.onnx_artifact(), art)
    graph = art / "model.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 3] + b"\x00\xff" * 64)
    args = ("inspect", art)
    res.append(judge("ONNX inspect on a corrupt graph", args, edgekit(*args)))
    art2 = fx.scratch / "onnx-nodata"
    shutil.copytree(fx.onnx_artifact(), art2)
    removed = [p for p in art2.glob("*.data")]
    for p in removed:
        p.unlink()
    args = ("inspect", art2)
    note = "" if removed else "this artifact keeps its weights inside model.onnx (no .data file to remove)"
    res.append(judge("ONNX inspect with model.onnx.data missing", args, edgekit(*args), note=note))
    return res


def invalid_utf8(fx: Fixtures) -> list[Outcome]:
    res = []
    for label, art in [("GGUF", fx.tiny_gguf()), ("ONNX", fx.onnx_artifact())]:
        args = ("run", art, "-p", b"caf\xe9 \xff", "-n", "2")
        res.append(judge(f"invalid UTF-8 in a prompt ({label})", args, edgekit(*args), expect=("utf-8",)))
    return res


def full_disk(fx: Fixtures) -> list[Outcome]:
    """A disk with room at the start that another program fills while the GGUF is written (the free-space
    check passes; the write itself runs out), and a read-only output folder."""
    res = []
    target = fx.scratch / "small-disk"
    if not mount(target, "size=300m"):
        return [Outcome("a disk that fills during the write", "", None, 0, 0, "", True, {}, "skipped: cannot mount")]
    try:
        out = target / "out"
        cmd = [*EDGEKIT, "convert", str(fx.real_hf()), "--type", "Q8_0", "-o", str(out)]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})
        deadline = time.time() + 120
        while time.time() < deadline and not any(f.is_file() for f in target.rglob("*.gguf*")) \
                and p.poll() is None:
            time.sleep(0.05)
        free = shutil.disk_usage(target).free
        with open(target / "someone-elses-file", "wb") as f:  # fill all but 1 MB
            with contextlib.suppress(OSError):
                f.write(b"\0" * max(0, free - (1 << 20)))
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        res.append(judge("a disk that fills during the write", ("convert", "<real model>", "--type", "Q8_0", "-o", out),
                         (p.returncode, stdout.decode(), stderr.decode(), time.perf_counter() - t0),
                         expect=("disk",), extra={"nothing left on the disk": [f.name for f in target.iterdir()]
                                                  == ["someone-elses-file"]}))
    finally:
        umount(target)
    ro = fx.scratch / "ro-disk"
    if mount(ro, "size=2m", "ro"):
        try:
            args = ("convert", fx.tiny(), "--type", "Q8_0", "-o", ro / "out")
            res.append(judge("a read-only output folder", args, edgekit(*args), expect=("read-only", " -o")))
        finally:
            umount(ro)
    return res


def push_refused_leaves_nothing(fx: Fixtures) -> Outcome:
    dest = fx.scratch / "push-dest-2"
    args = ("push", fx.tiny_gguf(), "host", "--dest", dest, "--ctx", "100000000")
    out = judge("push refused for RAM", args, edgekit(*args))
    out.checks["no empty destination left"] = not dest.exists() or not any(dest.iterdir())
    out.passed = all(out.checks.values())
    return out


def killed_convert(fx: Fixtures) -> Outcome:
    parent = fx.scratch / "killed"
    parent.mkdir()
    cmd = [*EDGEKIT, "convert", str(fx.real_hf()), "--type", "Q8_0", "-o", str(parent / "a")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not leftovers(parent):
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = leftovers(parent)
    args = ("convert", fx.tiny(), "--type", "Q8_0", "-o", parent / "b")
    out = judge("SIGKILL during convert, then another convert beside it", args, edgekit(*args), refuse=False,
                expect=("left by an edgekit that was killed",))
    out.checks["a .partial was left by the kill"] = bool(before)
    out.checks["it is gone after the next convert"] = not leftovers(parent)
    out.passed = all(out.checks.values())
    return out


CASES: dict[str, Callable[[Fixtures], Outcome | list[Outcome]]] = {
    "manifest_escape": manifest_escape, "manifest_shapes": manifest_shapes, "push_symlink": push_symlink,
    "force_non_artifact": force_non_artifact, "force_artifact_says": force_artifact_says,
    "concurrent_converts": concurrent_converts, "corrupt_tensor_data": corrupt_tensor_data,
    "markup_in_path": markup_in_path, "gguf_block_count": gguf_block_count, "bad_configs": bad_configs,
    "config_disagrees": config_disagrees, "onnx_cases": onnx_cases, "invalid_utf8": invalid_utf8,
    "full_disk": full_disk, "push_refused_leaves_nothing": push_refused_leaves_nothing,
    "killed_convert": killed_convert,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated case names: " + ", ".join(CASES))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--out", type=Path, default=None,
                    help="writes OUT.json and OUT.txt (default: bench/results/bad_input_catalogue, and only for "
                         "a full run; with --out, also for --only)")
    opts = ap.parse_args()
    names = [n for n in opts.only.split(",") if n] or list(CASES)
    scratch = Path(tempfile.mkdtemp(prefix="edgekit-catalogue-"))
    fx = Fixtures(scratch)
    outcomes: list[Outcome] = []
    try:
        for name in names:
            got = CASES[name](fx)
            for o in got if isinstance(got, list) else [got]:
                outcomes.append(o)
                print(f"{'ok  ' if o.passed else 'FAIL'} {o.case}: exit {o.code}, {o.message}", flush=True)
    finally:
        if not opts.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    table = Table(title="bad-input catalogue, re-run through the CLI")
    for col in ("case", "exit", "s", "result", "message"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        failed = [k for k, v in o.checks.items() if not v]
        cells = (o.case, str(o.code), f"{o.seconds:.1f}", "ok" if o.passed else "FAILED: " + ", ".join(failed),
                 (o.note + " " if o.note else "") + o.message)
        table.add_row(*(Text(c) for c in cells))  # messages hold paths with brackets: never markup
    console = Console(record=True, width=200, markup=False)
    console.print(table)
    n_ok = sum(o.passed for o in outcomes)
    console.print(f"{n_ok}/{len(outcomes)} cases pass")
    if opts.out is not None or not opts.only:
        out = opts.out if opts.out is not None else RESULTS / "bad_input_catalogue"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({
            "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "passed": n_ok, "cases": len(outcomes), "outcomes": [asdict(o) for o in outcomes]}, indent=2) + "\n")
        out.with_suffix(".txt").write_text(console.export_text())
        print(f"wrote {out.with_suffix('.json')}, .txt")
    return 0 if n_ok == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
