"""Bad option values and a disk that fills mid-write (QA s47: M4, M5's message, M7, M9, L1, L2, L3, L5):
one line that says the fix, the right exit code, no traceback, no "internal error", nothing half-written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from edgekit.errors import DiskFullError, InputError
from tests.edgekit.test_bad_input import assert_clean_error, no_leftovers, run_cli

NAN, INF = float("nan"), float("inf")


def clean(code: int, out: str, exit_code: int, *fragments: str) -> None:
    assert code == exit_code, out
    assert "internal error" not in out, out
    assert_clean_error(code, out, *fragments)


pytestmark = pytest.mark.usefixtures("private_home")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    from edgekit import api

    out = tmp_path_factory.mktemp("vals") / "tiny-q8"
    return api.convert(tiny_llama, "gguf", output=out, recipe=api.ConvertRecipe(bits=8)).model_file


# -- M4: the disk fills while import writes the safetensors ------------------------------------------------

def test_import_disk_fills_mid_write_is_a_disk_full_error(tiny_gguf, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as SafetensorError (not an OSError): still the disk-full line, rc 4."""
    import safetensors
    import transformers

    def full(self, *a, **kw):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out" / "hf"
    code, text = run_cli("import", tiny_gguf, "-o", out)
    clean(code, text, DiskFullError.exit_code, "the disk filled up while writing", str(out), "Free some space")
    assert not out.exists()
    no_leftovers(out.parent)


# -- M5: an OSError no code mapped: never "()" -----------------------------------------------------------

def test_generic_os_error_line_has_no_empty_parentheses():
    from edgekit.cli.ui import os_error_line

    assert os_error_line(OSError(errno.EIO, "Input/output error")) == ("Input/output error", 1)
    assert os_error_line(FileExistsError(errno.EEXIST, "File exists", "/x/afile")) == ("File exists (/x/afile)", 1)
    line, code = os_error_line(OSError(errno.ENOSPC, "No space left on device"))
    assert code == 4 and "()" not in line and "free some space" in line


# -- M7: eval --ref with another vocabulary -------------------------------------------------------------

def test_eval_ref_with_another_vocabulary_is_refused(tiny_llama, tmp_path):
    from tests.helpers import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "LlamaForCausalLM", hidden=64, ffn=128, layers=1, vocab_size=320)
    n_other = json.loads((other / "config.json").read_text())["vocab_size"]
    n = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    assert n != n_other
    from edgekit.quickstart import sample_text_path

    code, text = run_cli("eval", tiny_llama, "--ref", other, "--text", sample_text_path(), "--chunks", "1",
                         "--ctx", "64", "-t", "1")
    clean(code, text, InputError.exit_code, f"--ref has a {n_other}-token vocabulary but the model has {n}",
          "the float checkpoint this artifact was converted from")


# -- M9: sampling and serve values: NaN, infinities, out of range -----------------------------------------

@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--temp", "nan", "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
    ("--temp", "inf", "--temperature must be a finite number >= 0"),
    ("--repeat-penalty", "0", "--repeat-penalty must be a finite number > 0 (1.0 is off), got 0.0"),
    ("--repeat-penalty", "-1", "--repeat-penalty must be a finite number > 0"),
    ("--repeat-penalty", "nan", "--repeat-penalty must be a finite number > 0"),
    ("--top-p", "nan", "--top-p must be a finite number in (0, 1]"),
    ("--min-p", "nan", "--min-p must be a finite number in [0, 1)"),
    ("--top-k", "-5", "--top-k must be >= 0"),
    ("-n", "-1", "--max-tokens must be > 0"),
])
def test_run_sampling_values_are_checked_up_front(tiny_llama, flag, value, says):
    code, text = run_cli("run", tiny_llama, "-p", "hi", flag, value)
    clean(code, text, InputError.exit_code, says)


