"""The command line's conventions: llama.cpp's short flags, -h/--version everywhere, help without bogus
placeholders, run's chat / stdin / --json, and the thread default on a busy machine."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.errors import BackendCrashed, InputError
from edgekit.runtime import hostinfo
from edgekit.runtime.base import SamplingConfig

runner = CliRunner()
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
ROOT = Path(__file__).resolve().parents[2]


def _commands(cmd=None, path=()):
    """(path, click command) of every leaf command and group, the app included."""
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands()]


def _options(path):
    cmd = dict(_commands())[path]
    return {o: p for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}


def _help(*args):
    res = runner.invoke(app, [*args], env={"COLUMNS": "200"}, terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "edgekit")
def test_help_shows_no_placeholder_for_a_flag_and_h_is_help(path):
    out = _help(*path, "-h")
    assert out == _help(*path, "--help")
    assert "<bool>" not in out
    for opt, param in _options(path).items():
        if opt.startswith("--") and not param.is_flag and not param.hidden:
            line = next(line for line in out.splitlines()  # its row in the options panel
                        if line.startswith("│") and re.search(rf"{re.escape(opt)}(?![-\w])", line))
            assert "<" in line, f"{opt} takes a value and its help should say of what kind: {line}"


@pytest.mark.parametrize("path", [(), ("run",), ("convert",), ("devices", "add")], ids=" ".join)
def test_version_on_the_app_and_after_a_command(path):
    res = runner.invoke(app, [*path, "--version"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"edgekit {version('edgekit')}"


# llama.cpp's meaning of each short flag; any command that has the flag must mean this by it.
LLAMA_CPP = {"-t": "threads", "-c": "ctx", "-n": "max_tokens", "-b": "batch", "-s": "seed"}
EXPECTED = {("run",): "-t -c -n -s", ("eval",): "-t -c", ("chat",): "-t -c", ("tui",): "-t -c",
            ("profile",): "-t -c -b", ("plan",): "-c -b", ("convert",): "-t -c", ("quickstart",): "-t",
            ("inspect",): "-c", ("push",): "-c"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "edgekit")
def test_short_flags_mean_what_they_mean_in_llama_cpp(path):
    opts = _options(path)
    for flag, name in LLAMA_CPP.items():
        if flag in opts:
            assert opts[flag].name == name, f"{' '.join(path)} {flag} is --{opts[flag].name}, not llama.cpp's {name}"
    for flag in EXPECTED.get(path, "").split():
        assert flag in opts, f"{' '.join(path)} should take {flag} ({LLAMA_CPP[flag]})"


@pytest.mark.parametrize("args, hint", [
    (["convert", "x", "-b", "4"], "-b was short for --bits"),
    (["convert", "x", "-t", "Q4_0"], "-t was short for --type; it is --threads now"),
    (["quickstart", "-b", "4"], "-b was short for --bits"),
    (["profile", "x", "-t", "pp512"], "-t is --threads now, as in llama.cpp: give tests as --tests"),
    (["run", "x", "-s", "You are a pirate"], "-s was short for --system; it is --seed now"),
])
def test_a_retired_short_flag_gets_a_hint_naming_the_long_option(args, hint):
    res = runner.invoke(app, args, terminal_width=400)
    assert res.exit_code == 2
    assert hint in " ".join(res.output.replace("│", " ").split())  # the error box may wrap it


def test_the_long_options_still_work():
    convert = _options(("convert",))
    assert convert["--bits"].name == "bits" and convert["--type"].name == "type_"
    assert _options(("profile",))["--tests"].name == "tests"
    assert _options(("quickstart",))["--bits"].name == "bits"
    assert _options(("run",))["--system"].name == "system"


# -- threads -----------------------------------------------------------------------------------------


@pytest.fixture
def host(monkeypatch):
    """A 4-core host (8 logical CPUs) whose busy CPUs the test sets; nothing remembered between tests."""
    state = {"busy": 0.0, "measured": 0}

    def busy(interval=0.1):
        state["measured"] += 1
        return state["busy"]

    monkeypatch.setattr(hostinfo, "usable_cpus", lambda: 4)
    monkeypatch.setattr(hostinfo, "physical_cores", lambda: 4)
    monkeypatch.setattr(hostinfo, "busy_cpus", busy)
    monkeypatch.setattr(hostinfo, "_busy_cache", None)
    monkeypatch.setattr(hostinfo, "_said", set())
    return state


@pytest.mark.parametrize("physical, logical, affinity, expected", [
    (4, 8, 8, 4),      # SMT: one thread per core
    (4, 4, 4, 4),
    (4, 8, 2, 1),      # a cpuset of 2 logical CPUs on an SMT host: one core's worth
    (None, 6, 6, 6),   # psutil cannot tell: the logical CPUs
    (8, 8, 3, 3),      # taskset to 3 CPUs
])
def test_physical_cores(monkeypatch, physical, logical, affinity, expected):
    import psutil

    n_logical = logical
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: n_logical if logical else physical)
    monkeypatch.setattr(os, "cpu_count", lambda: n_logical)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    assert hostinfo.physical_cores() == expected


def test_busy_cpus_counts_only_the_cpus_this_process_may_use(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [100.0, 0.0, 50.0, 100.0])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert hostinfo.busy_cpus() == pytest.approx(1.5)


@pytest.mark.parametrize("requested, busy, threads, adapted, says", [
    (None, 0.0, 4, False, None),               # idle: the physical cores
    (None, 0.4, 4, False, None),               # background noise costs no thread
    (None, 1.0, 3, True, "using 3 threads instead of 4 (-t 4"),
    (None, 3.9, 1, True, "using 1 thread instead of 4"),
    (None, 8.0, 1, True, "using 1 thread"),    # more busy than there are CPUs: still one
    (2, 3.0, 2, False, "2 threads will wait on each other"),
    (3, 1.0, 3, False, None),
])
def test_pick_threads(host, requested, busy, threads, adapted, says):
    choice = hostinfo.pick_threads(requested, busy=busy)
    assert (choice.threads, choice.adapted) == (threads, adapted)
    assert (choice.note is None) == (says is None)
    if says:
        assert says in choice.note and f"{busy:.1f} of 4 CPUs are busy" in choice.note
    if requested and choice.note:
        assert f"use -t {max(1, int(4 - busy + 0.5))}" in choice.note


def test_one_thread_needs_no_measurement(host):
    assert hostinfo.thread_count(1) == 1 and host["measured"] == 0


def test_thread_count_warns_once_and_measures_once_for_a_sweep(host):
    host["busy"] = 3.0
    notes = []
    assert [hostinfo.thread_count(None, notes.append) for _ in range(3)] == [1, 1, 1]
    assert hostinfo.thread_count(4, notes.append, adapt=False) == 4
    assert host["measured"] == 1
    assert len(notes) == 2 and "using 1 thread instead of 4" in notes[0] and "use -t 1" in notes[1]


def test_busy_default_reaches_onnxruntime_and_the_warning_is_one_line(host, tiny_llama, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgekit.cli.main import app as cli_app

    art = tmp_path / "tiny-onnx"
    assert runner.invoke(cli_app, ["convert", str(tiny_llama), "--to", "onnx", "--bits", "32", "-o", str(art)]).exit_code == 0
    host["busy"] = 3.2
    res = runner.invoke(cli_app, ["run", str(art), "-p", "hi", "--raw", "-n", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert "warning: 3.2 of 4 CPUs are busy with other programs: using 1 thread instead of 4 (-t 4" in res.stderr
    from edgekit.runtime.onnx import OnnxBackend

    with OnnxBackend(art / "model.onnx") as backend:
        assert backend.n_threads == 1
    host["busy"] = 0.0
    hostinfo._busy_cache = None
    with OnnxBackend(art / "model.onnx") as backend:
        assert backend.n_threads == 4


def test_convert_threads_size_torchs_pool(host):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert hostinfo.use_torch_threads(3) == 3 and torch.get_num_threads() == 3
        host["busy"], hostinfo._busy_cache = 3.0, None  # a new measurement (they are reused for 10 s)
        with pytest.warns(RuntimeWarning, match="3.0 of 4 CPUs are busy with other programs: PyTorch work"):
            assert hostinfo.use_torch_threads() == 4 and torch.get_num_threads() == 4  # said, not lowered
    finally:
        torch.set_num_threads(before)


# -- run: stdin, --json, the chat -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_q4(tiny_llama, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("flags") / "tiny-gguf-q4"
    res = runner.invoke(app, ["convert", str(tiny_llama), "--bits", "4", "-o", str(out_dir)])
    assert res.exit_code == 0, res.output
    return out_dir


GREEDY = ["--raw", "--temp", "0", "-n", "8", "-c", "64", "-t", "1"]


@needs_llama
def test_prompt_from_stdin_json_and_the_same_text(tiny_q4):
    plain = runner.invoke(app, ["run", str(tiny_q4), "-p", "The river", *GREEDY])
    assert plain.exit_code == 0, plain.output
    for args, given in ((["-p", "-"], "The river"), ([], "The river")):  # -p -, and no -p with stdin piped
        res = runner.invoke(app, ["run", str(tiny_q4), *args, *GREEDY], input=given)
        assert res.exit_code == 0, res.output
        assert res.stdout == plain.stdout
    res = runner.invoke(app, ["run", str(tiny_q4), "-p", "-", "--json", *GREEDY], input="The river")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # stdout is the one object, nothing streamed before it
    assert data["text"] + "\n" == plain.stdout
    assert data["generated_tokens"] == 8 and data["stop_reason"] == "length" and data["prompt_tokens"] > 0
    assert data["total_s"] >= data["time_to_first_token_s"] > 0 and data["tokens_per_second"] > 0
    assert data["context_full"] is False and data["artifact"] == str(tiny_q4)
    assert "prompt tokens" not in res.stderr  # --json carries the figures itself


def test_empty_stdin_is_a_one_line_error(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path), "-p", "-"], input="  \n")
    assert res.exit_code == 2 and "stdin is empty" in res.output


class FakeBackend:
    """Replies "ok N" to the Nth call and records what each call was sent."""

    def __init__(self, fail_on: str | None = None, crash_on: str | None = None):
        self.sent: list = []
        self.closed = False
        self.fail_on, self.crash_on = fail_on, crash_on

    def generate(self, prompt, sampling, stats):
        self.sent.append(json.loads(json.dumps(prompt)))
        last = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if last == self.fail_on:
            raise InputError("the prompt is 99 tokens but the context holds 64")
        if last == self.crash_on:
            raise BackendCrashed("llama.cpp died (SIGSEGV)")
        stats.prompt_tokens, stats.generated_tokens, stats.stop_reason = 10, 2, "eos"
        yield from ("ok ", str(len(self.sent)))

    def close(self):
        self.closed = True


def _chat(lines, **kwargs):
    import io

    from edgekit.cli.repl import chat_repl

    backends: list[FakeBackend] = []
    fail_on, crash_on = kwargs.pop("fail_on", None), kwargs.pop("crash_on", None)

    def open_backend():
        backends.append(FakeBackend(fail_on, crash_on))
        return backends[-1]

    feed = iter(lines)

    def read(prompt):
        line = next(feed, None)
        if line is None:
            raise EOFError
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    out = io.StringIO()
    messages = chat_repl(open_backend, SamplingConfig(), read=read, out=out, **kwargs)
    return messages, backends, out.getvalue()


def test_the_chat_keeps_the_conversation_and_clear_forgets_it():
    messages, (backend,), out = _chat(["first", "", "second", "/clear", "third", "/exit", "never sent"],
                                      system="Be brief.")
    assert [m["content"] for m in backend.sent[1]] == ["Be brief.", "first", "ok 1", "second"]
    assert [m["content"] for m in backend.sent[2]] == ["Be brief.", "third"]  # the system prompt survives /clear
    assert messages[-1] == {"role": "assistant", "content": "ok 3"} and len(backend.sent) == 3
    assert out == "ok 1\nok 2\nok 3\n" and backend.closed


def test_the_chat_survives_ctrl_c_at_the_prompt_a_failed_turn_and_a_crash():
    messages, backends, _ = _chat(["a", KeyboardInterrupt, "too long", "b", "boom", "c"],
                                  fail_on="too long", crash_on="boom")
    assert len(backends) == 2 and backends[0].closed  # the crashed backend was replaced
    assert [m["content"] for m in messages] == ["a", "ok 1", "b", "ok 3", "c", "ok 1"]


def test_raw_chat_completes_each_line_on_its_own():
    _, (backend,), _ = _chat(["Once upon", "The river"], raw=True)
    assert backend.sent == ["Once upon", "The river"]


def _pty_run(args, steps, timeout=90):
    """Run edgekit in a pseudo-terminal: ``steps`` are (text to wait for, bytes to type) pairs."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(ROOT)
        # a terminal starts its programs with SIGINT at its default; CPython keeps it ignored if it inherits
        # SIG_IGN (something in the whole suite leaves the test process so), and Ctrl-C would never arrive
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.execv(sys.executable, [sys.executable, "-m", "edgekit.cli.main", *args])
    buf, seen, last = b"", 0, b""
    try:
        for wait_for, typed in steps:
            end = time.time() + timeout
            resend = time.time() + 3
            while (i := buf.find(wait_for, seen)) < 0:
                assert time.time() < end, f"no {wait_for!r} in {buf.decode(errors='replace')}"
                if last == b"\x03" and time.time() > resend:
                    # still unseen: the terminal's Ctrl-C did not reach edgekit (seen only inside the whole
                    # suite under pytest's capture); deliver the SIGINT it stands for to the process itself
                    os.kill(pid, signal.SIGINT)
                    resend = time.time() + 3
                if select.select([fd], [], [], 0.5)[0]:
                    try:
                        buf += os.read(fd, 4096)
                    except OSError:
                        break
            seen = i + len(wait_for)
            if typed == b"\x03":
                # A person is never this fast: a SIGINT that lands between readline drawing the prompt and
                # waiting for a key is only noticed at the next key (CPython checks signals when select
                # is interrupted), so the test waits until the prompt is surely waiting.
                time.sleep(0.5)
            os.write(fd, typed)
            last = typed
        end = time.time() + timeout
        while time.time() < end:  # the rest of the output, until the child closes the terminal
            done, status = os.waitpid(pid, os.WNOHANG)
            try:
                buf += os.read(fd, 4096) if select.select([fd], [], [], 0.5)[0] else b""
            except OSError:  # EIO: the child is gone
                done, status = os.waitpid(pid, 0)
            if done:
                return os.waitstatus_to_exitcode(status), buf.decode(errors="replace")
        raise AssertionError(f"edgekit did not exit: {buf.decode(errors='replace')}")
    finally:
        os.close(fd)


