"""Speculative decoding's token loop, acceptance rule, drafters and draft-length control (no runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.runtime.base import SamplingConfig
from edgekit.runtime.draft_length import AdaptiveDraft, DraftCosts, measure_costs
from edgekit.runtime.speculative import (
    ModelDrafter,
    NgramDrafter,
    SpecStats,
    common_prefix,
    decoding_note,
    for_prediction,
    generate_tokens,
)


class TableContext:
    """A fake KV context whose logits depend only on the position: row ``table[pos]``."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.logical: list[int] = []
        self.evals = 0

    @property
    def tokens(self) -> list[int]:
        return self.logical

    def extend(self, tokens, logits="all"):
        start = len(self.logical)
        self.logical += list(tokens)
        self.evals += 1
        rows = self.table[start : start + len(tokens)]
        return rows if logits == "all" else rows[-1] if logits == "last" else None

    def truncate(self, n):
        self.logical = self.logical[:n]

    def room(self):
        return None

    def sync(self, tokens, logits=False):
        p = common_prefix(self.logical, tokens)
        if logits and p == len(tokens):
            p -= 1
        self.truncate(p)
        return self.extend(tokens[p:], "last" if logits else "none") if tokens[p:] else None


class ContextLogits(TableContext):
    """Logits that depend on the previous token too (a first-order model), so drafts matter."""

    def __init__(self, trans: np.ndarray) -> None:
        super().__init__(trans)

    def extend(self, tokens, logits="all"):
        rows = np.array([self.table[t] for t in tokens])  # row i predicts the token after tokens[i]
        self.logical += list(tokens)
        return rows if logits == "all" else rows[-1] if logits == "last" else None


def _never(_: int) -> bool:
    return False


def _replay(full: list[int], vocab: int) -> TableContext:
    """A target whose greedy choice after ``full[:i]`` is ``full[i]`` (then token 0)."""

    class Replay(TableContext):
        def extend(self, tokens, logits="all"):
            rows = []
            for t in tokens:
                self.logical.append(t)
                row = np.full(vocab, -10.0)
                row[full[len(self.logical)] if len(self.logical) < len(full) else 0] = 10.0
                rows.append(row)
            rows = np.stack(rows)
            return rows if logits == "all" else rows[-1] if logits == "last" else None

    return Replay(np.zeros((1, vocab)))



def test_greedy_is_identical_to_plain_decoding():
    rng = np.random.default_rng(0)
    vocab = 12
    target = rng.normal(size=(vocab, vocab)) * 3
    draft = target + rng.normal(size=(vocab, vocab)) * 2  # a draft that is often right, sometimes wrong
    greedy = SamplingConfig(temperature=0, max_tokens=40)
    plain = list(generate_tokens(ContextLogits(target), [1, 2, 3], greedy, rng, 40, _never))
    stats = SpecStats()
    spec = list(generate_tokens(ContextLogits(target), [1, 2, 3], greedy, rng, 40, _never,
                                drafter=ModelDrafter(ContextLogits(draft), p_min=0.0),
                                control=AdaptiveDraft(fixed=4), stats=stats))
    assert spec == plain
    assert 0 < stats.accepted < stats.drafted  # both outcomes of the rule were exercised
    assert stats.cycles < len(plain)  # fewer target steps than tokens: speculation happened


def test_acceptance_rule_preserves_the_target_distribution():
    """Tokens 1-3 after a fixed prompt, sampled with a bad draft, follow the target's distribution."""
    vocab = 5
    rng = np.random.default_rng(1)
    target = rng.normal(size=(vocab, vocab)) * 1.5
    draft = rng.normal(size=(vocab, vocab)) * 1.5  # unrelated: many rejections and residual draws
    s = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=3)
    runs = 6000
    counts = np.zeros((3, vocab))
    pair = np.zeros((vocab, vocab))
    for i in range(runs):
        out = list(generate_tokens(ContextLogits(target), [0], s, np.random.default_rng(i), 3, _never,
                                   drafter=ModelDrafter(ContextLogits(draft), p_min=0.0),
                                   control=AdaptiveDraft(fixed=2)))
        for j, t in enumerate(out):
            counts[j, t] += 1
        pair[out[0], out[1]] += 1

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    p1 = softmax(target[0])
    expected_pair = p1[:, None] * np.array([softmax(target[a]) for a in range(vocab)])
    # chi-square statistics against the exact target distributions (df = 4 and 24)
    chi1 = ((counts[0] - runs * p1) ** 2 / (runs * p1)).sum()
    chi2 = ((pair - runs * expected_pair) ** 2 / (runs * expected_pair)).sum()
    assert chi1 < 18.5  # p ~ 0.001 at df=4
    assert chi2 < 51.2  # p ~ 0.001 at df=24
    # the draft distribution itself is far from the target: the test can tell them apart
    q1 = softmax(draft[0])
    assert ((runs * q1 - runs * p1) ** 2 / (runs * p1)).sum() > 100


