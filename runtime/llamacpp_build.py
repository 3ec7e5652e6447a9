"""Which CPU instructions a llama.cpp build may use, and whether this CPU has them.

llama.cpp compiled for one x86-64 CPU dies with SIGILL on another that lacks an instruction it uses
(an AVX-512 build on an AVX2-only EPYC), and a natively built one faults on VMs whose CPU reports AMX
but does not enable it. So edgekit builds llama-cpp-python (and the static llama-bench runner) for the
CPU it finds at setup, from an explicit table of ggml's instruction-set options, never AMX, and keeps
what it built under a key that names those options: another machine never reuses a build it cannot
run. Each build has a record (``build.json``) of the options it used; when llama.cpp crashes with
SIGILL, :func:`explain_sigill` compares that record with ``/proc/cpuinfo`` and names the missing
instructions and the command that fixes it.

Standard library only: ``.ci/setup.sh`` runs this file before edgekit is installed::

    python runtime/llamacpp_build.py key [--cpu LEVEL]          # cache key of the build for this CPU
    python runtime/llamacpp_build.py cmake-args [--cpu LEVEL]   # CMAKE_ARGS for that build
    python runtime/llamacpp_build.py record OUT.json [--cpu LEVEL] [--version V]
    python runtime/llamacpp_build.py install-record WHEEL_DIR   # after install: record beside the venv
    python runtime/llamacpp_build.py installed --cpu LEVEL --version V  # exit 1 (and why) if not that build
    python runtime/llamacpp_build.py remembered                # the level setup chose for this venv
    python runtime/llamacpp_build.py remember LEVEL            # ... set it (auto forgets it)
    python runtime/llamacpp_build.py check                     # smoke decode in a child process

``LEVEL`` (or ``EDGEKIT_LLAMA_CPU``): ``auto`` (default: what this CPU reports), ``x86-64``,
``x86-64-v2``, ``x86-64-v3`` (alias ``haswell``: AVX2, FMA, F16C, BMI2), ``x86-64-v4`` (alias
``skylakex``: plus AVX-512), or a comma list of ggml option names (``AVX2,FMA,F16C``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# ggml's x86 instruction-set options (ggml/CMakeLists.txt), in dependency order, with the
# /proc/cpuinfo flags each needs. GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw, so it needs all five.
X86_OPTIONS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
}
# An option only counts when the ones it builds on are on too (ggml's code paths assume it).
_NEEDS = {"AVX": "SSE42", "F16C": "AVX", "FMA": "AVX", "AVX2": "AVX", "BMI2": "AVX2", "AVX_VNNI": "AVX2",
          "AVX512": "AVX2", "AVX512_VBMI": "AVX512", "AVX512_VNNI": "AVX512", "AVX512_BF16": "AVX512"}
# Never enabled: VMs report AMX in cpuinfo without enabling its register state, and AMX code faults
# there with a general protection fault (seen on this project's Xeon CI machines).
NEVER = ("AMX_TILE", "AMX_INT8", "AMX_BF16")

LEVELS: dict[str, tuple[str, ...]] = {
    "x86-64": (),
    "x86-64-v2": ("SSE42",),
    "x86-64-v3": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "x86-64-v4": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
}
LEVELS["haswell"] = LEVELS["x86-64-v3"]
LEVELS["skylakex"] = LEVELS["x86-64-v4"]
# The widest level qemu-user can emulate (`qemu-x86_64 -cpu Haswell`): the portability test runs there.
QEMU_CPU = {"x86-64-v3": "Haswell", "x86-64-v2": "Nehalem", "x86-64": "qemu64"}

RECORD_NAME = "build.json"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


CPUINFO_ENV = "EDGEKIT_CPUINFO"
WRAPPER_ENV = "EDGEKIT_LLAMACPP_WRAPPER"


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or the file ``EDGEKIT_CPUINFO`` names (to set up and explain as another CPU would)."""
    try:
        return Path(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo").read_text()
    except OSError:
        return ""


def wrapper_prefix() -> list[str]:
    """``EDGEKIT_LLAMACPP_WRAPPER``: a command that every llama.cpp child process runs under, e.g.
    ``qemu-x86_64 -cpu Haswell`` (as an AVX2-only CPU would), ``valgrind`` or ``gdb -batch -ex run --args``."""
    import shlex

    return shlex.split(os.environ.get(WRAPPER_ENV, ""))


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags as Linux reports them (the first ``flags`` line of /proc/cpuinfo)."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def supported(flags: set[str]) -> list[str]:
    """The ggml options a CPU with these flags can run, in table order (AMX never)."""
    on: list[str] = []
    for opt, needs in X86_OPTIONS.items():
        if all(f in flags for f in needs) and (opt not in _NEEDS or _NEEDS[opt] in on):
            on.append(opt)
    return on


def missing(options: list[str] | tuple[str, ...], flags: set[str]) -> list[str]:
    """The options of a build that a CPU with these flags lacks (AMX included, if a build had it)."""
    out = []
    for opt in options:
        needs = X86_OPTIONS.get(opt) or (("amx_tile",) if opt.startswith("AMX") else ())
        if any(f not in flags for f in needs):
            out.append(opt)
    return out


def resolve(level: str | None = None, flags: set[str] | None = None) -> list[str]:
    """The options to build with: ``level`` (or EDGEKIT_LLAMA_CPU), capped by what this CPU can run.

    ``auto`` takes everything this CPU reports. A named level or a list never adds what the CPU lacks,
    so the result always runs here (a build for another machine is set with a list and ``force``)."""
    level = (level or os.environ.get("EDGEKIT_LLAMA_CPU") or "auto").strip()
    flags = cpu_flags() if flags is None else flags
    have = supported(flags)
    if level == "auto":
        return have
    if level in LEVELS:
        wanted = LEVELS[level]
    else:
        wanted = tuple(o.strip().upper() for o in level.split(",") if o.strip())
        bad = [o for o in wanted if o not in X86_OPTIONS]
        if bad:
            raise SystemExit(f"unknown CPU option(s) {', '.join(bad)}: use a level ({', '.join(LEVELS)}), "
                             f"auto, or names from {', '.join(X86_OPTIONS)}")
    return [o for o in X86_OPTIONS if o in wanted and o in have]


def label(options: list[str] | tuple[str, ...]) -> str:
    """A readable name for a set of options: the widest level it contains, plus what it adds
    (``x86-64-v4+avxvnni+avx512vnni``)."""
    base = max((n for n in ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4") if set(LEVELS[n]) <= set(options)),
               key=lambda n: len(LEVELS[n]))
    extra = [o.lower().replace("_", "") for o in options if o not in LEVELS[base]]
    return "+".join([base, *extra])


def key(options: list[str] | tuple[str, ...]) -> str:
    """The cache key of a build: the machine and exactly the instruction sets it may use."""
    if not is_x86():
        return f"{platform.machine().lower()}-native"
    return label(options)


def cmake_args(options: list[str] | tuple[str, ...]) -> str:
    """CMAKE_ARGS that build ggml with exactly ``options`` (every other instruction set off)."""
    if not is_x86():
        return "-DGGML_NATIVE=ON"
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-DGGML_{opt}={'ON' if opt in options else 'OFF'}" for opt in X86_OPTIONS]
    args += [f"-DGGML_{opt}=OFF" for opt in NEVER]
    return " ".join(args)


def make_record(options: list[str], version: str = "") -> dict:
    return {"schema": "edgekit.llama-build/1", "llama_cpp_python": version, "machine": platform.machine(),
            "options": list(options), "key": key(options), "cmake_args": cmake_args(options),
            "built_on": cpu_name()}


# -- the record of what is installed -------------------------------------------------------------

def installed_lib_dir() -> Path | None:
    """llama-cpp-python's library folder, found without importing it (importing loads the library)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cpu_library(lib_dir: Path | None = None) -> Path | None:
    """ggml's CPU backend library (where the instruction-set specific code lives)."""
    lib_dir = lib_dir or installed_lib_dir()
    if lib_dir is None:
        return None
    for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"):
        if (lib_dir / name).is_file():
            return lib_dir / name
    return None


def installed_record_path() -> Path:
    return Path(sys.prefix) / "share" / "edgekit" / "llama-build.json"


def install_record(wheel_dir: Path) -> Path:
    """Copy the wheel's build record beside this environment, pinned to the installed library's hash."""
    record = json.loads((wheel_dir / RECORD_NAME).read_text())
    lib = cpu_library()
    if lib is not None:
        record["cpu_library"] = str(lib)
        record["cpu_library_sha256"] = _sha256(lib)
    dest = installed_record_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, dest)
    return dest


def installed_record() -> dict | None:
    """The record of the installed build, or None when there is none or the library has changed since."""
    try:
        record = json.loads(installed_record_path().read_text())
    except (OSError, ValueError):
        return None
    lib = Path(record.get("cpu_library", ""))
    try:
        if not lib.is_file() or _sha256(lib) != record.get("cpu_library_sha256"):
            return None
    except OSError:
        return None
    return record


def installed_mismatch(options: list[str] | tuple[str, ...], version: str) -> str | None:
    """Why the installed llama-cpp-python is not the build for ``options`` at ``version`` (None: it is):
    setup reinstalls when the key, the pinned version or the library differs from its record."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    if installed_lib_dir() is None:
        return "llama-cpp-python is not installed"
    try:
        record = json.loads(installed_record_path().read_text())
    except (OSError, ValueError):
        return "it has no edgekit build record"
    try:
        have = pkg_version("llama-cpp-python")
    except PackageNotFoundError:
        have = "?"
    if have != version or record.get("llama_cpp_python") != version:
        return f"{have} is installed, {version} is pinned"
    if record.get("key") != key(options):
        return f"the installed build is for {record.get('key', '?')}"
    if record.get("cpu_library_sha256") and installed_record() is None:
        return "its library changed since setup installed it"
    return None


# The CPU level setup chose for an environment (``--cpu LEVEL``, or the safer level it fell back to when
# the smoke decode crashed), so that a later plain ``setup.sh`` keeps it; ``--cpu auto`` forgets it.
LEVEL_NAME = "llama-cpu"


def remembered_level_path() -> Path:
    return Path(sys.prefix) / "share" / "edgekit" / LEVEL_NAME


def remembered_level() -> str | None:
    """The level setup last chose for this environment, or None (auto)."""
    try:
        level = remembered_level_path().read_text().strip()
    except OSError:
        return None
    return None if level in ("", "auto") else level


def remember_level(level: str) -> None:
    """Keep ``level`` for this environment's later setup runs; ``auto`` forgets any."""
    path = remembered_level_path()
    if level.strip() in ("", "auto"):
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(level.strip() + "\n")
    os.replace(tmp, path)


def cache_dir() -> Path:
    """Where setup keeps builds: ``EDGEKIT_CACHE`` or ``~/.cache/edgekit`` (wheels/, bin/, src/)."""
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")


def runner_path(version: str | None = None) -> Path:
    """The static llama-bench that ``setup.sh --tests`` builds for x86-64-v3 (capped by this CPU)."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as pkg_version

        try:
            version = pkg_version("llama-cpp-python")
        except PackageNotFoundError:
            version = "none"
    options = resolve("x86-64-v3") if is_x86() else []
    return cache_dir() / "bin" / f"llama-bench-{version}-{key(options)}"


def in_checkout_venv(root: Path | None = None) -> bool:
    """Whether this interpreter runs from the checkout's own ``.venv`` (the one its setup script builds)."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        return Path(sys.prefix).resolve() == (root / ".venv").resolve()
    except OSError:
        return False


def rebuild_command(level: str = "auto") -> str:
    """The command that rebuilds llama-cpp-python for this CPU (or ``level``): edgekit's setup script when
    this interpreter is the checkout's ``.venv``, else pip of this interpreter with the matching CMAKE_ARGS
    (the setup script would install into that ``.venv``, not into the environment that runs)."""
    import shlex

    root = Path(__file__).resolve().parents[1]
    setup = root / ".ci" / "setup.sh"
    cpu = "" if level == "auto" else f" --cpu {level}"
    if setup.is_file() and in_checkout_venv(root):
        try:
            where = setup.relative_to(Path.cwd())
        except ValueError:
            where = setup
        return f"bash {where} --rebuild-llama{cpu}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = f"=={version('llama-cpp-python')}"
    except PackageNotFoundError:
        ver = ""
    return (f'CMAKE_ARGS="{cmake_args(resolve(level))}" {shlex.quote(sys.executable)} -m pip install '
            f'--force-reinstall --no-cache-dir --no-deps "llama-cpp-python{ver}"')


def explain_sigill(record: dict | None = None, cpuinfo: str | None = None) -> str:
    """Why a llama.cpp build raised SIGILL here, and the one command that fixes it (one sentence)."""
    flags = cpu_flags(cpuinfo)
    name = cpu_name(cpuinfo)
    if record is None:
        record = installed_record()
    if record is None:
        return (f"this llama-cpp-python build uses CPU instructions that this CPU ({name}) lacks, and it has no "
                f"edgekit build record (it was built elsewhere or by hand); rebuild it for this CPU with "
                f"`{rebuild_command()}`")
    lacking = missing(record.get("options", []), flags)
    built = record.get("key", "?")
    if lacking:
        return (f"this llama-cpp-python build ({built}, built on {record.get('built_on', '?')}) uses "
                f"{', '.join(lacking)}, which this CPU ({name}) lacks; rebuild it for this CPU with "
                f"`{rebuild_command()}`")
    safer = "x86-64-v3" if "AVX2" in supported(flags) else "x86-64-v2"
    return (f"this llama-cpp-python build ({built}) only uses instructions this CPU ({name}) reports, so the "
            f"CPU or its VM does not enable one of them; rebuild it with fewer with `{rebuild_command(safer)}`")


# -- the smoke check ------------------------------------------------------------------------------

_SMOKE = r"""
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=16, n_threads=1, verbose=False)
llm.eval([1, 5, 9, 200, 7])
tok = int(llm.sample(temp=0.0))
assert 0 <= tok < llm.n_vocab(), tok
print("decoded", tok)
"""


def write_smoke_gguf(path: Path) -> Path:
    """A tiny random Llama GGUF (2 layers, width 256, byte-level vocab) whose weights exercise ggml's
    F32, F16, Q8_0 and Q4_0 kernels (Q4_0 is also repacked for AVX2/AVX-512 at load)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    n_vocab, d, ff, heads, kv, layers = 262, 256, 512, 4, 2, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)] + [b"a", b"b", b"c"]
    ttypes = [2, 3, 3] + [6] * 256 + [1, 1, 1]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    Q = gguf.GGMLQuantizationType

    def add(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    add("token_embd.weight", (n_vocab, d), Q.Q8_0)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        add(f"blk.{i}.attn_q.weight", (d, d), Q.Q4_0)
        add(f"blk.{i}.attn_k.weight", (d * kv // heads, d), Q.Q8_0)
        add(f"blk.{i}.attn_v.weight", (d * kv // heads, d), Q.F16)
        add(f"blk.{i}.attn_output.weight", (d, d), Q.Q4_0)
        add(f"blk.{i}.ffn_gate.weight", (ff, d), Q.Q4_0)
        add(f"blk.{i}.ffn_up.weight", (ff, d), Q.Q8_0)
        add(f"blk.{i}.ffn_down.weight", (d, ff), Q.Q4_0)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    add("output.weight", (n_vocab, d), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smoke_command(model: Path, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-c", _SMOKE, str(model)]


def smoke_check(python: str | None = None, prefix: list[str] | None = None, timeout: float = 600) -> tuple[bool, str]:
    """Load a tiny GGUF and decode a token in a child process; ``(ok, what happened)``.

    ``prefix`` runs the child under another program (default: :func:`wrapper_prefix`)."""

    prefix = wrapper_prefix() if prefix is None else prefix

    with tempfile.TemporaryDirectory(prefix="edgekit-smoke-") as tmp:
        model = write_smoke_gguf(Path(tmp) / "smoke.gguf")
        try:
            res = subprocess.run([*prefix, *smoke_command(model, python)], capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"the smoke decode did not finish in {timeout:.0f} s"
    if res.returncode == 0:
        return True, res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "ok"
    if res.returncode < 0:
        sig = signal.Signals(-res.returncode).name
        if sig == "SIGILL":
            return False, f"llama.cpp crashed (SIGILL): {explain_sigill()}"
        return False, f"llama.cpp crashed ({sig}) in the smoke decode"
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
    if "Illegal instruction" in res.stderr or res.returncode == 132:  # a shell or qemu reporting SIGILL
        return False, f"llama.cpp crashed (SIGILL): {explain_sigill()}"
    return False, f"the smoke decode failed (exit {res.returncode}): {tail[:300]}"


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="llamacpp_build.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["key", "cmake-args", "options", "record", "install-record", "installed",
                                     "remembered", "remember", "check", "explain"])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--cpu", default=None, help="auto, a level name, or a comma list of ggml options")
    ap.add_argument("--version", default="")
    a = ap.parse_args(argv)
    if a.what == "remembered":
        print(remembered_level() or "auto")
        return 0
    if a.what == "remember":
        remember_level(a.path or "auto")
        return 0
    options = resolve(a.cpu) if is_x86() else []
    if a.what == "installed":
        why = installed_mismatch(options, a.version)
        print(why or "ok")
        return 1 if why else 0
    if a.what == "key":
        print(key(options))
    elif a.what == "options":
        print(",".join(options))
    elif a.what == "cmake-args":
        print(cmake_args(options))
    elif a.what == "record":
        Path(a.path).write_text(json.dumps(make_record(options, a.version), indent=1))
    elif a.what == "install-record":
        print(install_record(Path(a.path)))
    elif a.what == "explain":
        print(explain_sigill())
    else:
        ok, what = smoke_check()
        print(what, file=sys.stdout if ok else sys.stderr)
        # 3: llama.cpp crashed (a rebuild for fewer instruction sets may help); 1: anything else.
        return 0 if ok else 3 if what.startswith("llama.cpp crashed") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
