"""Speculative decoding: drafters, the acceptance rule, adaptive draft length, and the token loop.

A cheap drafter proposes ``k`` tokens; the target evaluates ``[last, d1..dk]`` in one batch and keeps
the longest prefix its own sampler agrees with, plus one token of its own (the correction or a bonus).
The acceptance rule (Leviathan et al. / Chen et al.) makes the output follow the target's sampling
distribution exactly: draft token ``d`` drawn from ``q`` is kept with probability ``min(1, p(d)/q(d))``;
on a rejection the next token is drawn from ``max(0, p - q)`` renormalised. Greedy decoding is the
special case where both are one-hot: tokens are kept while they equal the target's argmax.

Backend-agnostic: the target and a draft model are :class:`Context` objects (a KV cache that can be
extended, truncated and synchronised to a token list). Draft length adapts to the measured acceptance
rate and to the measured cost of a draft token and of a wider verification batch; when drafting does
not pay it stops, and probes again now and then (:mod:`edgekit.runtime.draft_length`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgekit.runtime.base import SamplingConfig
from edgekit.runtime.draft_length import AdaptiveDraft, DraftCosts
from edgekit.runtime.sampling import distribution


class Context(Protocol):
    """A KV cache over one token sequence."""

    @property
    def tokens(self) -> list[int]:
        """The tokens the cache was filled with, in order (tokens a window evicted included)."""
        ...

    def extend(self, tokens: list[int], logits: str = "all") -> np.ndarray | None:
        """Evaluate ``tokens`` after the cache; logits ``"all"`` (len, n_vocab), ``"last"`` (n_vocab,) or
        ``"none"``."""
        ...

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens."""
        ...

    def sync(self, tokens: list[int], logits: bool = False) -> np.ndarray | None:
        """Make the cache hold ``tokens`` (reusing the common prefix); the last token's logits if asked."""
        ...

    def room(self) -> int | None:
        """Tokens one batch may hold with a KV window (None: no window) so that it evicts only what one-token
        steps would: those left before the window is full, or when it is full the step its next token evicts."""
        ...


def drafting_mode(draft: object | None, speculative: str | None, n_draft: int | None) -> str | None:
    """``"draft"``, ``"ngram"`` or None (plain decoding) from a backend's decoding options, checked the same
    way for every backend: a bad combination is a one-line error before anything loads."""
    from edgekit.errors import InputError

    mode = speculative or ("draft" if draft is not None else None)
    if mode not in (None, "draft", "ngram"):
        raise InputError(f"--speculative {speculative!r}: use 'ngram' (prompt lookup) or give --draft MODEL")
    if mode == "ngram" and draft is not None:
        raise InputError("--draft and --speculative ngram exclude each other: give one")
    if n_draft is not None and not 1 <= int(n_draft) <= 32:  # without a drafter it has nothing to fix
        raise InputError("--n-draft must be between 1 and 32")
    return mode


def sync_context(ctx: Any, tokens: list[int], logits: bool, evicted_end: int) -> np.ndarray | None:
    """:meth:`Context.sync` for a cache that keeps the logical token list ``ctx.tokens`` and can ``clear``,
    ``truncate`` and ``extend``: reuse the common prefix, evaluate the rest. ``evicted_end``: the logical
    index below which a KV window has evicted tokens (0: none); a request that diverges there starts over.
    Sets ``ctx.reused``: the tokens of the prefix kept."""
    p = common_prefix(ctx.tokens, tokens)
    if logits and p == len(tokens) and p > 0:
        p -= 1  # the last token must be evaluated to have its logits
    if evicted_end and p < len(ctx.tokens) and p < evicted_end:
        ctx.clear()  # the request diverges inside the evicted part: start again
        p = 0
    ctx.truncate(p)
    ctx.reused = p  # what the request did not evaluate again (SpecStats.prompt_cached)
    rest = tokens[p:]
    if not rest:
        return None
    return ctx.extend(rest, "last" if logits else "none")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


@dataclass
class SpecStats:
    """What speculation did in one generation."""

    mode: str = "none"
    drafted: int = 0
    accepted: int = 0
    cycles: int = 0
    draft_cycles: int = 0
    target_seconds: float = 0.0
    draft_seconds: float = 0.0
    k_history: list[int] = field(default_factory=list)
    why_not: str = ""  # why nothing was drafted, when the measured costs ruled drafting out
    prompt_cached: int = 0  # prompt tokens the cache held from the request before (not evaluated again)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def to_json(self) -> dict[str, Any]:
        ks = [k for k in self.k_history if k]
        return {"mode": self.mode, "drafted": self.drafted, "accepted": self.accepted, "cycles": self.cycles,
                "acceptance": self.acceptance, "mean_draft_len": float(np.mean(ks)) if ks else 0.0,
                "target_seconds": round(self.target_seconds, 4), "draft_seconds": round(self.draft_seconds, 4),
                **({"why_not": self.why_not} if self.why_not else {})}