def test_a_wrong_rule_would_fail_the_statistical_test():
    """Accepting every draft token (no rule) gives the draft's distribution; the chi-square sees it."""
    vocab = 5
    rng = np.random.default_rng(1)
    target = rng.normal(size=(vocab, vocab)) * 1.5
    draft = rng.normal(size=(vocab, vocab)) * 1.5
    e = np.exp(draft[0] - draft[0].max())
    q = e / e.sum()
    e = np.exp(target[0] - target[0].max())
    p = e / e.sum()
    draws = np.bincount(rng.choice(vocab, size=6000, p=q), minlength=vocab)
    assert ((draws - 6000 * p) ** 2 / (6000 * p)).sum() > 18.5


def test_ngram_drafter_proposes_what_followed_the_last_match():
    d = NgramDrafter(max_n=3)
    greedy = SamplingConfig(temperature=0)
    rng = np.random.default_rng(0)
    toks, qs = d.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3, greedy, rng, [])
    assert toks == [8, 9, 1] and all(q[1][0] == 1.0 for q in qs)
    assert d.propose([1, 2, 3], 4, greedy, rng, []) == ([], [])
    # the latest occurrence wins
    assert d.propose([4, 1, 4, 2, 4], 1, greedy, rng, [])[0] == [2]
    # match names how long a suffix matched: the longest one wins over a later, shorter one
    assert d.match([5, 6, 7, 8, 9, 7, 2, 5, 6, 7], 2) == (3, [8, 9])
    assert d.match([3, 7, 1, 7], 5) == (1, [1, 7]) and d.match([1, 2, 3], 4) == (0, [])


def test_a_prediction_is_looked_up_first_and_in_order():
    d = NgramDrafter(max_n=3, reference=[1, 2, 3, 9, 1, 2, 3, 8, 7])
    assert d.name == "prediction" and NgramDrafter().name == "ngram"
    # a match in the reference wins at equal length over one in the text so far, and has a class of its own
    assert d.match([5, 1, 2, 3, 4, 5, 1, 2, 3], 2) == (3 + 3, [9, 1])
    # the same n-gram again further on: the occurrence ahead of the last match, not the first one
    assert d.match([5, 1, 2, 3, 9, 1, 2, 3], 2) == (3 + 3, [8, 7])
    # a longer match in the text so far beats a shorter one in the reference
    assert NgramDrafter(max_n=3, reference=[7, 4]).match([6, 5, 7, 6, 5, 7], 2) == (3, [6, 5])
    # nothing in the reference: plain prompt lookup
    assert d.match([4, 6, 4], 1) == (1, [6])


def test_a_prediction_drafts_from_the_start_and_backs_off_where_the_answer_departs():
    """The target writes the prediction with one passage of its own in the middle: drafting from the
    prediction needs few target steps where they agree, and the answer is the target's, token for token."""
    rng = np.random.default_rng(5)
    predicted = [int(t) for t in rng.integers(10, 200, size=80)]
    answer = predicted[:30] + [int(t) for t in rng.integers(10, 200, size=10)] + predicted[40:80]
    prompt = [1, 2, 3]
    full = prompt + answer
    vocab = 256

    costs = DraftCosts(step=0.010, extra=0.002, draft=0.004)
    drafter, control = for_prediction(predicted, costs, None)
    assert control.costs.draft == 0.0  # lookup costs nothing, whatever the loaded draft model costs
    stats = SpecStats()
    out = list(generate_tokens(_replay(full, vocab), prompt, SamplingConfig(temperature=0, max_tokens=80),
                               np.random.default_rng(0), len(answer), _never, drafter=drafter, control=control,
                               stats=stats))
    assert out == answer and stats.mode == "prediction"
    assert stats.cycles <= 30 and stats.accepted >= 55  # 80 tokens; plain decoding takes 80 steps


