"""The SDK used wrongly (QA s48): edgekit's own one-line errors, never pathlib's TypeError or a hang; a
backend shared by two threads refuses the second instead of mixing their replies."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edgekit import api
from edgekit.errors import BackendError, InputError
from edgekit.runtime.base import GenerationStats, SamplingConfig

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def tiny_q8(tiny_llama, tmp_path_factory) -> Path:
    return api.convert(tiny_llama, "gguf", output=tmp_path_factory.mktemp("sdk") / "q8",
                       recipe=api.ConvertRecipe(bits=None, preset="Q8_0")).path


def test_a_backend_generating_in_one_thread_refuses_another_thread(tiny_q8):
    """While a consumer is inside ``next()`` (here held there, waiting for its first piece), another thread's
    call is refused. (One paused between pieces is not: the next call cancels it; test_llamacpp_lifecycle.)"""
    with api.open_backend(tiny_q8, n_threads=1) as b:
        recv = b._recv
        inside, release = threading.Event(), threading.Event()

        def held_recv(doing: str, rid: int | None) -> dict:
            if doing == "generating text" and threading.current_thread().name == "consumer":
                inside.set()
                release.wait(30)
            return recv(doing, rid)

        b._recv = held_recv
        seen: dict[str, object] = {}
        consumer = threading.Thread(name="consumer", target=lambda: seen.update(
            first="".join(b.generate("one two three", SamplingConfig(temperature=0, max_tokens=24)))))
        consumer.start()
        assert inside.wait(30)
        for call in (lambda: "".join(b.generate("hi", SamplingConfig(max_tokens=4))), lambda: b.tokenize("hi")):
            with pytest.raises(BackendError, match="another thread"):
                call()
        release.set()
        consumer.join(30)
        del b._recv
        assert not consumer.is_alive() and seen.get("first")  # the first goes on undisturbed
        # once it has ended, another thread may use the backend
        t = threading.Thread(target=lambda: seen.update(text="".join(b.generate("hi", SamplingConfig(max_tokens=3)))))
        t.start()
        t.join(30)
        assert isinstance(seen.get("text"), str)


def test_a_nested_with_leaves_the_backend_loaded_for_the_outer_block(tiny_q8):
    greedy = SamplingConfig(temperature=0, max_tokens=4)
    with api.open_backend(tiny_q8, n_threads=1) as b:
        with b:
            inner = "".join(b.generate("one two", greedy))
        assert "".join(b.generate("one two", greedy)) == inner  # was: "model is not loaded (it is closed)"
    with pytest.raises(BackendError, match="not loaded"):
        "".join(b.generate("one two", greedy))


def test_stop_as_one_string_is_one_stop_string():
    assert SamplingConfig(stop="Blue").stop == ("Blue",)
    assert SamplingConfig(stop=["a", "b"]).stop == ("a", "b")
    for bad in [(5,), 7]:
        with pytest.raises(InputError, match="stop must be a string or a list of non-empty strings"):
            SamplingConfig(stop=bad)
    for empty in ["", ("a", "")]:  # run --stop "" showed a Python tuple (QA s49)
        with pytest.raises(InputError, match=r"--stop \(stop=\) takes non-empty text: .* drop it$"):
            SamplingConfig(stop=empty)


@pytest.mark.parametrize(("field", "value"), [("top_k", "5"), ("max_tokens", 2.5), ("seed", "1"), ("max_tokens", True)])
def test_whole_number_fields_must_be_whole_numbers(field, value):
    with pytest.raises(InputError, match="must be a whole number"):
        SamplingConfig(**{field: value})


def test_generate_arguments_are_checked(tiny_q8):
    with api.open_backend(tiny_q8, n_threads=1) as b:
        with pytest.raises(InputError, match="the list of messages is empty"):
            "".join(b.generate([], SamplingConfig(max_tokens=2)))
        with pytest.raises(InputError, match="sampling must be a SamplingConfig"):
            "".join(b.generate("hi", {"max_tokens": 3}))
        with pytest.raises(InputError, match="stats must be a GenerationStats"):
            "".join(b.generate("hi", SamplingConfig(max_tokens=2), "x"))
        with pytest.raises(InputError, match="expected a list of token ids, got str"):
            b.logits("hi")
        with pytest.raises(InputError, match="outside the vocabulary"):
            b.logits([10**9])
        stats = GenerationStats()  # the same arguments, of the right types, are taken
        "".join(b.generate("hi", SamplingConfig(max_tokens=2, temperature=0), stats))
        assert stats.generated_tokens >= 1


@pytest.mark.parametrize("target", [5, None, b"/tmp/x"])
def test_a_target_that_is_not_a_path_is_an_input_error(target, tiny_llama, tmp_path):
    for call in (lambda: api.open_backend(target), lambda: api.inspect(target),
                 lambda: api.Artifact.open(target), lambda: api.convert(target, "gguf", output=tmp_path / "o"),
                 lambda: "".join(api.generate(target, "hi"))):
        with pytest.raises(InputError, match="must be a path or a library name"):
            call()
    with pytest.raises(InputError, match="output must be a path"):
        api.convert(tiny_llama, "gguf", output=5)


def test_convert_and_evaluate_arguments_are_checked(tiny_llama, tiny_q8, tmp_path):
    with pytest.raises(InputError, match="to must be a format name"):
        api.convert(tiny_llama, None, output=tmp_path / "a")
    with pytest.raises(InputError, match="recipe must be a ConvertRecipe"):
        api.convert(tiny_llama, "gguf", output=tmp_path / "b", recipe={"bits": 4})
    with pytest.raises(InputError, match="quantize must be a method's config"):
        api.convert(tiny_llama, "gguf", output=tmp_path / "c", quantize="gptq")
    art = api.convert(tiny_llama, "gguf", output=tmp_path / "d", recipe=api.ConvertRecipe(bits=8), progress=None)
    assert art.model_file.is_file()
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    with pytest.raises(InputError, match="cfg must be an EvalConfig"):
        api.evaluate(tiny_q8, text, {"ctx": 64})
    with pytest.raises(InputError, match="--ctx must be a whole number"):
        api.EvalConfig(ctx="64")
    # a string that reads as a valid value named that value as invalid ("--bits 4 is not supported; valid: ... 4")
    with pytest.raises(InputError, match=r"--bits \(bits=\) must be a whole number, got '4', a str"):
        api.ConvertRecipe(bits="4")
    with pytest.raises(InputError, match=r"must be a finite number >= 0 \(0 is greedy\), got '0.5', a str"):
        SamplingConfig(temperature="0.5")


def test_plan_takes_a_name_or_path_and_refuses_nan(tiny_q8):
    by_path = api.plan(str(tiny_q8), ram_bytes=1 << 30, vram_bytes=0, n_ctx=256, cpu_Bps=1e10)
    assert by_path == api.plan(api.Artifact.open(tiny_q8), ram_bytes=1 << 30, vram_bytes=0, n_ctx=256, cpu_Bps=1e10)
    with pytest.raises(InputError, match="--vram must be a finite number"):
        api.plan(api.Artifact.open(tiny_q8), vram_bytes=float("nan"))


def test_streaming_eval_chunk_must_be_positive(tiny_q8, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    with pytest.raises(InputError, match="chunk must be a whole number of tokens >= 1"):
        api.evaluate_streaming(tiny_q8, text, kv_window=64, chunk=0)


def test_serving_beyond_loopback_without_a_key_is_warned(tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path / "nope"), "--host", "0.0.0.0"],
                           env={"EDGEKIT_API_KEY": None})  # unset (an empty one is refused)
    assert r.exit_code != 0 and "serves beyond this machine with no --api-key" in " ".join(r.output.split())


def test_an_option_of_other_backends_names_the_formats_that_take_it(tiny_llama):
    """--draft on a Core ML model named an internal option list; it now says where speculative decoding works.
    A misspelt option still lists the options the backend takes."""
    from edgekit.runtime.base import BACKENDS, _no_option, backend_options

    coreml = BACKENDS.get("coreml")
    line = _no_option(coreml, ["draft"], backend_options(coreml))
    assert "draft= (--draft) works with GGUF and ONNX artifacts" in line and "its options" not in line
    with pytest.raises(InputError, match=r"torch backend \(hf artifacts\) cannot do that: kv_window= \(--kv-window\)"):
        api.open_backend(tiny_llama, kv_window=64)
    with pytest.raises(InputError, match="has no option bogus; its options: n_ctx, n_threads"):
        api.open_backend(tiny_llama, bogus=1)
