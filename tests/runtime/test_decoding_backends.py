"""Speculative decoding and attention-sink KV windows in the real runtimes (llama.cpp, onnxruntime), on tiny
checkpoints built here: greedy identity, vocabulary checks, positions after eviction, backends agreeing."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from edgekit import api
from edgekit.converters.formats.base import ConvertRecipe
from edgekit.runtime.base import GenerationStats, SamplingConfig
from tests.helpers import build_tiny_model

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime missing")

WINDOW, SINKS = 64, 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoding")
    two = build_tiny_model(root / "two", "LlamaForCausalLM", hidden=256, ffn=512, layers=2, seed=3)
    one = build_tiny_model(root / "one", "LlamaForCausalLM", hidden=256, ffn=512, layers=1, seed=4)
    other = build_tiny_model(root / "other", "MistralForCausalLM", hidden=96, ffn=256, tokenizer="spm", seed=5)
    out = {"two": two, "one": one, "other": other}
    if importlib.util.find_spec("llama_cpp") is not None:
        out["target"] = api.convert(two, "gguf", output=root / "t-f32", recipe=ConvertRecipe(preset="F32")).path
        out["draft"] = api.convert(two, "gguf", output=root / "d-q8", recipe=ConvertRecipe(preset="Q8_0")).path
        out["other_gguf"] = api.convert(other, "gguf", output=root / "o-f32", recipe=ConvertRecipe(preset="F32")).path
        out["one_gguf"] = api.convert(one, "gguf", output=root / "one-f32", recipe=ConvertRecipe(preset="F32")).path
    if importlib.util.find_spec("onnxruntime") is not None:
        out["one_onnx"] = api.convert(one, "onnx", output=root / "one-onnx", recipe=ConvertRecipe(bits=32)).path
        out["two_onnx"] = api.convert(two, "onnx", output=root / "two-onnx", recipe=ConvertRecipe(bits=32)).path
        spm = build_tiny_model(root / "spm", "LlamaForCausalLM", hidden=128, ffn=256, layers=1, tokenizer="spm", seed=6)
        out["other_onnx"] = api.convert(spm, "onnx", output=root / "o-onnx", recipe=ConvertRecipe(bits=32)).path
    return out


def _open(path, **kw):
    return api.open_backend(path, n_threads=2, **{"n_ctx": 512, **kw})


PROMPTS = ["the quick brown fox", "once upon a time there was", "hello world, hello world, hello",
           "numbers: one two three one two", "a b c d e f g a b c"]


@needs_llama
def test_greedy_output_is_identical_with_a_draft_and_with_ngram(models):
    greedy = SamplingConfig(temperature=0, max_tokens=40)

    def outputs(**kw):
        texts, extras = [], []
        with _open(models["target"], **kw) as b:
            for p in PROMPTS:
                st = GenerationStats()
                texts.append("".join(b.generate(p, greedy, st)))
                extras.append(st.extra.get("speculative"))
        return texts, extras

    plain, _ = outputs(flash_attn=True)  # drafting turns flash attention on: compare like with like
    drafted, spec = outputs(draft=str(models["draft"]), n_draft=4)
    ngram, _ = outputs(speculative="ngram")
    assert drafted == plain and ngram == plain
    assert sum(s["accepted"] for s in spec) > 0 and all(s["mode"] == "draft" for s in spec)


@needs_llama
def test_the_sdks_generate_gives_drafted_greedy_text(models):
    """QA s53: the SDK's generate decoded a GGUF without flash attention, drafting with it, so its greedy text
    changed when a drafter was added (`edgekit run` was right: it decodes with flash attention)."""
    greedy = SamplingConfig(temperature=0, max_tokens=40)
    for p in PROMPTS:
        plain = "".join(api.generate(models["target"], p, greedy, n_ctx=512, n_threads=2))
        assert "".join(api.generate(models["target"], p, greedy, n_ctx=512, n_threads=2, speculative="ngram")) == plain


@needs_llama
def test_sampled_speculative_generation_is_reproducible(models):
    s = SamplingConfig(temperature=0.8, seed=7, max_tokens=24)
    with _open(models["target"], draft=str(models["draft"])) as b:
        a = "".join(b.generate("once upon a time", s))
        c = "".join(b.generate("once upon a time", s))
    assert a == c and a


@needs_llama
def test_a_draft_with_another_vocabulary_is_refused(models):
    from edgekit.errors import InputError

    with pytest.raises(InputError, match="vocabulary") as err:  # the user's choice, not a damaged file
        _open(models["target"], draft=str(models["other_gguf"]))
    assert "corrupt" not in str(err.value)


@pytest.mark.parametrize("fmt, tol", [
    pytest.param("one_gguf", 2e-2, marks=needs_llama, id="llamacpp"),  # its cache is F16: the shift rounds
    pytest.param("one_onnx", 1e-3, marks=needs_ort, id="onnxruntime"),
])
def test_window_keeps_positions_consistent_with_a_recomputation(models, fmt, tol):
    """One layer: a token's K/V depend on the token and its position only, so after eviction and the
    shift, the next logits must equal those of the kept tokens evaluated afresh at positions 0..n-1."""
    tokens = list(np.random.default_rng(0).integers(3, 300, size=150))
    with _open(models[fmt], kv_window=WINDOW, kv_sinks=SINKS) as b:
        nll, info = b.stream_nll(tokens, chunk=1)
    kv = info["kv"]
    assert kv["evicted"] > 0 and info["peak_cells"] <= WINDOW
    kept = tokens[:SINKS] + tokens[SINKS + kv["evicted"] : len(tokens) - 1]
    assert len(kept) == kv["cells"]
    with _open(models[fmt]) as b:
        z = b.logits(kept)[-1].astype(np.float64)
    want = np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[-1]]
    assert abs(float(nll[-1]) - want) < tol


@needs_llama
@needs_ort
def test_onnx_and_llamacpp_windows_agree(models):
    tokens = list(np.random.default_rng(1).integers(3, 300, size=200))
    with _open(models["one_gguf"], kv_window=WINDOW, kv_sinks=SINKS) as b:
        a, ia = b.stream_nll(tokens, chunk=16)
    with _open(models["one_onnx"], kv_window=WINDOW, kv_sinks=SINKS) as b:
        c, ic = b.stream_nll(tokens, chunk=16)
    assert ia["kv"]["evicted"] == ic["kv"]["evicted"] > 0
    assert np.abs(a - c).max() < 2e-2
    # without the window the model sees more context: the NLLs differ once eviction started
    with _open(models["one_gguf"]) as b:
        full, _ = b.stream_nll(tokens, chunk=16)
    assert np.abs(full - a).max() > 1e-2


@pytest.mark.parametrize("fmt", [pytest.param("draft", marks=needs_llama), pytest.param("two_onnx", marks=needs_ort)])
def test_drafting_past_the_window_is_plain_decoding_token_for_token(models, fmt):
    """QA s51: with a KV window, a verification batch that crossed the window's edge evicted before its later
    tokens were seen, and a rejected draft could not bring them back: the text left plain decoding's after an
    eviction (GGUF and ONNX). Drafts now stop at the edge. Drafted from plain decoding's own text (a predicted
    output), the batches are long and cross the edge often; the GGUF target is Q8_0, whose batched kernels
    round as its one-token ones do."""
    greedy = SamplingConfig(temperature=0, max_tokens=240)
    # a fixed draft length: how much an adaptive one drafts follows the step costs measured at load, which a
    # loaded machine makes noisy (it drafted 1 token in a generation once), and this test is about the edge
    with _open(models[fmt], kv_window=WINDOW, n_draft=4) as b:
        for p in ("the quick brown fox", PROMPTS[3]):
            plain = "".join(b.generate(p, greedy, GenerationStats()))
            st = GenerationStats()
            assert "".join(b.generate(p, dataclasses.replace(greedy, prediction=plain), st)) == plain
            assert st.extra["speculative"]["accepted"] > 10 and st.extra["kv"]["evicted"] > 0, (p, st.extra)


@pytest.mark.parametrize("fmt", [pytest.param("draft", marks=needs_llama), pytest.param("two_onnx", marks=needs_ort)])
def test_a_prompt_longer_than_the_window_drafts_plain_decodings_text(models, fmt):
    """QA s53: an ONNX prompt longer than the window was evaluated in other chunks by plain decoding (n_batch at
    a time) than by the drafting loop (the prompt less its last token, then that token), so the two evicted at
    other points and their greedy texts parted. Both now run the same loop."""
    greedy = SamplingConfig(temperature=0, max_tokens=60)
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    fa = {"flash_attn": True} if fmt == "draft" else {}  # as drafting verifies (run's default)
    with _open(models[fmt], kv_window=WINDOW, **fa) as b:
        assert len(b.tokenize(prompt)) > 4 * WINDOW
        plain = "".join(b.generate(prompt, greedy, GenerationStats()))
    with _open(models[fmt], kv_window=WINDOW, speculative="ngram", n_draft=4) as b:
        st = GenerationStats()
        assert "".join(b.generate(prompt, greedy, st)) == plain
    assert st.extra["speculative"]["drafted"] > 0 and st.extra["kv"]["evicted"] > 4 * WINDOW


@pytest.mark.parametrize("fmt", [pytest.param("target", marks=needs_llama), pytest.param("two_onnx", marks=needs_ort)])
def test_a_chat_turn_evaluates_only_the_new_message(models, fmt):
    """QA s53: an ONNX chat read the whole history again every turn (3.7 s to a first token against 0.1 s on
    GGUF for a long chat). The cache now keeps what the last request evaluated, as llama.cpp's does: the next
    turn evaluates the new message only, and answers as a fresh backend would."""
    greedy = SamplingConfig(temperature=0, max_tokens=12)
    chat = [{"role": "user", "content": "tell me about the quick brown fox"}]
    with _open(models[fmt]) as b:
        first = GenerationStats()
        answer = "".join(b.generate(chat, greedy, first))
        chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and the lazy dog?"}]
        second = GenerationStats()
        again = "".join(b.generate(chat, greedy, second))
    assert first.extra["prompt_cached"] == 0
    # the first prompt is held, and the reply as far as the template renders it as generated
    assert second.extra["prompt_cached"] >= first.prompt_tokens
    with _open(models[fmt]) as fresh:
        st = GenerationStats()
        assert "".join(fresh.generate(chat, greedy, st)) == again and st.extra["prompt_cached"] == 0


@needs_llama
def test_generation_runs_past_the_window(models):
    with _open(models["target"], kv_window=WINDOW) as b:
        st = GenerationStats()
        text = "".join(b.generate("hello", SamplingConfig(temperature=0, max_tokens=200), st))
    assert st.generated_tokens == 200 and text
    assert st.extra["kv"]["evicted"] > 0 and st.extra["kv"]["cells"] <= WINDOW


@needs_ort
def test_onnx_greedy_output_is_identical_with_ngram_and_with_a_draft(models):
    greedy = SamplingConfig(temperature=0, max_tokens=40)

    def outputs(**kw):
        texts, specs = [], []
        with _open(models["two_onnx"], **kw) as b:
            for p in PROMPTS:
                st = GenerationStats()
                texts.append("".join(b.generate(p, greedy, st)))
                assert st.generated_tokens == 40 and st.time_to_first_token > 0
                specs.append(st.extra.get("speculative"))
            info = b.info
        return texts, specs, info

    plain, none, _ = outputs()
    ngram, s_ngram, info = outputs(speculative="ngram")
    itself, s_self, _ = outputs(draft=str(models["two_onnx"]), n_draft=4)  # the target as its own draft
    other, s_other, _ = outputs(draft=str(models["one_onnx"]))  # a one-layer model with the same tokenizer
    assert ngram == plain and itself == plain and other == plain
    assert none == [None] * len(PROMPTS) and info["speculative"]["mode"] == "ngram"
    assert set(info["speculative"]["costs"]["verify_ms"]) == {"1", "2", "3", "5", "9"}
    assert sum(s["accepted"] for s in s_ngram) > 0 and all(s["mode"] == "ngram" for s in s_ngram)
    # a draft that is the target proposes what the target says: (nearly) every drafted token is kept
    assert sum(s["accepted"] for s in s_self) >= 0.9 * sum(s["drafted"] for s in s_self) > 0
    assert all(s["mode"] == "draft" for s in s_other)


@needs_ort
def test_onnx_sampled_drafting_is_reproducible(models):
    """Sampling goes through the acceptance rule with the seed's generator, draft lengths from the costs frozen
    at load: the same seed gives the same text, another seed another one."""
    with _open(models["two_onnx"], draft=str(models["one_onnx"])) as b:
        texts = ["".join(b.generate("once upon a time", SamplingConfig(temperature=0.8, seed=seed, max_tokens=24)))
                 for seed in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] and texts[2] != texts[0]


@needs_ort
def test_onnx_sessions_do_not_spin_beside_a_draft(models):
    """Two sessions on the same cores: each one's threads spinning between its runs would slow the other
    (measured 1.75x on a 4-token verification), so both spin within a run only; one session alone keeps
    spinning between runs (faster one-token steps)."""
    from edgekit.errors import InputError

    def entry(session, key, default):
        try:
            return session.get_session_options().get_session_config_entry(key)
        except Exception:  # noqa: BLE001 - onnxruntime raises its own error for an entry never set: the default
            return default

    def spins(session):
        return (entry(session, "session.intra_op.allow_spinning", "1") != "0",
                entry(session, "session.force_spinning_stop", "0") == "1")

    with _open(models["two_onnx"], draft=str(models["one_onnx"])) as b:
        assert spins(b.session) == spins(b.draft_backend.session) == (True, True)  # spin in a run, stop after it
    with _open(models["two_onnx"], speculative="ngram") as b:
        assert spins(b.session) == (True, False)
    with _open(models["two_onnx"], spin=False) as b:
        assert spins(b.session)[0] is False
    with pytest.raises(InputError, match="spin takes"):
        _open(models["two_onnx"], spin="sometimes")


@needs_ort
def test_onnx_rewind_equals_a_recomputation(models):
    """Rejected drafts are cut from the past key/values: what follows must see exactly the kept tokens."""
    from edgekit.runtime.onnx import OnnxContext

    rng = np.random.default_rng(2)
    a, b_, c = (list(map(int, rng.integers(3, 300, size=n))) for n in (20, 6, 5))
    with _open(models["two_onnx"]) as b:
        ctx = OnnxContext(b)
        ctx.extend(a + b_, logits="none")
        ctx.truncate(len(a))
        assert ctx.tokens == a and b._pos == len(a)
        got = ctx.extend(c, logits="all")
        want = b.logits(a + c)[len(a):]
    np.testing.assert_allclose(got, want, atol=1e-4)


@needs_ort
def test_onnx_drafting_runs_past_the_window(models):
    # a fixed draft length: where verification batches cross the window's edge (so what stays cached, and so
    # the text) then does not depend on the costs measured at load
    with _open(models["two_onnx"], kv_window=WINDOW, speculative="ngram", n_draft=4) as b:
        st = GenerationStats()
        text = "".join(b.generate("hello world, hello", SamplingConfig(temperature=0, max_tokens=200), st))
    assert text and st.extra["speculative"]["drafted"] > 0 and st.generated_tokens > 2 * WINDOW
    assert st.generated_tokens == 200 or st.stop_reason == "eos"
    assert st.extra["kv"]["evicted"] > 0 and st.extra["kv"]["cells"] <= WINDOW


@needs_ort
def test_onnx_refuses_drafts_it_cannot_use(models):
    from edgekit.errors import InputError

    with pytest.raises(InputError, match="vocabulary"):
        _open(models["two_onnx"], draft=str(models["other_onnx"]))
    if "draft" in models:  # a GGUF draft, as its folder or its file
        from edgekit.artifact import Artifact

        for d in (models["draft"], Artifact.open(models["draft"]).model_file):
            with pytest.raises(InputError, match="GGUF, not ONNX; a draft must be ONNX like the target"):
                _open(models["two_onnx"], draft=str(d))
    for kw, msg in (({"speculative": "lookup"}, "use 'ngram'"),
                    ({"speculative": "ngram", "n_draft": 40}, "between 1 and 32"),
                    ({"speculative": "ngram", "draft": str(models["one_onnx"])}, "exclude each other")):
        with pytest.raises(InputError, match=msg):
            _open(models["two_onnx"], **kw)



@needs_ort
def test_onnx_drafting_from_the_cli(models):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    r = CliRunner().invoke(app, ["run", str(models["two_onnx"]), "-p", "hello world, hello world", "-n", "12",
                                 "--temp", "0", "--speculative", "ngram"])
    assert r.exit_code == 0 and "12 generated" in r.output and "ngram: " in r.output, r.output
    r = CliRunner().invoke(app, ["run", str(models["two_onnx"]), "-p", "hi", "--draft", str(models["other_onnx"])])
    assert r.exit_code == 2 and "vocabulary" in r.output and "Traceback" not in r.output, r.output


def test_both_backends_declare_they_stream_long_text():
    from edgekit.runtime.base import BACKENDS, capabilities

    assert "streams-long-text" in capabilities(BACKENDS.get("onnxruntime"))
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "streams-long-text" in capabilities(BACKENDS.get("llamacpp"))


@needs_llama
def test_profile_times_generation_with_and_without_drafting(models, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from edgekit.cli.main import app
    from edgekit.runtime.profile import ProfileConfig, profile

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    # a fixed draft length: the adaptive one stops drafting when the costs it measures at load say drafting does
    # not pay, which on a busy machine (a tiny Q8_0 draft costs about as much as its tiny target) can be at once
    run = profile([models["target"]], ProfileConfig(reps=2, threads=(2,), drafters=(str(models["draft"]), "ngram"),
                                                    prompt="hello world, hello world, hello", gen_tokens=24,
                                                    backend_options=(("n_draft", 3),)))
    rows = {r.test: r for r in run.rows}
    assert set(rows) == {"pp512", "tg128", "gen24", "gen24+draft:d-q8", "gen24+ngram"}
    plain, draft, ngram = rows["gen24"], rows["gen24+draft:d-q8"], rows["gen24+ngram"]
    assert plain.speculative is None and plain.config["flash_attn"] and len(plain.samples_s) == 2
    assert plain.n_gen == 23 and all(s > 0 for s in plain.samples_s)
    # the Q8_0 copy of the target agrees with it: most drafted tokens are accepted, and the output is the same
    s = draft.speculative
    assert s["drafter"] == "draft:d-q8" and s["identical"] and s["drafted"] > 0 and s["acceptance"] > 0.5
    assert s["speedup"] == pytest.approx(draft.tps[0] / plain.tps[0])
    assert ngram.speculative["identical"] is True
    assert "accepted" in draft.label and draft.label.startswith("gen24+draft:d-q8 (")
    # the CLI: rows in JSON, and one-line errors for what cannot be drafted
    r = CliRunner().invoke(app, ["profile", str(models["target"]), "--tests", "tg8", "-r", "1", "--speculative",
                                 "ngram", "--gen", "8", "--json", "--no-history"])
    assert r.exit_code == 0, r.output
    tests = [row["test"] for row in json.loads(r.stdout)["rows"]]
    assert tests == ["tg8", "gen8", "gen8+ngram"]
    for args, msg in ((["--speculative", "lookup"], "takes 'ngram'"), (["--draft", str(tmp_path / "nope")],
                      "draft model not found"), (["--prompt", "hi"], "add --draft PATH")):
        r = CliRunner().invoke(app, ["profile", str(models["target"]), "--no-history", *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    if "one_onnx" in models:  # onnxruntime verifies drafts too: the same rows
        r = CliRunner().invoke(app, ["profile", str(models["one_onnx"]), "--tests", "tg8", "-r", "1", "--speculative",
                                     "ngram", "--gen", "8", "--json", "--no-history"])
        assert r.exit_code == 0, r.output
        rows = json.loads(r.stdout)["rows"]
        assert [row["test"] for row in rows] == ["tg8", "gen8", "gen8+ngram"]
        assert rows[2]["speculative"]["identical"] is True and "flash_attn" not in rows[1]["config"]


def _predicted(path, **kw) -> None:
    """With its own plain answer as the predicted output a model answers the same in fewer target steps;
    with an unrelated prediction it answers the same too."""
    import dataclasses

    greedy = SamplingConfig(temperature=0, max_tokens=40)
    accepted = cycles = tokens = 0
    with _open(path, **kw) as b:
        for p in PROMPTS[:3]:
            plain = "".join(b.generate(p, greedy, GenerationStats()))
            for pred in (plain, "zebra quantum marmalade"):
                st = GenerationStats()
                assert "".join(b.generate(p, dataclasses.replace(greedy, prediction=pred), st)) == plain
                spec = st.extra["speculative"]
                assert spec["mode"] == "prediction"
                if pred == plain:  # over all prompts: a random model's tokens need not re-tokenize the same
                    accepted, cycles, tokens = accepted + spec["accepted"], cycles + spec["cycles"], tokens + st.generated_tokens
    assert accepted > 0 and cycles < tokens, (accepted, cycles, tokens)


@needs_llama
def test_llamacpp_predicted_output_gives_the_same_answer_sooner(models):
    _predicted(models["target"], flash_attn=True)


@needs_ort
def test_onnx_predicted_output_gives_the_same_answer_sooner(models):
    _predicted(models["two_onnx"])


@needs_llama
def test_run_takes_a_prediction_file(models, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    base = ["run", str(models["target"]), "-p", "numbers: one two three", "-n", "16", "--temp", "0"]
    plain = CliRunner().invoke(app, base + ["--no-stats"])
    assert plain.exit_code == 0, plain.output
    (tmp_path / "expected.txt").write_text(plain.stdout.strip(), encoding="utf-8")  # stderr may hold a warning
    r = CliRunner().invoke(app, base + ["--prediction", str(tmp_path / "expected.txt")])
    assert r.exit_code == 0 and r.stdout == plain.stdout and "prediction: " in r.stderr, r.output
    for bad, needle in ((tmp_path / "nope.txt", "does not exist"), (tmp_path, "does not exist")):
        r = CliRunner().invoke(app, base + ["--prediction", str(bad)])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    r = CliRunner().invoke(app, base + ["--prediction", str(tmp_path / "latin1.txt")])
    assert r.exit_code == 2 and "not UTF-8" in r.output, r.output