def test_acceptance_is_kept_per_match_length():
    """Prompt lookup's one-token matches are often wrong and its long matches often right: a class of its
    own for each length drafts long after long matches and not at all after short ones."""
    c = AdaptiveDraft(k_max=8, costs=DraftCosts(step=0.016, extra=0.004, draft=0.0))
    for _ in range(30):
        c.update(4, 4, 0.0, 0.0, cls=4)  # long matches: every token right
        c.update(2, 0, 0.0, 0.0, cls=1)  # one-token matches: wrong at once
    assert c.choose(4) == 8 and c.choose(1) == 0
    assert 0.4 < c.alpha < 0.8  # one pooled rate would draft the same length after both
    fresh = c.choose(3)  # a length not seen yet starts from the pooled counts
    assert 0 < fresh < 8


def test_per_length_classes_speed_up_prompt_lookup_on_a_copying_target():
    """A target that copies a passage but answers in its own words between copies: the per-length
    classes draft less after one-token matches, so fewer tokens are verified for the same output."""
    rng = np.random.default_rng(3)
    passage = [int(t) for t in rng.integers(10, 200, size=60)]
    answer = passage[:20] + [int(t) for t in rng.integers(10, 200, size=15)] + passage[30:55]
    prompt = [1, *passage, 2]
    vocab = 256
    full = prompt + answer

    def run(classes):
        stats = SpecStats()
        control = AdaptiveDraft(costs=DraftCosts(step=0.016, extra=0.004, draft=0.0))
        if not classes:  # one pooled rate: every match is the same class
            control.update = lambda d, a, t1, t2, cls=None, u=control.update: u(d, a, t1, t2, None)
            control.choose = lambda cls=None, ch=control.choose: ch(None)
        out = list(generate_tokens(_replay(full, vocab), prompt, SamplingConfig(temperature=0, max_tokens=60),
                                   np.random.default_rng(0), len(answer), _never, drafter=NgramDrafter(),
                                   control=control, stats=stats))
        assert out == answer
        return sum(0.016 + 0.004 * k for k in stats.k_history)

    assert run(classes=True) < run(classes=False)


def test_ngram_drafting_on_a_repetitive_target_takes_fewer_steps():
    vocab = 8
    cycle = np.full((vocab, vocab), -10.0)
    for a in range(vocab):
        cycle[a, (a + 1) % vocab] = 10.0  # the target counts 0,1,2,...
    greedy = SamplingConfig(temperature=0, max_tokens=30)
    ctx = ContextLogits(cycle)
    stats = SpecStats()
    out = list(generate_tokens(ctx, [0, 1, 2, 3, 4, 5, 6, 7, 0], greedy, np.random.default_rng(0), 30, _never,
                               drafter=NgramDrafter(), stats=stats))
    assert out == [(1 + i) % vocab for i in range(30)]
    assert stats.acceptance == 1.0 and stats.cycles <= 8


def test_adaptive_draft_backs_off_when_drafting_does_not_pay_and_probes_again():
    c = AdaptiveDraft(k_max=8, probe_every=4)
    c.update(0, 0, 0.010, 0.0)  # a plain step: 10 ms
    for _ in range(20):
        c.update(2, 0, 0.010, 0.006)  # expensive drafts, all rejected
    ks = [c.choose() for _ in range(8)]
    assert ks.count(0) >= 6 and 1 in ks
    later = [c.choose() for _ in range(400)]  # probes at doubling intervals, then none
    assert 1 <= later.count(1) <= 4 and later[-200:].count(1) == 0
    good = AdaptiveDraft(k_max=8)
    good.update(0, 0, 0.010, 0.0)
    for _ in range(20):
        good.update(4, 4, 0.010, 0.002 * 4)  # cheap drafts, all accepted
    assert good.choose() >= 4


def test_end_of_generation_inside_accepted_drafts_stops_there():
    vocab = 6
    t = np.full((vocab, vocab), -5.0)
    for a in range(vocab):
        t[a, min(a + 1, 5)] = 5.0
    greedy = SamplingConfig(temperature=0, max_tokens=20)
    out = list(generate_tokens(ContextLogits(t), [0, 1, 2, 3, 4, 5, 0, 1], greedy, np.random.default_rng(0), 20,
                               lambda tok: tok == 4, drafter=NgramDrafter()))
    assert out == [2, 3, 4]


