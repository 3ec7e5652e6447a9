"""What drafting could give at measured costs, for bench/speculative.py: the speed-up at an acceptance rate and
draft length (the drafting loop's own cost model, ``DraftCosts.cycle``), the best a free always-right draft
would give, the acceptance a draft needs for a speed-up, and the bound an oracle prompt lookup reaches on
recorded outputs."""

from __future__ import annotations

from edgekit.runtime.draft_length import DraftCosts, expected_tokens


def speedup_at(costs: dict[str, float], a: float, k: int) -> float:
    """Speed-up over plain decoding of drafting k tokens that are each right with probability ``a``
    (independently) at these measured costs: (1 + a + .. + a^k) tokens per cycle (the target's step over
    k + 1 tokens, from its measured widths when the run has them, else linear; and k draft steps), the
    drafting loop's own cost model (``DraftCosts.cycle``)."""
    c = DraftCosts.from_json(costs)
    return expected_tokens(a, k) * c.step / c.cycle(k)


def best_possible(costs: dict[str, float], k_max: int = 16) -> tuple[float, int]:
    """The speedup a draft that is always right could give at these measured costs, and its length."""
    return max((speedup_at(costs, 1.0, k), k) for k in range(1, k_max + 1))


def acceptance_needed(costs: dict[str, float], speedup: float, k_max: int = 16) -> float | None:
    """The least per-token acceptance rate at which some draft length k <= ``k_max`` reaches ``speedup``
    at these measured costs (:func:`speedup_at`). None when even a = 1 falls short."""

    def best(a: float) -> float:
        return max(speedup_at(costs, a, k) for k in range(1, k_max + 1))

    if best(1.0) < speedup:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):  # best() rises with a: bisect
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if best(mid) >= speedup else (mid, hi)
    return hi


def lookup_bounds(pairs: list[tuple[list[int], list[int]]], costs: dict[str, float], k_max: int = 16) -> list[float]:
    """The speed-up the best possible prompt-lookup drafter would give on each (prompt ids, output ids) at
    these costs: at every step it drafts from whichever earlier occurrence of the last token agrees
    longest with what the target will say, exactly as many tokens as will be accepted. An oracle (no real
    drafter knows the future), so a bound per prompt."""
    c = DraftCosts.from_json(costs)
    bounds = []
    for prompt, out in pairs:
        seq = list(prompt)
        pos, spent = 0, 0.0
        while pos < len(out):
            truth = out[pos: pos + min(k_max, len(out) - pos - 1)]
            best = 0
            for h in (i for i in range(len(seq) - 1) if seq[i] == seq[-1]):
                n = 0
                while n < len(truth) and h + 1 + n < len(seq) and seq[h + 1 + n] == truth[n]:
                    n += 1
                best = max(best, n)
            spent += c.verify(best + 1)
            seq += out[pos: pos + best + 1]
            pos += best + 1
        bounds.append(c.step * len(out) / spent if spent else 1.0)
    return bounds


def lookup_bound(pairs: list[tuple[list[int], list[int]]], costs: dict[str, float], k_max: int = 16) -> float:
    """:func:`lookup_bounds` aggregated as the rows' speed-ups are: the mean over prompts of tokens/s, over
    the mean of plain decoding's, whose tokens/s is the same for every prompt at these costs, so the mean
    of the per-prompt bounds. (Until stop 43 the bound was total plain time over total oracle time, which
    weighs long outputs more and came out 0.1-0.3x under this for the same outputs: not the speed-up the
    rows measure.) If it is under a target, no prompt-lookup drafter reaches that target."""
    return mean_bound(lookup_bounds(pairs, costs, k_max))


def mean_bound(bounds: list[float]) -> float:
    """Per-prompt bounds aggregated as the rows' speed-ups are (see :func:`lookup_bound`)."""
    return sum(bounds) / len(bounds) if bounds else 1.0