def _draw(idx: np.ndarray, p: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    return int(idx[0]) if sampling.temperature == 0 or idx.size == 1 else int(rng.choice(idx, p=p))


def accept(rows: np.ndarray, drafts: list[int], qs: list[tuple[np.ndarray, np.ndarray]], sampling: SamplingConfig,
           rng: np.random.Generator, previous: list[int]) -> tuple[int, int]:
    """(drafts kept, the target's own next token) for target logits ``rows`` (``len(drafts) + 1`` rows:
    row ``i`` predicts the token after ``drafts[:i]``). ``qs[i]`` is the draft's distribution for
    ``drafts[i]`` (ids, probabilities; one-hot for a deterministic drafter). ``previous``: the tokens
    generated before (for the repeat penalty)."""
    for i, d in enumerate(drafts):
        idx, p = distribution(rows[i], sampling, previous + drafts[:i])
        if sampling.temperature == 0:
            if int(idx[0]) == d:
                continue
            return i, int(idx[0])
        q_idx, q_p = qs[i]
        pd = float(p[idx == d].sum())
        qd = float(q_p[q_idx == d].sum())
        if qd > 0 and rng.random() < min(1.0, pd / qd):
            continue
        # rejected: draw from the residual max(0, p - q) over the union of both supports
        ids = np.union1d(idx, q_idx)
        r = np.zeros(ids.size)
        r[np.searchsorted(ids, idx)] += p
        r[np.searchsorted(ids, q_idx)] -= q_p
        r = np.maximum(r, 0.0)
        total = r.sum()
        if total <= 0:  # p == q on the support: any draw from p is exact
            return i, _draw(idx, p, sampling, rng)
        return i, int(rng.choice(ids, p=r / total))
    idx, p = distribution(rows[len(drafts)], sampling, previous + drafts)
    return len(drafts), _draw(idx, p, sampling, rng)


class Drafter(Protocol):
    name: str
    #: seconds per proposed token is measured by the loop; ``cheap`` drafters (no model) cost ~0
    cheap: bool

    def propose(self, committed: list[int], k: int, sampling: SamplingConfig, rng: np.random.Generator,
                previous: list[int]) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        """Up to ``k`` tokens to follow ``committed`` and the distribution each was drawn from."""
        ...


def _one_hot(tok: int) -> tuple[np.ndarray, np.ndarray]:
    return np.array([tok]), np.ones(1)


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the text's last n tokens (n from ``max_n``
    down to ``min_n``) and propose what followed it. Free to run; strong when the output copies the input
    (rewrites, extraction, code edits). How often a proposal is right depends on how long a suffix it
    matched (one token matches anywhere; four rarely by chance), so :meth:`match` names the match length
    and the loop keeps an acceptance rate, and so a draft length, per length (``AdaptiveDraft`` classes)."""

    cheap = True

    def __init__(self, max_n: int = 4, min_n: int = 1, reference: list[int] | None = None) -> None:
        self.max_n, self.min_n = max_n, min_n
        # ``reference``: a predicted output (OpenAI's Predicted Outputs): looked up first, from where the
        # last match in it left off, since an answer that follows a prediction walks through it in order
        self.reference = np.asarray(reference or [], dtype=np.int64)
        self.name = "prediction" if self.reference.size else "ngram"
        self._cursor = 0

    def match(self, committed: list[int], k: int) -> tuple[int, list[int]]:
        """(the length of the longest suffix of ``committed`` seen earlier in it, up to ``k`` tokens that
        followed its latest earlier occurrence); (0, []) when nothing matches. A match in the reference
        wins at equal length and is told apart by its class (``max_n`` + its length)."""
        arr = np.asarray(committed)
        ref = self.reference
        for n in range(self.max_n, self.min_n - 1, -1):
            if arr.size < n:
                continue
            if ref.size > n:
                hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ref[:-1], n) == arr[-n:]).all(axis=1))
                if hits.size:
                    ahead = hits[hits + n > self._cursor]
                    start = int(ahead[0] if ahead.size else hits[-1]) + n
                    self._cursor = start
                    return self.max_n + n, [int(t) for t in ref[start : start + k]]
            if arr.size <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                cont = [int(t) for t in arr[start : start + k]]
                if cont:
                    return n, cont
        return 0, []

    def propose(self, committed: list[int], k: int, sampling: SamplingConfig, rng: np.random.Generator,
                previous: list[int]) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        _, cont = self.match(committed, k)
        return cont, [_one_hot(t) for t in cont]


#: The acceptance a lookup drafter starts from. A copied passage is accepted in long runs, and a draft
#: length from the geometric model at a prior of 0.6 is 0 on llama.cpp's CPU costs (two tokens cost about
#: two steps), so copies went undrafted until probes found them: on bench/speculative.py's rewrite /
#: extract prompts 0.9 gave 1.11x and 1.08x (F16, Q8_0) against 1.01x and 0.97x, chat 1.00x / 1.07x.
LOOKUP_PRIOR = 0.9


#: A model draft is not even probed when, at its measured costs, it would have to be accepted on more than
#: this share of its tokens just to break even: each probe first evaluates every token the draft missed (the
#: prompt, at the first). An F16 GGUF target with its Q4_0 copy (break-even 93%: verifying two tokens costs
#: two steps there) ran rewrite/extract prompts at 0.65-0.83x plain decoding with one or two tokens drafted
#: in a generation and 0.19-0.24 s spent in the draft. Drafts that pay break even far lower (SmolLM2's 8- and
#: 4-bit ONNX copies beside its FP16 graph: 38-44%; llama.cpp drafts in bench/results/speculative.txt 35-73%).
MODEL_BREAK_EVEN_MAX = 0.9


def control_for(drafter: Drafter | None, costs: DraftCosts | None, fixed: int | None) -> AdaptiveDraft:
    """The draft-length control of one generation: lookups start from :data:`LOOKUP_PRIOR`, model drafts
    from the default, and back off as they measure."""
    if isinstance(drafter, NgramDrafter):
        return AdaptiveDraft(fixed=fixed, costs=costs, prior=LOOKUP_PRIOR)
    return AdaptiveDraft(fixed=fixed, costs=costs, max_break_even=MODEL_BREAK_EVEN_MAX)


def for_prediction(predicted: list[int], costs: DraftCosts, fixed: int | None) -> tuple[NgramDrafter, AdaptiveDraft]:
    """The drafter and draft-length control of one request with a predicted output: lookup in the
    prediction (and the text so far), free to run, whatever drafter the model loaded with; drafting from
    the start, backing off after the first misses where the answer departs."""
    drafter = NgramDrafter(reference=predicted)
    return drafter, control_for(drafter, dataclasses.replace(costs, draft=0.0), fixed)


def _top_probability(logits: np.ndarray) -> float:
    """The softmax's largest probability (in the logits' own float32: 40 us on a 49k vocabulary, against
    0.4 ms through float64, once per draft step)."""
    z = np.asarray(logits, dtype=np.float32)
    return float(1.0 / np.exp(z - z.max()).sum(dtype=np.float64))


#: A model draft stops early when its top probability falls under this. A draft close to its target (the
#: 8-bit ONNX copy) agrees with it even where both are unsure: on bench/speculative.py's chat prompts 0.3
#: stopped its drafts at 3.6 tokens on average against 4.9 at 0.1, 79.5-83.7 tok/s against 89.6-90.5 (FP16
#: target); rewrite/extract prompts and the 4-bit copy (67-77% accepted) measured the same at both.
P_MIN = 0.1


class ModelDrafter:
    """A small model sharing the target's vocabulary proposes tokens one at a time with the target's
    sampling settings; drafting stops early when its top probability falls under ``p_min``."""

    name = "draft"
    cheap = False

    def __init__(self, ctx: Context, p_min: float = P_MIN) -> None:
        self.ctx, self.p_min = ctx, p_min

    def propose(self, committed: list[int], k: int, sampling: SamplingConfig, rng: np.random.Generator,
                previous: list[int]) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        logits = self.ctx.sync(committed, logits=True)
        drafts: list[int] = []
        qs: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(k):
            assert logits is not None
            if drafts and _top_probability(logits) < self.p_min:
                break
            idx, q = distribution(logits, sampling, previous + drafts)
            d = _draw(idx, q, sampling, rng)
            drafts.append(d)
            qs.append((idx, q))
            if i < k - 1:
                logits = self.ctx.extend([d], logits="last")
        return drafts, qs


def generate_tokens(target: Context, prompt: list[int], sampling: SamplingConfig, rng: np.random.Generator,
                    max_new: int, is_eos: Callable[[int], bool], drafter: Drafter | None = None,
                    control: AdaptiveDraft | None = None, cancelled: Callable[[], bool] = lambda: False,
                    stats: SpecStats | None = None) -> Iterator[int]:
    """Token ids generated after ``prompt`` (the end-of-generation token is yielded last when it comes).
    With a ``drafter``, speculatively; without, one target step per token through the same sampler."""
    if not prompt:
        raise ValueError("the prompt is empty")
    stats = stats if stats is not None else SpecStats()
    stats.mode = drafter.name if drafter is not None else "none"
    control = control or AdaptiveDraft()
    if drafter is not None:
        stats.why_not = control.why_not()
    target.sync(prompt[:-1])
    stats.prompt_cached = int(getattr(target, "reused", 0))
    committed = list(prompt)
    generated: list[int] = []
    last = prompt[-1]
    while len(generated) < max_new and not cancelled():
        room = max_new - len(generated) - 1
        # A batch that crosses the window's edge would evict before its later tokens are seen, and a rejected
        # draft cannot bring evicted tokens back: drafts stop at the edge, so the text stays plain decoding's.
        if (fits := target.room()) is not None:
            room = min(room, fits - 1)
        t0 = time.perf_counter()
        cls: int | None = None
        if isinstance(drafter, NgramDrafter):  # the match first: its length picks the acceptance class
            cls, cont = drafter.match(committed, min(max(control.k_max, control.fixed or 0), room)) if room > 0 else (0, [])
            drafts = cont[:control.choose(cls)] if cont else []
            qs = [_one_hot(t) for t in drafts]
        else:
            k = min(control.choose(), room) if drafter is not None else 0
            drafts, qs = drafter.propose(committed, k, sampling, rng, generated) if k > 0 and drafter else ([], [])
        eos_at = next((i for i, d in enumerate(drafts) if is_eos(d)), None)
        if eos_at is not None:  # nothing follows the end of the text: the tokens drafted after it go unverified
            drafts, qs = drafts[: eos_at + 1], qs[: eos_at + 1]
        t1 = time.perf_counter()
        rows = target.extend([last, *drafts], logits="all")
        t2 = time.perf_counter()
        assert rows is not None
        kept, final = accept(rows, drafts, qs, sampling, rng, generated)
        if kept < len(drafts):
            target.truncate(len(committed) + kept)
        stats.cycles += 1
        stats.k_history.append(len(drafts))
        stats.draft_seconds += t1 - t0
        stats.target_seconds += t2 - t1
        if drafter is not None:
            control.update(len(drafts), kept, t2 - t1, 0.0 if drafter.cheap else t1 - t0, cls)
        reached = 0  # the cycle's tokens the text took: it ends at an EOS, max_new, or a stop string downstream
        try:
            for tok in [*drafts[:kept], final]:
                committed.append(tok)
                generated.append(tok)
                reached += 1
                yield tok
                if is_eos(tok) or len(generated) >= max_new:
                    return
        finally:
            # Only the drafts the text reached count: the kept ones it took and, when it took the target's own
            # token, the draft that token replaced; drafts past the end of the text were neither used nor wrong.
            seen = min(len(drafts), reached)
            if seen:
                stats.draft_cycles += 1
                stats.drafted += seen
                stats.accepted += min(kept, seen)
        last = final


def decoding_note(extra: dict[str, Any]) -> str:
    """``", draft: 71% of 340 accepted, KV window 1024: 2,048 evicted"`` from a generation's
    ``GenerationStats.extra`` (empty when neither was used)."""
    parts = []
    spec = extra.get("speculative") or {}
    if spec.get("mode") not in (None, "none"):
        acc = spec.get("acceptance")
        why = f": {spec['why_not']}; --n-draft N drafts anyway" if spec.get("why_not") else ""
        parts.append(f"{spec['mode']}: " + (f"{100 * acc:.0f}% of {spec['drafted']} drafted accepted"
                                            if acc is not None else f"nothing drafted{why}"))
    kv = extra.get("kv") or {}
    if kv.get("window"):
        parts.append(f"KV window {kv['window']} ({kv['sinks']} sinks): {kv['cells']} held, {kv['evicted']:,} evicted")
    return "".join(", " + p for p in parts)