def test_drafts_past_the_end_of_the_text_are_not_counted():
    """QA s53: tokens drafted after an EOS, or after the token where a stop string ended the text, were counted
    as drafted and accepted (and verified for nothing): acceptance read higher than the text's."""
    vocab = 6
    t = np.full((vocab, vocab), -5.0)
    for a in range(vocab):
        t[a, min(a + 1, 5)] = 5.0
    greedy = SamplingConfig(temperature=0, max_tokens=20)
    ctx = ContextLogits(t)
    stats = SpecStats()
    out = list(generate_tokens(ctx, [0, 1, 2, 3, 4, 5, 0, 1], greedy, np.random.default_rng(0), 20,
                               lambda tok: tok == 3, drafter=NgramDrafter(), control=AdaptiveDraft(fixed=4),
                               stats=stats))
    assert out == [2, 3]
    # drafted [2, 3, (4, 5)]: the two after the EOS are neither verified nor counted
    assert stats.drafted == stats.accepted == 2 and len(ctx.tokens) == 7 + 3
    # a stop string after the first token: the consumer closes the loop there
    stats = SpecStats()
    gen = generate_tokens(ContextLogits(t), [0, 1, 2, 3, 4, 5, 0, 1], greedy, np.random.default_rng(0), 20,
                          _never, drafter=NgramDrafter(), control=AdaptiveDraft(fixed=4), stats=stats)
    assert next(gen) == 2
    gen.close()
    assert stats.drafted == stats.accepted == 1


def test_decoding_note():
    assert decoding_note({}) == ""
    note = decoding_note({"speculative": {"mode": "draft", "acceptance": 0.5, "drafted": 10},
                          "kv": {"window": 64, "sinks": 4, "cells": 60, "evicted": 100}})
    assert "50% of 10" in note and "KV window 64" in note


@pytest.mark.parametrize("bad", [{"speculative": "medusa"}, {"n_draft": 0}, {"kv_window": 8},
                                 {"kv_window": 128, "kv_sinks": 64}, {"speculative": "draft"}])
def test_bad_decoding_options_are_one_line_errors(bad):
    from edgekit.errors import InputError
    from edgekit.runtime.llamacpp_decoding import decoding_options

    args = {"draft": None, "speculative": None, "n_draft": None, "kv_window": None, "kv_sinks": 4, **bad}
    with pytest.raises(InputError):
        decoding_options(**args)


def test_a_draft_that_could_never_pay_is_not_even_probed():
    dear = AdaptiveDraft(k_max=8, prior=0.99, costs=DraftCosts(step=0.010, extra=0.003, draft=0.009))
    assert not dear.can_pay() and [dear.choose() for _ in range(300)] == [0] * 300
    cheap = AdaptiveDraft(k_max=8, prior=0.9, costs=DraftCosts(step=0.010, extra=0.001, draft=0.001))
    assert cheap.can_pay() and cheap.choose() >= 4


def test_verification_cost_follows_the_measured_widths():
    """A CPU step over n tokens is not linear in n (the second token costs most): verify() interpolates the
    measured widths, keeps them rising through timing noise, extends past the widest by its last slope, and
    without widths is the linear model."""
    c = DraftCosts(step=0.017, extra=0.0038, draft=0.0,
                   widths=((1, 0.017), (2, 0.0235), (3, 0.0255), (5, 0.032), (9, 0.040)))
    assert c.verify(1) == pytest.approx(0.017) and c.verify(2) == pytest.approx(0.0235)
    assert c.verify(4) == pytest.approx((0.0255 + 0.032) / 2)
    assert c.verify(13) == pytest.approx(0.040 + 4 * (0.040 - 0.032) / 4)
    noisy = DraftCosts(step=0.017, extra=0.004, draft=0.0, widths=((1, 0.017), (2, 0.024), (3, 0.022), (5, 0.03)))
    assert noisy.verify(3) == pytest.approx(0.024)  # a wider step is never cheaper than a narrower one
    assert DraftCosts(step=0.017, extra=0.004, draft=0.001).cycle(3) == pytest.approx(0.017 + 3 * 0.004 + 3 * 0.001)
    assert DraftCosts.from_json(c.to_json()) == c


