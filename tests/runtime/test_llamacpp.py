"""LlamaCppBackend: llama.cpp in a worker process; real-model behaviour, crash and corrupt-file handling.

Real-model tests read the GGUF path from EDGEKIT_REAL_GGUF (SmolLM2-135M-Instruct) and skip without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("llama_cpp") is None:  # (not imported here: only the worker loads it)
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)

from edgekit.errors import BackendCrashed, BackendError, CorruptFileError, InputError, UnsupportedError  # noqa: E402
from edgekit.runtime.base import BACKENDS, GenerationStats, SamplingConfig, backend_for_format  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

pytestmark = pytest.mark.llamacpp

GREEDY = SamplingConfig(temperature=0.0, max_tokens=48)
# The template's default system prompt makes this Q4_1 135M model ramble in French when greedy;
# with an explicit system message it answers plainly.
CAPITAL = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _real_gguf() -> Path:
    return Path(os.environ["EDGEKIT_REAL_GGUF"])


# The conftest fixture decides: skip offline, fail under CI or when the model is broken.
needs_real = pytest.mark.usefixtures("real_gguf")


def _open(path: Path, **kwargs) -> LlamaCppBackend:
    # Passive OpenMP waits: spinning threads collapse when the CI box's cores are shared.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        return LlamaCppBackend(path, **{"n_ctx": 512, "n_threads": 2, **kwargs})


@pytest.fixture(scope="module")
def llm(real_gguf):
    backend = _open(real_gguf)
    yield backend
    backend.close()


@pytest.fixture
def junk_file(tmp_path: Path) -> Path:
    path = tmp_path / "junk.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def test_registered_for_gguf():
    assert BACKENDS.get("llamacpp") is LlamaCppBackend
    assert backend_for_format("gguf") is LlamaCppBackend


def test_missing_file_is_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        LlamaCppBackend(tmp_path / "nope.gguf")


def test_runtime_options_llama_cpp_would_take_badly_are_refused_by_name(junk_file: Path):
    """-O type_k=99 aborted llama.cpp (SIGABRT); flash_attn=maybe went through as true. Refused before any
    process starts (the junk file is never read); a cache type may be named."""
    from edgekit.runtime.llamacpp_decoding import check_llama_options

    for opts, says in (({"type_k": 99}, "-O type_k=99: llama.cpp's KV cache takes f32 (0), f16 (1)"),
                       ({"type_v": "q9"}, "-O type_v=q9"), ({"type_k": True}, "-O type_k=True"),
                       ({"flash_attn": "maybe"}, "-O flash_attn=maybe: give true or false")):
        with pytest.raises(InputError, match=re.escape(says)):
            LlamaCppBackend(junk_file, **opts)
    assert check_llama_options({"type_k": "Q8_0", "type_v": 1, "flash_attn": True}) == {
        "type_k": 8, "type_v": 1, "flash_attn": True}


# -- real model ----------------------------------------------------------------------------------


@needs_real
def test_model_info(llm: LlamaCppBackend):
    assert llm.n_vocab == 49152
    assert llm.n_ctx == 512
    assert llm.metadata()["general.architecture"] == "llama"
    assert "tokenizer.chat_template" in llm.metadata()
    assert llm.info["add_bos"] is False
    assert llm.load_time > 0


@needs_real
def test_tokenize_round_trip(llm: LlamaCppBackend):
    text = "Hello, world! Ünïcödé text 🙂 with  two spaces."
    tokens = llm.tokenize(text)
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert llm.detokenize(tokens) == text
    assert llm.tokenize(text, add_special=False) == tokens  # SmolLM2 asks for no BOS
    assert llm.tokenize("<|im_start|>") == [1]  # special tokens are parsed
    assert llm.detokenize([1], special=True) == "<|im_start|>"


@needs_real
def test_greedy_chat_answer_streams(llm: LlamaCppBackend):
    stats = GenerationStats()
    pieces = list(llm.generate(CAPITAL, GREEDY, stats))
    answer = "".join(pieces)
    assert "Paris" in answer
    assert len(pieces) >= 3
    assert stats.prompt_tokens > 10
    assert 0 < stats.generated_tokens < GREEDY.max_tokens
    assert stats.stop_reason == "eos"
    assert 0 < stats.time_to_first_token <= stats.total_time
    assert stats.extra["chat_template"] == "gguf"
    assert "<|im_end|>" not in answer


@needs_real
def test_max_tokens_gives_length(llm: LlamaCppBackend):
    stats = GenerationStats()
    out = "".join(llm.generate("Once upon a time", SamplingConfig(temperature=0.0, max_tokens=5), stats))
    assert out
    assert stats.generated_tokens == 5
    assert stats.stop_reason == "length"


@needs_real
def test_seeded_sampling_is_reproducible(llm: LlamaCppBackend):
    def sample(seed: int) -> str:
        cfg = SamplingConfig(temperature=0.9, seed=seed, max_tokens=16)
        return "".join(llm.generate("My favourite animal is", cfg))

    first = sample(7)
    assert first == sample(7)
    assert any(sample(s) != first for s in (8, 9, 10))


@needs_real
def test_stop_strings_cut_output_without_leaking(llm: LlamaCppBackend):
    prompt = "The three primary colors are"
    ref = "".join(llm.generate(prompt, SamplingConfig(temperature=0.0, max_tokens=24)))
    assert len(ref) > 30
    stop = ref[12:19]  # a stop string that likely spans token boundaries
    cut = ref.find(stop)
    stats = GenerationStats()
    pieces = list(
        llm.generate(prompt, SamplingConfig(temperature=0.0, max_tokens=24, stop=(stop, "zzzq")), stats)
    )
    assert "".join(pieces) == ref[:cut]
    assert stats.stop_reason == "stop"
    assert not any(stop in p for p in pieces)


@needs_real
def test_logits_argmax_is_greedy_continuation(llm: LlamaCppBackend):
    prompt = "The capital of France is"
    ids = llm.tokenize(prompt)
    n_prompt = len(ids)
    for _ in range(6):
        rows = llm.logits(ids)
        assert rows.shape == (len(ids), llm.n_vocab) and rows.dtype == np.float32
        ids.append(int(rows[-1].argmax()))
    greedy = "".join(llm.generate(prompt, SamplingConfig(temperature=0.0, max_tokens=6)))
    assert llm.detokenize(ids[n_prompt:]) == greedy
    assert "Paris" in greedy
    # teacher forcing over the whole chain agrees with the step-by-step argmaxes
    full = llm.logits(ids)
    assert full[n_prompt - 1 : -1].argmax(axis=1).tolist() == ids[n_prompt:]


@needs_real
def test_logits_full_context(llm: LlamaCppBackend):
    base = llm.tokenize("The quick brown fox jumps over the lazy dog. ")
    tokens = (base * (llm.n_ctx // len(base) + 1))[: llm.n_ctx]
    rows = llm.logits(tokens)
    assert rows.shape == (llm.n_ctx, llm.n_vocab)
    assert np.isfinite(rows).all()
    head = llm.logits(tokens[:7])  # starts again from an empty KV cache
    np.testing.assert_allclose(head, rows[:7], atol=0.05, rtol=0)
    with pytest.raises(InputError, match="context"):
        llm.logits(tokens + tokens[:1])


@needs_real
def test_early_close_then_generate_again(llm: LlamaCppBackend):
    stats = GenerationStats()
    gen = llm.generate(
        "Write a long story about a dragon.", SamplingConfig(temperature=0.8, max_tokens=200), stats
    )
    got = [next(gen) for _ in range(3)]
    gen.close()
    assert len(got) == 3 and stats.stop_reason == "cancelled"
    assert stats.generated_tokens < 200
    stats = GenerationStats()
    assert "Paris" in "".join(llm.generate(CAPITAL, GREEDY, stats))
    assert stats.stop_reason == "eos"

    # a paused generator is superseded by the next call and then simply ends
    paused = llm.generate("Count: 1, 2, 3,", SamplingConfig(temperature=0.0, max_tokens=100))
    next(paused)
    assert llm.tokenize("hi")
    assert list(paused) == []


@needs_real
def test_worker_exits_when_parent_dies():
    script = textwrap.dedent(
        f"""
        import os, sys
        from edgekit.runtime.llamacpp import LlamaCppBackend
        b = LlamaCppBackend({str(_real_gguf())!r}, n_ctx=256, n_threads=1)
        print(b._proc.pid, flush=True)
        os._exit(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker_pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail("the worker outlived its parent")


# -- crashes and bad files -------------------------------------------------------------------------


def _die_at_start(monkeypatch: pytest.MonkeyPatch, sig: str, tmp_path: Path | None = None) -> None:
    """Every llama.cpp worker process dies of ``sig`` as it starts (with ``tmp_path``: only the first one).

    The process the backend started is really killed by the signal: the wrapper shell ``exec``s the
    worker, so it is the same pid the parent waits on."""
    from edgekit.runtime import llamacpp_build

    if tmp_path is None:
        monkeypatch.setenv(llamacpp_build.WRAPPER_ENV, f"sh -c 'kill -{sig} $$' --")
        return
    mark = tmp_path / "crashed-once"
    monkeypatch.setenv(llamacpp_build.WRAPPER_ENV,
                       f"sh -c 'if [ ! -e {mark} ]; then : > {mark}; kill -{sig} $$; fi; exec \"$@\"' --")


def _kill_worker(backend: LlamaCppBackend, sig: signal.Signals) -> None:
    """Send ``sig`` to the backend's live worker process and wait until it is dead."""
    proc = backend._proc
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    assert proc.returncode == -sig


@pytest.fixture
def no_amx_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AMX, so a protection fault gets the general advice on any build host."""
    from edgekit.runtime import llamacpp_build

    monkeypatch.setenv(llamacpp_build.CPUINFO_ENV, str(Path(__file__).with_name("data") / "cpuinfo-epyc-avx2.txt"))


def test_crash_while_loading_names_signal(junk_file: Path, monkeypatch: pytest.MonkeyPatch, no_amx_host):
    _die_at_start(monkeypatch, "SEGV")
    with pytest.raises(BackendCrashed) as err:
        LlamaCppBackend(junk_file, retry_safe=False)
    msg = str(err.value)
    assert msg.startswith(f"llama.cpp crashed (SIGSEGV) while loading ({junk_file.name}); ")
    assert err.value.signal == "SIGSEGV" and "--rebuild-llama" in msg
    # the advice names only what exists: an environment variable and the setup script's option
    assert "EDGEKIT_LLAMACPP_LOG=1" in msg and "--safe-cpu" not in msg and "--verbose" not in msg
    assert "\n" not in msg


def test_protection_fault_retries_once_in_safe_mode(junk_file: Path, monkeypatch: pytest.MonkeyPatch, no_amx_host):
    _die_at_start(monkeypatch, "SEGV")  # crashes in safe mode too
    seen: list[str] = []
    with pytest.raises(BackendCrashed, match=r"SIGSEGV.*also in safe CPU mode"):
        LlamaCppBackend(junk_file, on_warning=seen.append)
    assert len(seen) == 1 and "retrying once in safe CPU mode" in seen[0]


@needs_real
def test_crash_while_loading_recovers_in_safe_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_amx_host):
    _die_at_start(monkeypatch, "SEGV", tmp_path)
    seen: list[str] = []
    with _open(_real_gguf(), n_ctx=256, on_warning=seen.append) as backend:
        assert backend.safe_cpu is True and backend.info["safe_cpu"] is True
        assert "Paris" in "".join(backend.generate(CAPITAL, GREEDY))
    seen = [s for s in seen if "CPUs are busy with other programs" not in s]  # a loaded host says so too
    assert len(seen) == 1 and seen[0].startswith("llama.cpp crashed (SIGSEGV) while loading")


def test_sigill_is_explained_not_retried(junk_file: Path, monkeypatch: pytest.MonkeyPatch, no_amx_host):
    """An illegal instruction is the build's fault, not the weights' layout: safe CPU mode cannot help."""
    from edgekit.runtime import llamacpp_build

    _die_at_start(monkeypatch, "ILL")
    seen: list[str] = []
    with pytest.raises(BackendCrashed) as err:
        LlamaCppBackend(junk_file, on_warning=seen.append)
    msg = str(err.value)
    assert seen == [] and err.value.signal == "SIGILL" and "AMD EPYC 7B12" in msg and "--rebuild-llama" in msg
    record = llamacpp_build.installed_record()
    if record and "AVX512" in record["options"]:  # an AVX-512 build on the EPYC: name what it lacks
        assert "uses AVX_VNNI, AVX512" in msg or "uses AVX512" in msg


def test_amx_fault_message_only_where_amx_can_be_the_cause(monkeypatch: pytest.MonkeyPatch):
    from edgekit.runtime import llamacpp_build, llamacpp_errors

    data = Path(__file__).with_name("data")
    monkeypatch.setenv(llamacpp_build.CPUINFO_ENV, str(data / "cpuinfo-xeon-amx.txt"))
    monkeypatch.setattr(llamacpp_build, "installed_record", lambda: None)  # a build edgekit did not make
    msg = llamacpp_errors.crash_message(-signal.SIGSEGV, "loading", "m.gguf")
    assert "reports AMX" in msg and "--rebuild-llama" in msg
    monkeypatch.setattr(llamacpp_build, "installed_record", lambda: {"options": ["AVX2"], "key": "x86-64-v3"})
    assert "AMX" not in llamacpp_errors.crash_message(-signal.SIGSEGV, "loading", "m.gguf")
    monkeypatch.setenv(llamacpp_build.CPUINFO_ENV, str(data / "cpuinfo-epyc-avx2.txt"))
    monkeypatch.setattr(llamacpp_build, "installed_record", lambda: None)
    assert "AMX" not in llamacpp_errors.crash_message(-signal.SIGSEGV, "loading", "m.gguf")
    assert "out of memory" in llamacpp_errors.crash_message(-signal.SIGKILL, "loading", "m.gguf")


@needs_real
def test_crash_before_first_decode_recovers_in_safe_mode(no_amx_host):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _open(_real_gguf(), n_ctx=256) as backend:
            assert backend.safe_cpu is False
            _kill_worker(backend, signal.SIGSEGV)  # as a fault in the first decode would
            text = "".join(backend.generate(CAPITAL, GREEDY))
            assert backend.safe_cpu is True and backend.info["safe_cpu"] is True
    assert "Paris" in text
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "SIGSEGV" in str(w.message)]


@needs_real
def test_crash_while_generating_keeps_parent_alive(no_amx_host):
    backend = _open(_real_gguf(), n_ctx=256, retry_safe=False)
    stream = backend.generate("Once upon a time", SamplingConfig(temperature=0.0, max_tokens=200))
    next(stream)
    _kill_worker(backend, signal.SIGSEGV)
    with pytest.raises(BackendCrashed) as err:
        list(stream)
    msg = str(err.value)
    assert msg.startswith(f"llama.cpp crashed (SIGSEGV) while generating text ({_real_gguf().name})")
    assert "\n" not in msg
    with pytest.raises(BackendError, match="crashed"):
        backend.tokenize("hi")
    backend.close()


@needs_real
def test_abort_in_worker_is_reported():
    with _open(_real_gguf(), n_ctx=256) as backend:
        _kill_worker(backend, signal.SIGABRT)
        with pytest.raises(BackendCrashed) as err:
            backend.tokenize("hello")
    msg = str(err.value)
    assert msg.startswith(f"llama.cpp died (SIGABRT) while tokenizing ({_real_gguf().name})")
    assert msg.endswith("rerun with EDGEKIT_LLAMACPP_LOG=1 to see llama.cpp's log") and "\n" not in msg


def test_random_bytes_are_corrupt_file(junk_file: Path):
    with pytest.raises(CorruptFileError, match="not a GGUF file"):
        LlamaCppBackend(junk_file)


def test_unknown_architecture_is_unsupported(tmp_path: Path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_tensor("x", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedError, match="no-such-arch"):
        LlamaCppBackend(path)


@needs_real
@pytest.mark.parametrize("keep", [100, 3_000_000])
def test_truncated_gguf_is_corrupt_file(tmp_path: Path, keep: int):
    path = tmp_path / "cut.gguf"
    with open(_real_gguf(), "rb") as fh:
        path.write_bytes(fh.read(keep))
    with pytest.raises(CorruptFileError) as err:
        LlamaCppBackend(path)
    msg = str(err.value)
    assert "cut.gguf" in msg and "\n" not in msg and "Traceback" not in msg
