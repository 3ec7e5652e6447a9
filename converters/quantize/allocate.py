"""Mixed precision to a byte budget, for any format: pick one storage option per tensor (or per group
of tensors that must share one) to minimise the summed measured error.

Each :class:`Item` lists its options as ``(option, bytes, error)``. Every item starts at its cheapest
option and the upgrade with the best error reduction per extra byte is taken while it fits (greedy on
each item's lower convex hull, which is optimal for this separable problem up to the last, partial
step). Errors are whatever the caller measured on one scale (the formats use the Hessian-weighted
output error of importance-weighted rounding).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import InputError


@dataclass
class Item:
    """One tensor's (or group's) options: ``(option, bytes, error)`` for every candidate."""

    name: str
    options: list[tuple[Any, int, float]] = field(default_factory=list)

    def hull(self) -> list[tuple[Any, int, float]]:
        """Options on the lower convex hull of (bytes, error), cheapest first."""
        pts = sorted(self.options, key=lambda o: (o[1], o[2]))
        frontier: list[tuple[Any, int, float]] = []
        for o in pts:  # drop options that cost more and are not better
            if not frontier or o[2] < frontier[-1][2]:
                if frontier and o[1] == frontier[-1][1]:
                    frontier.pop()
                frontier.append(o)
        hull: list[tuple[Any, int, float]] = []
        for o in frontier:
            while len(hull) >= 2:
                (_, b1, e1), (_, b2, e2) = hull[-2], hull[-1]
                if (e1 - e2) * (o[1] - b2) <= (e2 - o[2]) * (b2 - b1):  # middle point above the chord
                    hull.pop()
                else:
                    break
            hull.append(o)
        return hull


def allocate(items: list[Item], budget_bytes: int) -> dict[str, Any]:
    """The option per item minimising the summed error within ``budget_bytes``."""
    hulls = {it.name: it.hull() for it in items}
    level = dict.fromkeys(hulls, 0)
    spent = sum(h[0][1] for h in hulls.values())
    if spent > budget_bytes:
        raise InputError("the budget is below what the smallest types need; raise --bpw")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], level[name]
        if i + 1 < len(h):
            gain = (h[i][2] - h[i + 1][2]) / max(1, h[i + 1][1] - h[i][1])
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], level[name]
        extra = h[i + 1][1] - h[i][1]
        if spent + extra > budget_bytes:
            continue  # this upgrade does not fit; a cheaper one of another tensor still might
        spent += extra
        level[name] = i + 1
        push(name)
    return {name: hulls[name][level[name]][0] for name in hulls}
