"""What a failed llama.cpp load or a crashed worker means, said in one line the user can act on (from the
worker's error or exit signal and the tail of llama.cpp's log)."""

from __future__ import annotations

import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgekit.errors import BackendError, CorruptFileError, InputError, UnsupportedError
from edgekit.runtime import llamacpp_build


def log_hint(tail: Iterable[str], *needles: str) -> str:
    """The most telling recent llama.cpp log line (one line, trimmed), or ''."""
    lines = list(tail)
    for needle in needles:
        for line in reversed(lines):
            if needle.lower() in line.lower():
                return line.strip()[:240]
    return ""


def shown_name(model_path: Path) -> str:
    """The model as an error names it: an artifact's ``model.gguf`` with its folder (every artifact's file has
    that name, the folder says which), any other file by its name."""
    return f"{model_path.parent.name}/{model_path.name}" if model_path.name == "model.gguf" else model_path.name


def load_error(msg: dict[str, Any], model_path: Path, tail: Iterable[str], n_ctx: int | None = None) -> Exception:
    """The error a failed load means for the user: a bad option, a broken install, a file that is not GGUF,
    an unknown architecture, a context too large to allocate or a damaged file, from the worker's message
    and llama.cpp's log tail. ``n_ctx``: the context the load asked for."""
    tail = list(tail)
    name = shown_name(model_path)
    # llama-cpp-python's "Failed to create llama_context": the model itself loaded, the context did not
    if "llama_context" in str(msg.get("message", "")) or log_hint(tail, "failed to create llama_context"):
        return context_error(name, tail, n_ctx)
    if msg.get("type") == "DecodingOptionError" or str(msg.get("message", "")).startswith(
            ("unknown buffer type", "unknown llama.cpp option")):
        return InputError(str(msg["message"]))
    try:
        with open(model_path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        magic = b""
    if msg.get("type") in (
        "ImportError",
        "ModuleNotFoundError",
        "OSError",
        "RuntimeError",
    ) and not log_hint(tail, "llama_model_load"):
        return BackendError(
            f"llama-cpp-python could not start: {msg.get('message')}; reinstall it with "
            f"`{llamacpp_build.rebuild_command()}`"
        )
    if magic != b"GGUF":
        return CorruptFileError(f"{name} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    reason = log_hint(tail, "error loading model:")
    if "error loading model:" in reason:
        reason = reason.split("error loading model:", 1)[1].strip()
    if not reason or "failed to load model from" in reason:
        gguf = log_hint(tail, "gguf_init_from", "invalid", "failed to read")
        reason = gguf.split(": ", 1)[-1] if gguf else reason
    if "unknown model architecture" in reason:
        imatrix = _imatrix_error(model_path)
        if imatrix is not None:
            return imatrix
        return UnsupportedError(
            f"llama.cpp cannot run {name}: {reason}; update llama-cpp-python or use another runtime"
        )
    detail = reason or str(msg.get("message") or "llama.cpp could not load it")
    return CorruptFileError(
        f"llama.cpp could not load {name} ({detail}); the file may be truncated or corrupt: "
        "convert or download it again"
    )


def _imatrix_error(model_path: Path) -> Exception | None:
    """An importance matrix (llama-imatrix's GGUF, which llama.cpp reads as a model of no architecture)
    given where a model goes: the one-line error that says what it is and where it goes (as Unsupported, which
    a profile reports once rather than per test), else None."""
    from edgekit.converters.formats.gguf.header import GGUFHeader
    from edgekit.converters.formats.gguf.read import imatrix_given, is_imatrix

    try:
        found = is_imatrix(GGUFHeader(Path(model_path)))
    except Exception:  # noqa: BLE001 - a header the fast reader does not cover: the generic message stands
        return None
    return UnsupportedError(imatrix_given(Path(model_path))) if found else None


def context_error(name: str, tail: list[str], n_ctx: int | None) -> InputError:
    """The model loaded (so the file is sound) but its context could not be made: almost always a context
    whose KV cache and buffers do not fit in memory."""
    import re

    trained = next((m[1] for line in reversed(tail) if (m := re.search(r"n_ctx_train\s*=\s*(\d+)", line))), None)
    asked = f"a context of {n_ctx} tokens" if n_ctx else "the context"
    of = f" ({name} was trained for {trained})" if trained else ""
    return InputError(f"llama.cpp loaded {name} but could not allocate {asked}{of}: the context is too large "
                      "for this machine's memory; lower --ctx (profile: --ctx and the sizes in --tests; "
                      "`edgekit plan` says what fits)")


# -- crash messages (the worker died) -------------------------------------------------------------------------------

# Protection faults: what a CPU feature the OS does not enable (AMX on some VMs) raises; safe CPU mode
# (no repacked weight buffers) avoids those code paths. SIGILL (an instruction the CPU lacks) it cannot.
PROTECTION_FAULTS = {"SIGSEGV", "SIGBUS"}
LOG_ENV = "EDGEKIT_LLAMACPP_LOG"
LOG_HINT = f"rerun with {LOG_ENV}=1 to see llama.cpp's log"


def signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def crash_message(rc: int | None, doing: str, name: str, safe_cpu: bool = False, hint: str = "") -> str:
    """One line that says how llama.cpp died while ``doing`` (on model ``name``) and the fix.

    SIGILL: the build uses instructions this CPU lacks - which ones, and the rebuild command. A
    protection fault on a CPU that reports AMX: the native-flags/AMX fault safe CPU mode was made for.
    SIGKILL: the kernel's OOM killer. Anything else: the signal, llama.cpp's last telling log line."""
    sig = signal_name(rc)
    where = f"while {doing}" + (f" ({name})" if name else "")
    if sig == "SIGILL":
        return f"llama.cpp crashed (SIGILL) {where}: {llamacpp_build.explain_sigill()}"
    if sig in PROTECTION_FAULTS:
        record = llamacpp_build.installed_record()
        amx_host = "amx_tile" in llamacpp_build.cpu_flags()
        if amx_host and (record is None or any(o.startswith("AMX") for o in record.get("options", []))):
            mode = " (already in safe CPU mode)" if safe_cpu else ""
            return (f"llama.cpp crashed ({sig}) {where}{mode}: this CPU reports AMX, which VMs often do not "
                    f"enable, and this llama-cpp-python build may use it; rebuild it without AMX with "
                    f"`{llamacpp_build.rebuild_command()}`")
        mode = " (also in safe CPU mode)" if safe_cpu else ""
        return (f"llama.cpp crashed ({sig}) {where}{mode}" + (f": {hint}" if hint else "")
                + f"; {LOG_HINT}, and if the model file is sound, rebuild llama-cpp-python with "
                  f"`{llamacpp_build.rebuild_command()}`")
    if sig == "SIGKILL":
        return (f"llama.cpp was killed (SIGKILL) {where}, most likely out of memory: use a smaller context "
                "(--ctx) or a smaller model")
    if sig is not None:
        return f"llama.cpp died ({sig}) {where}" + (f": {hint}" if hint else "") + f"; {LOG_HINT}"
    return (f"the llama.cpp worker exited unexpectedly (exit code {rc}) {where}" + (f": {hint}" if hint else "")
            + f"; {LOG_HINT}")
