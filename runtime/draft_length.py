"""How long to draft: the target's measured step costs by batch width, and the controller that picks each
cycle's draft length from them and from the acceptance it observes (the geometric model). The token loop
that uses them is :mod:`edgekit.runtime.speculative`; its contexts (``target``, ``draft`` here) are that
module's :class:`~edgekit.runtime.speculative.Context`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DraftCosts:
    """Measured once when a drafter is loaded: seconds for a one-token target step, per extra token in a
    verification batch, per draft token, and the target step at each measured batch width. Freezing them
    keeps the draft lengths, and so a seeded sampled generation, reproducible (times measured on the fly
    differ from run to run).

    ``widths``: ``(n, seconds)`` of a target step over ``n`` tokens, by rising ``n``. A CPU's step is not
    linear in its width, because llama.cpp's kernels change with it: on F16 the second token costs most
    (one token is a matrix-vector product, a batch takes llamafile's GEMM) and later ones less; repacked
    Q4_K verifies up to three tokens for little and switches kernels at four. :meth:`verify` interpolates
    the measured widths rather than adding ``extra`` per token; without them it is ``step + (n - 1) *
    extra``."""

    step: float
    extra: float
    draft: float
    widths: tuple[tuple[int, float], ...] = ()

    def verify(self, n: int) -> float:
        """Seconds of one target step over ``n`` tokens (the last sampled one and ``n - 1`` drafts)."""
        if n <= 1 or len(self.widths) < 2:
            return self.step + max(n - 1, 0) * self.extra
        ns = [w for w, _ in self.widths]
        ts = np.maximum.accumulate([t for _, t in self.widths])  # timing noise must not make a wider step cheaper
        if n <= ns[-1]:
            return float(np.interp(n, ns, ts))
        slope = (ts[-1] - ts[-2]) / (ns[-1] - ns[-2])
        return float(ts[-1] + (n - ns[-1]) * slope)

    def cycle(self, k: int) -> float:
        """Seconds of one speculation cycle drafting ``k`` tokens: ``k`` draft steps and the verification."""
        return self.verify(k + 1) + k * self.draft

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_ms": round(1e3 * self.step, 3), "extra_ms": round(1e3 * self.extra, 3),
                               "draft_ms": round(1e3 * self.draft, 3)}
        if self.widths:
            out["verify_ms"] = {str(n): round(1e3 * t, 3) for n, t in self.widths}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DraftCosts:
        widths = tuple(sorted((int(n), t / 1e3) for n, t in (d.get("verify_ms") or {}).items()))
        return cls(step=d["step_ms"] / 1e3, extra=d["extra_ms"] / 1e3, draft=d["draft_ms"] / 1e3, widths=widths)


def expected_tokens(a: float, k: int) -> float:
    """Tokens one cycle drafting ``k`` yields when each drafted token is right with probability ``a``,
    independently (the geometric model): ``1 + a + .. + a^k``, the target's own token included."""
    return sum(a ** i for i in range(k + 1))


#: target batch widths :func:`measure_costs` times: verifying 0, 1, 2, 4 and 8 drafts (8: AdaptiveDraft's k_max).
#: Widths 2-3 matter: repacked K-quants switch kernels at 4 tokens, so their curve bends there.
WIDTHS = (1, 2, 3, 5, 9)


def measure_costs(target: Any, draft: Any | None, tokens: list[int], reps: int = 3,
                  widths: tuple[int, ...] = WIDTHS, keep: bool = False) -> DraftCosts:
    """Time target steps of each width in ``widths`` after ``tokens``, and a one-token draft step.
    ``keep``: leave ``tokens`` in the target's cache (a request's own prompt, evaluated once for both)."""

    def timed(ctx: Any, width: int, reps: int = reps) -> float:
        ts = []
        for _ in range(reps):
            ctx.sync(tokens)
            t0 = time.perf_counter()
            ctx.extend(tokens[:width], logits="all")
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    widths = tuple(sorted({1, *(w for w in widths if w <= len(tokens))}))
    for w in widths:  # warm-up, not timed: the first steps after loading run cold (measured 25% slower)
        timed(target, w, reps=1)
    if draft is not None:
        timed(draft, 1, reps=1)
    steps = tuple((w, timed(target, w)) for w in widths)
    curve = DraftCosts(step=steps[0][1], extra=0.0, draft=0.0, widths=steps if len(steps) > 1 else ())
    extra = max(curve.verify(5) - curve.step, 0.0) / 4  # the mean extra token up to five, for reports
    costs = dataclasses.replace(curve, extra=extra, draft=timed(draft, 1) if draft is not None else 0.0)
    for ctx in (target, draft):
        if ctx is not None:
            ctx.truncate(len(tokens) if keep and ctx is target else 0)
    return costs


def measure_for(target: Any, draft: Any | None, prompt: list[int], room: int, n_vocab: int) -> DraftCosts:
    """What both backends measure when they load a drafter, or at a model's first predicted output:
    :func:`measure_costs` after ``prompt`` where it fits (left in ``target``'s cache for its request), else
    after random ids (then ``target`` is cleared); ``draft`` is cleared. ``room``: the window or context."""
    probe, kept = probe_for(prompt, room, n_vocab)
    costs = measure_costs(target, draft, probe, keep=kept)
    if not kept:
        target.clear()
    if draft is not None:
        draft.clear()
    return costs


def probe_for(prompt: list[int], room: int, n_vocab: int) -> tuple[list[int], bool]:
    """The tokens :func:`measure_costs` times after, and whether they are the prompt (kept in the cache
    for the request): the prompt where it is as long as the widest step and leaves room for it, else 256
    seeded random ids (a short prompt would time only the narrow steps, and the costs stay for the model)."""
    if len(prompt) >= max(WIDTHS) and len(prompt) + max(WIDTHS) < room:
        return prompt, True
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(3, n_vocab, size=min(256, room // 2))], False


class AdaptiveDraft:
    """Chooses the draft length that maximises expected tokens per second from what it measured: the
    per-token acceptance rate (geometric model, decayed counts), the target's time for one token and for
    each extra verified token, and the drafter's time per token. k = 0 (plain decoding) when no k pays;
    then a probe of k = 1 after ``probe_every`` plain steps keeps the estimates fresh, the interval
    doubling after each probe that does not change the verdict; past ``max_probe_every`` drafting stops
    for the rest of the generation (a model draft must evaluate what it missed before each probe, so
    probing a draft that never pays costs time of its own).

    ``cls``: proposals of different kinds (prompt lookup's match lengths) keep acceptance counts of their
    own, each starting from the counts of all proposals so far."""

    def __init__(self, k_max: int = 8, prior: float = 0.6, fixed: int | None = None, probe_every: int = 16,
                 decay: float = 0.9, max_probe_every: int = 64, costs: DraftCosts | None = None,
                 max_break_even: float | None = None) -> None:
        self.k_max, self.fixed, self.decay = k_max, fixed, decay
        # ``max_break_even``: never draft when, at the frozen costs, a draft would have to be accepted more
        # often than this to be worth it (a model draft pays for each probe by evaluating what it missed)
        self.max_break_even = max_break_even
        self._hopeless: bool | None = None
        self.probe_every, self.min_probe_every, self.max_probe_every = probe_every, probe_every, max_probe_every
        self.acc, self.rej = prior * 4, (1 - prior) * 4
        self.classes: dict[int, list[float]] = {}  # cls -> [accepted, rejected], decayed
        self.frozen = costs is not None
        self.costs = costs
        self.t1: float | None = costs.step if costs else None  # seconds for a one-token target step
        self.t_extra = costs.extra if costs else 0.0  # seconds per extra token in a verification batch
        self.t_draft = costs.draft if costs else 0.0  # seconds per draft token
        self.idle = 0

    def alpha_of(self, cls: int | None = None) -> float:
        acc, rej = self.classes.get(cls, (self.acc, self.rej)) if cls is not None else (self.acc, self.rej)
        return min(acc / max(acc + rej, 1e-9), 0.999)

    @property
    def alpha(self) -> float:
        return self.alpha_of()

    def cycle_time(self, k: int) -> float:
        """Seconds of a cycle drafting ``k`` tokens: the measured costs' curve when frozen, else the
        running estimates (linear in ``k``)."""
        if self.costs is not None:
            return self.costs.cycle(k)
        return (self.t1 or 1.0) + k * (self.t_extra + self.t_draft)

    def expected_rate(self, k: int, cls: int | None = None) -> float:
        return expected_tokens(self.alpha_of(cls), k) / self.cycle_time(k)

    def can_pay(self) -> bool:
        """Whether some draft length beats plain decoding at these costs when every draft is right."""
        return self._pays(1.0)

    def _pays(self, a: float) -> bool:
        """Whether some draft length beats plain decoding at these costs at acceptance rate ``a``."""
        return any(expected_tokens(a, k) / self.cycle_time(k) > 1 / self.cycle_time(0) for k in range(1, self.k_max + 1))

    def break_even(self) -> float:
        """The acceptance rate from which some draft length beats plain decoding at these costs (1.0: none)."""
        lo, hi = 0.0, 0.999
        if not self._pays(hi):
            return 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self._pays(mid) else (mid, hi)
        return hi

    def hopeless(self) -> bool:
        """Whether drafting can be ruled out at the frozen costs: not even an always-right draft would be
        faster, or one would have to be accepted more often than ``max_break_even``."""
        if self._hopeless is None:
            self._hopeless = self.frozen and (not self.can_pay() or (
                self.max_break_even is not None and self.break_even() > self.max_break_even))
        return self._hopeless

    def why_not(self) -> str:
        """Why a :meth:`hopeless` draft is never probed, in the measured figures ("" when it is not)."""
        if self.fixed is not None or not self.hopeless() or self.costs is None:
            return ""
        c = self.costs
        costs = (f"a step {1e3 * c.step:.1f} ms, verifying 2 tokens {1e3 * c.verify(2):.1f} ms, "
                 f"a draft token {1e3 * c.draft:.1f} ms")
        if not self.can_pay():
            return f"even an always-right draft would be slower ({costs})"
        return (f"it would have to be accepted on {100 * self.break_even():.0f}% of its tokens to pay ({costs}); "
                f"not probed above {100 * (self.max_break_even or 0):.0f}%")

    def choose(self, cls: int | None = None) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.t1 is None:
            return min(4, self.k_max)
        if self.hopeless():
            return 0  # never pay for probes
        best = max(range(self.k_max + 1), key=lambda k: self.expected_rate(k, cls))
        if best == 0:
            self.idle += 1
            if self.idle >= self.probe_every <= self.max_probe_every:
                self.idle = 0
                self.probe_every *= 2
                return 1
        else:
            self.idle = 0
            self.probe_every = self.min_probe_every
        return best

    def update(self, drafted: int, accepted: int, t_target: float, t_draft: float, cls: int | None = None) -> None:
        if drafted:
            missed = 1 if accepted < drafted else 0
            if cls is not None:
                counts = self.classes.setdefault(cls, [self.acc, self.rej])
                counts[0] = self.decay * counts[0] + accepted
                counts[1] = self.decay * counts[1] + missed
            self.acc = self.decay * self.acc + accepted
            self.rej = self.decay * self.rej + missed
        if self.frozen:
            return
        if drafted:
            self.t_draft = 0.8 * self.t_draft + 0.2 * (t_draft / drafted) if self.t_draft else t_draft / drafted
        if self.t1 is None:
            self.t1 = t_target
        elif drafted == 0:
            self.t1 = 0.8 * self.t1 + 0.2 * t_target
        else:
            extra = max(t_target - self.t1, 0.0) / drafted
            self.t_extra = 0.8 * self.t_extra + 0.2 * extra