def test_draft_length_comes_from_the_measured_curve():
    """At the same one-token step and the same mean cost per extra token up to five, a curve whose later
    tokens are cheap makes long drafts pay where the linear model would stop short."""
    linear = DraftCosts(step=0.017, extra=0.004, draft=0.0)
    curve = DraftCosts(step=0.017, extra=0.004, draft=0.0,
                       widths=((1, 0.017), (2, 0.025), (3, 0.028), (5, 0.033), (9, 0.037)))
    counts = []
    for costs in (linear, curve):
        c = AdaptiveDraft(k_max=8, prior=0.5, costs=costs)
        for _ in range(20):
            c.update(4, 2, 0.0, 0.0)  # half the drafts right
        counts.append(c.choose())
    assert counts[1] > counts[0] >= 1


def test_measure_costs_times_each_width():
    """A target whose step takes 2 ms plus 1 ms per token: the measured widths follow it and give the
    one-token step and the per-token extra; a probe shorter than a width leaves that width out."""
    import time

    class Timed(TableContext):
        def extend(self, tokens, logits="all"):
            time.sleep(0.002 + 0.001 * len(tokens))
            return super().extend(tokens, logits)

    table = np.zeros((64, 4))
    c = measure_costs(Timed(table), Timed(table), list(range(20)))
    assert [n for n, _ in c.widths] == [1, 2, 3, 5, 9]
    for n, t in c.widths:
        assert 0.002 + 0.001 * n <= t < 0.002 + 0.001 * n + 0.010
    assert c.extra == pytest.approx(0.001, abs=0.0008) and c.draft >= 0.003
    short = measure_costs(Timed(table), None, list(range(4)))
    assert [n for n, _ in short.widths] == [1, 2, 3] and short.draft == 0.0
    assert short.extra == pytest.approx(0.001, abs=0.0008)  # the last slope, extended past the probe


def test_a_model_draft_that_could_only_pay_near_always_right_is_never_probed():
    """At an F16 GGUF target's measured costs (two verified tokens cost two steps) a Q4_0 draft breaks even
    only at 93% acceptance: its control never drafts, not even a probe (each probe first evaluates what the
    draft missed). A draft at half the cost of the step beside cheap verification (onnxruntime) breaks even
    near 40% and drafts from the prior."""
    from edgekit.runtime.speculative import MODEL_BREAK_EVEN_MAX, ModelDrafter, control_for

    gguf = DraftCosts(step=0.011, extra=0.003, draft=0.0062,
                      widths=((1, 0.011), (2, 0.0181), (3, 0.020), (5, 0.023), (9, 0.0336)))
    onnx = DraftCosts(step=0.020, extra=0.0005, draft=0.0075,
                      widths=((1, 0.020), (2, 0.0205), (3, 0.021), (5, 0.023), (9, 0.028)))
    assert 0.9 < AdaptiveDraft(costs=gguf).break_even() < 0.95
    assert 0.3 < AdaptiveDraft(costs=onnx).break_even() < 0.5
    drafter = ModelDrafter(ctx=None)  # type: ignore[arg-type]
    ctl = control_for(drafter, gguf, None)
    assert ctl.max_break_even == MODEL_BREAK_EVEN_MAX and ctl.hopeless()
    assert [ctl.choose() for _ in range(200)] == [0] * 200
    assert not AdaptiveDraft(costs=gguf).hopeless()  # lookups (no catch-up to pay) still probe
    assert control_for(drafter, onnx, None).choose() > 0
    # and the run's stats line says why nothing was drafted (QA s49: "draft: nothing drafted", no reason)
    why = ctl.why_not()
    assert why.startswith("it would have to be accepted on 9") and "a step 11.0 ms" in why and "not probed above 90%" in why
    assert control_for(drafter, onnx, None).why_not() == "" and control_for(drafter, gguf, 3).why_not() == ""
    never = AdaptiveDraft(costs=DraftCosts(step=0.010, extra=0.003, draft=0.009)).why_not()
    assert never.startswith("even an always-right draft would be slower")
    note = decoding_note({"speculative": {"mode": "draft", "acceptance": None, "drafted": 0, "why_not": why}})
    assert f"nothing drafted: {why}; --n-draft N drafts anyway" in note