@needs_llama
def test_run_without_a_prompt_chats_in_a_terminal(tiny_q4):
    rc, out = _pty_run(["run", str(tiny_q4), "--temp", "0", "-n", "4", "-c", "256", "-t", "1"], [
        (b">>> ", b"hello there\n"), (b">>> ", b"and again\n"), (b">>> ", b"/clear\n"),
        (b">>> ", b"hello there\n"), (b">>> ", b"\x03"),      # Ctrl-C at the prompt: a hint, not an exit
        (b"Ctrl-D to leave", b""), (b">>> ", b"\x04")])        # Ctrl-D ends
    assert rc == 0, out
    turns = [(int(p), int(g)) for p, g in re.findall(r"(\d+) prompt tokens, (\d+) generated", out)]
    assert len(turns) == 3, out
    assert turns[1][0] > turns[0][0] + turns[0][1]  # the second turn carries the first one
    assert turns[2][0] == turns[0][0]               # /clear forgot it
    assert "Traceback" not in out


@needs_llama
def test_exit_ends_the_chat(tiny_q4):
    rc, out = _pty_run(["run", str(tiny_q4), "-n", "2", "-c", "128", "-t", "1", "--no-stats"],
                       [(b">>> ", b"hi\n"), (b">>> ", b"/exit\n")])
    assert rc == 0 and "Traceback" not in out


def test_help_still_imports_nothing_heavy():
    code = ("import sys\nfrom edgekit.cli.main import app\n"
            "try:\n    app(['run', '-h'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnxruntime', 'llama_cpp', 'psutil'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "HEAVY []" in out, out
