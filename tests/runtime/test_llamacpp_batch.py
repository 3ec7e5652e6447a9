"""Continuous batching in the llama.cpp backend (``n_seq`` > 1): concurrent generations decoded in one
context, each getting exactly the answer it gets alone, with cancels and errors confined to their own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from edgekit.errors import InputError  # noqa: E402
from edgekit.runtime.base import GenerationStats, SamplingConfig  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

PROMPTS = ["Tell me about the sea.", "Hello", "What is a cat?", "Count to ten.", "Why?"]


@pytest.fixture(scope="module")
def gguf(tiny_llama, tmp_path_factory) -> Path:
    from edgekit import api
    from edgekit.converters.formats.base import ConvertRecipe

    out = tmp_path_factory.mktemp("batch") / "tiny-gguf"
    return api.convert(tiny_llama, "gguf", output=out, recipe=ConvertRecipe(preset="Q8_0")).path / "model.gguf"


@pytest.fixture(scope="module")
def batched(gguf):
    b = LlamaCppBackend(gguf, n_ctx=256, n_threads=1, n_seq=3, exact_batch=True)
    yield b
    b.close()


def _answer(backend, prompt: str, sampling: SamplingConfig) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    return "".join(backend.generate([{"role": "user", "content": prompt}], sampling, stats)), stats


def test_concurrent_answers_equal_each_alone_greedy_and_sampled(gguf, batched):
    """More streams than sequences (5 on 3: two wait in the worker's queue); greedy and seeded sampling
    give what the same request gives alone, and what a one-sequence backend with flash attention gives."""
    solo = LlamaCppBackend(gguf, n_ctx=256, n_threads=1, flash_attn=True)
    try:
        for sampling in (SamplingConfig(temperature=0, max_tokens=24),
                         SamplingConfig(temperature=0.9, top_k=40, seed=7, max_tokens=24)):
            alone = {p: _answer(solo, p, sampling)[0] for p in PROMPTS}
            assert len(set(alone.values())) > 2  # distinct answers, or mixing streams would go unseen
            assert {p: _answer(batched, p, sampling)[0] for p in PROMPTS[:2]} == {p: alone[p] for p in PROMPTS[:2]}
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                together = dict(zip(PROMPTS, pool.map(_answer, [batched] * len(PROMPTS), PROMPTS,
                                                      [sampling] * len(PROMPTS)), strict=True))
            assert {p: t for p, (t, _) in together.items()} == alone
            for _, stats in together.values():
                assert stats.stop_reason in ("eos", "length") and stats.generated_tokens > 0
                assert stats.extra["batch"]["sequences"] == 3
    finally:
        solo.close()


def test_a_stream_closed_early_leaves_the_others_untouched(batched):
    sampling = SamplingConfig(temperature=0, max_tokens=40)
    full = {p: _answer(batched, p, sampling)[0] for p in PROMPTS[:2]}
    started = threading.Event()
    cut = GenerationStats()

    def early() -> None:
        it = batched.generate([{"role": "user", "content": PROMPTS[2]}], sampling, cut)
        next(it)
        started.set()
        it.close()  # the consumer goes away: the worker cancels only this sequence

    with ThreadPoolExecutor(3) as pool:
        f_early = pool.submit(early)
        assert started.wait(60)
        rest = dict(zip(PROMPTS[:2], pool.map(lambda p: _answer(batched, p, sampling)[0], PROMPTS[:2]), strict=True))
        f_early.result()
    assert rest == full
    assert cut.stop_reason == "cancelled"
    assert _answer(batched, PROMPTS[0], sampling)[0] == full[PROMPTS[0]]  # the freed sequence is reusable


def test_a_prompt_too_long_for_its_sequence_is_a_clear_error(batched):
    with pytest.raises(InputError, match="context holds 256"):
        _answer(batched, "word " * 400, SamplingConfig(temperature=0, max_tokens=4))
    assert _answer(batched, "Hello", SamplingConfig(temperature=0, max_tokens=4))[1].generated_tokens > 0


def test_batching_refuses_what_decodes_one_sequence(gguf):
    with pytest.raises(InputError, match="n_seq must be > 0"):
        LlamaCppBackend(gguf, n_seq=0)
    with pytest.raises(InputError, match="cannot be combined with batched sequences"):
        LlamaCppBackend(gguf, n_ctx=256, n_threads=1, n_seq=2, speculative="ngram")


def test_a_repeated_prompt_reuses_its_cached_cells(batched):
    """A finished sequence keeps its cells: the same conversation again evaluates only its last prompt token,
    a new one shares the template's system turn, and the answers are what a cold cache gives."""
    sampling = SamplingConfig(temperature=0, max_tokens=12)
    first, stats1 = _answer(batched, "What is a cat?", sampling)
    again, stats2 = _answer(batched, "What is a cat?", sampling)
    other, stats3 = _answer(batched, "What is a dog?", sampling)
    assert again == first
    assert stats2.extra["batch"]["prompt_cached"] == stats2.prompt_tokens - 1
    assert 0 < stats3.extra["batch"]["prompt_cached"] < stats3.prompt_tokens - 1
    cold = LlamaCppBackend(batched.model_path, n_ctx=256, n_threads=1, n_seq=3, exact_batch=True)
    try:
        assert _answer(cold, "What is a dog?", sampling)[0] == other
    finally:
        cold.close()