def test_serve_request_keeps_field_names_and_signs():
    from edgekit.runtime.serve.protocol import RequestError, parse_job

    with pytest.raises(RequestError, match=r"'?min_p'? must be a finite number in \[0, 1\).*got -0.5"):
        parse_job("text", {"model": "m", "prompt": "hi", "min_p": -0.5}, 64)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("timeout", NAN, "--timeout must be a finite number > 0"),
    ("timeout", INF, "--timeout must be a finite number > 0"),
    ("timeout", 0, "--timeout must be a finite number > 0"),
    ("idle_unload", NAN, "--idle-unload must be a finite number >= 0"),
    ("shutdown_timeout", -1, "--grace must be a finite number >= 0"),
])
def test_serve_config_times_are_finite(field, value, says):
    from edgekit.runtime.serve.config import ServeConfig

    with pytest.raises(InputError, match=says.replace("(", r"\(")):
        ServeConfig(models={"m": Path("m")}, **{field: value})


def test_serve_timeout_nan_on_the_command_line(tiny_gguf):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    code, text = run_cli("serve", tiny_gguf.parent, "--timeout", "nan", "--port", "0")
    clean(code, text, InputError.exit_code, "--timeout must be a finite number > 0", "got nan")


# -- L1: --threads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", ["0", "-3", "100000"])
def test_convert_threads_out_of_range(tiny_llama, tmp_path, threads):
    for extra in ([], ["--method", "gptq", "--calib-samples", "2", "--calib-seqlen", "32"]):
        code, text = run_cli("convert", tiny_llama, "-o", tmp_path / "out", "-t", threads, *extra)
        clean(code, text, InputError.exit_code, "--threads must be a whole number from 1 to 1024", f"got {threads}",
              "leave it out for the physical cores")
        assert not (tmp_path / "out").exists()
        no_leftovers(tmp_path)


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_run_threads_out_of_range(tiny_llama, threads):
    code, text = run_cli("run", tiny_llama, "-p", "hi", "-n", "2", "-t", threads)
    clean(code, text, InputError.exit_code, "--threads must be a whole number from 1 to 1024")


@pytest.mark.parametrize("cmd", [["eval", "--text", "t.txt"], ["chat"], ["run", "-p", "hi"]])
def test_threads_checked_in_the_flags_words_before_any_work(tiny_gguf, cmd):
    code, text = run_cli(cmd[0], tiny_gguf, *cmd[1:], "-t", "0")
    clean(code, text, InputError.exit_code, "--threads must be a whole number from 1 to 1024")


def test_sdk_threads_in_the_keywords_words(tiny_gguf):
    from edgekit import api

    with pytest.raises(InputError, match=r"^n_threads= must be a whole number from 1 to 1024"):
        api.open_backend(tiny_gguf, n_threads=0)


def test_run_max_tokens_beyond_the_context_is_refused(tiny_gguf):
    code, text = run_cli("run", tiny_gguf, "-p", "hi", "-n", "100", "--ctx", "32")
    clean(code, text, InputError.exit_code, "-n 100 can never be reached with --ctx 32", "--kv-window")
    code, text = run_cli("run", tiny_gguf, "-p", "hi", "-n", "100", "--ctx", "64", "--kv-window", "64", "-t", "1")
    assert code == 0, text


def test_profile_threads_capped():
    from edgekit.runtime.profile import ProfileConfig
    from edgekit.runtime.profile_schema import parse_tests

    with pytest.raises(InputError, match="from 1 to 1024"):
        ProfileConfig(tests=parse_tests("pp16"), threads=(1, 100000))


# -- L2: --calib-seqlen ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("seqlen", "says"), [
    ("1000000000", "--calib-seqlen 1000000000 is too long (at most 65536 tokens)"),
    ("4096", "--calib-seqlen 4096 is beyond the 1024 tokens llama was trained for"),
])
def test_calib_seqlen_is_bounded(tiny_llama, tmp_path, seqlen, says):
    code, text = run_cli("convert", tiny_llama, "-o", tmp_path / "out", "-t", "1", "--method", "gptq",
                         "--calib-samples", "2", "--calib-seqlen", seqlen)
    clean(code, text, InputError.exit_code, says)
    assert not (tmp_path / "out").exists()


# -- L5: plan bandwidths --------------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "value"), [
    ("--gpu-bandwidth", "0"), ("--gpu-bandwidth", "-5"), ("--gpu-bandwidth", "nan"),
    ("--cpu-bandwidth", "0"), ("--cpu-bandwidth", "-1"), ("--cpu-bandwidth", "inf"),
])
def test_plan_bandwidths_are_finite_and_positive(tiny_gguf, flag, value):
    code, text = run_cli("plan", tiny_gguf.parent, "--vram", "1GiB", flag, value)
    clean(code, text, InputError.exit_code, f"{flag} must be a finite number > 0", f"got {float(value)}")


