"""LlamaCppBackend's life and its users (QA s54): a backend nobody holds is collected with its worker; of two
threads starting a generation at once exactly one runs; a stream abandoned in another thread (an executor's)
does not block the next call."""

from __future__ import annotations

import gc
import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from edgekit import api
from edgekit.errors import BackendError
from edgekit.runtime.base import GenerationStats, SamplingConfig

pytestmark = pytest.mark.llamacpp

GREEDY = SamplingConfig(temperature=0, max_tokens=12)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_backend_nobody_holds_is_collected_and_its_worker_stopped(tiny_gguf):
    b = api.open_backend(tiny_gguf, n_threads=1)
    assert "".join(b.generate("hi", SamplingConfig(max_tokens=4)))
    pid, readers, ref = b.pid, list(b._threads), weakref.ref(b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del b
        gc.collect()
    assert pid is not None and _gone(pid)  # stopped and reaped, not a zombie
    assert not any(t.is_alive() for t in readers)
    # as an unclosed file does, it says so (shown with python -X dev or -W default) ...
    said = [str(w.message) for w in caught if w.category is ResourceWarning]
    assert len(said) == 1 and "unclosed llama.cpp backend" in said[0]
    del caught  # ... with the backend as its source (tracemalloc shows where it was made), which kept it
    gc.collect()
    assert ref() is None  # was: kept alive by its reader threads (bound methods) until the interpreter exited


def test_a_closed_backend_goes_without_a_warning(tiny_gguf, recwarn):
    with api.open_backend(tiny_gguf, n_threads=1) as b:
        "".join(b.generate("hi", SamplingConfig(max_tokens=2)))
    del b
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


def test_of_two_threads_starting_a_generation_at_once_one_runs_and_the_other_is_refused(tiny_gguf):
    """The first thread is held just after the check, before its request reaches the worker (where the race
    was): the second must still be refused, not both run (one cut short, no error)."""
    with api.open_backend(tiny_gguf, n_threads=1) as b:
        send = b._send
        first_sending, second_done = threading.Event(), threading.Event()
        out: dict[str, Any] = {}

        def held_send(msg: dict[str, Any]) -> None:
            if msg.get("op") == "generate":
                if threading.current_thread().name == "first":
                    first_sending.set()
                    second_done.wait(30)
                else:  # the second got past the check: its request would share the worker with the first
                    raise AssertionError("the second thread's generation reached the worker")
            send(msg)

        b._send = held_send

        def run(name: str) -> None:
            stats = GenerationStats()
            try:
                out[name] = ("".join(b.generate("one two three", GREEDY, stats)), stats.stop_reason)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
                out[name] = exc
            finally:
                if name == "second":
                    second_done.set()

        first = threading.Thread(target=run, args=("first",), name="first")
        second = threading.Thread(target=run, args=("second",), name="second")
        first.start()
        assert first_sending.wait(30)
        second.start()
        second.join(30)
        first.join(60)
        del b._send
        assert not first.is_alive() and not second.is_alive()
        assert isinstance(out["second"], BackendError), out["second"]
        assert "another thread" in str(out["second"])
        text, stop = out["first"]
        assert text and stop != "cancelled"
        assert "".join(b.generate("one two three", GREEDY))  # and the backend is free again


def test_a_stream_abandoned_in_a_pool_thread_does_not_block_the_next_call(tiny_gguf):
    """asyncio's run_in_executor(None, next, it) with a client that went away: the pool thread lives on, but
    nobody pulls the stream. The next call cancels it (as in one thread), and the stream ends as cancelled."""
    with api.open_backend(tiny_gguf, n_threads=1) as b, ThreadPoolExecutor(1) as pool:
        abandoned_stats = GenerationStats()
        it = b.generate("one two three", SamplingConfig(temperature=0, max_tokens=40), abandoned_stats)
        assert pool.submit(next, it).result(30)
        stats = GenerationStats()
        text = "".join(b.generate("one two three", GREEDY, stats))  # was: BackendError "another thread"
        assert text and stats.stop_reason != "cancelled"
        assert pool.submit(list, it).result(30) == []  # pulled later: it ends, cancelled
        assert abandoned_stats.stop_reason == "cancelled"
        # the pool thread, which started the abandoned stream, may use the backend too
        assert pool.submit(lambda: "".join(b.generate("one two three", GREEDY))).result(30)