# -- L3: a context that cannot be allocated is not a corrupt file --------------------------------------

def test_context_allocation_failure_says_lower_ctx(tiny_gguf):
    from edgekit.runtime.llamacpp_errors import load_error

    tail = ["print_info: n_ctx_train      = 1024", "llama_init_from_model: failed to allocate buffer"]
    exc = load_error({"type": "ValueError", "message": "Failed to create llama_context"}, tiny_gguf, tail,
                     n_ctx=999999999)
    assert isinstance(exc, InputError), exc
    text = str(exc)
    assert "a context of 999999999 tokens" in text and "trained for 1024" in text and "lower --ctx" in text
    assert "corrupt" not in text


# -- QA s47 leftovers: limits that llama.cpp or a later step used to bend ------------------------------

def test_run_keeps_the_context_it_was_given(tiny_gguf):
    """llama.cpp rounds a context up to 256 cells; --ctx 8 is still a context of 8 tokens."""
    from edgekit import api

    code, text = run_cli("run", tiny_gguf.parent, "-p", "one two three four five six seven eight nine ten",
                         "-n", "2", "--ctx", "8", "-t", "1")
    clean(code, text, InputError.exit_code, "but the context holds 8", "raise --ctx")
    with api.open_backend(tiny_gguf.parent, n_ctx=12, n_threads=1) as backend:
        assert backend.n_ctx == 12
        from edgekit.runtime.base import GenerationStats

        stats = GenerationStats()
        "".join(backend.generate("one two three", api.SamplingConfig(temperature=0.0, max_tokens=500), stats))
        assert stats.prompt_tokens + stats.generated_tokens == 12 and stats.stop_reason == "length", stats


@pytest.mark.parametrize(("args", "says"), [
    (("-c", "4", "--tests", "pp16"), "--ctx 4 cannot hold pp16 (16 tokens); raise --ctx to 16 or more"),
    (("-c", "64", "-d", "60", "--tests", "pp16"), "--ctx 64 cannot hold pp16 at depth 60 (76 tokens)"),
    (("--ngl", "-1",), "--gpu-layers values must be 0 or more"),
    (("-d", "-1",), "--depth values must be 0 or more"),
    (("-b", "0",), "--batch values must be at least 1"),
])
def test_profile_sweep_values_are_checked_up_front(tiny_gguf, args, says):
    code, text = run_cli("profile", tiny_gguf.parent, "-r", "1", *args)
    clean(code, text, InputError.exit_code, says)


@pytest.mark.parametrize(("args", "says"), [
    (("--kv-window", "64", "--max-tokens", "-3"), "--max-tokens must be at least 2"),
    (("--kv-window", "64", "--max-tokens", "0"), "--max-tokens must be at least 2"),
    (("--max-tokens", "100"), "--max-tokens is for --kv-window"),
])
def test_eval_max_tokens_is_checked(tiny_gguf, args, says):
    code, text = run_cli("eval", tiny_gguf.parent, "-t", "1", "--no-record", *args)
    clean(code, text, InputError.exit_code, says)


def test_a_busy_machine_note_does_not_come_before_a_refused_flag(tiny_llama, tmp_path, monkeypatch):
    from edgekit.runtime import hostinfo

    monkeypatch.setattr(hostinfo, "_busy_now", lambda: 64.0)
    monkeypatch.setattr(hostinfo, "_said", set())
    code, text = run_cli("convert", tiny_llama, "-o", tmp_path / "a", "-t", "1", "--prune", "depth:100")
    clean(code, text, InputError.exit_code, "depth pruning can drop at most")
    assert "busy" not in text
    monkeypatch.setattr(hostinfo, "_said", set())  # a note is said once per process
    code, text = run_cli("convert", tiny_llama, "-o", tmp_path / "b", "-t", "1", "--method", "gptq",
                         "--calib-samples", "2", "--calib-seqlen", "16")
    assert code == 0 and "CPUs are busy with other programs" in text, text
