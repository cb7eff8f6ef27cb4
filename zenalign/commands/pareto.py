"""Pareto fronts and their hypervolume, for comparing runs over several objectives (all maximised)."""

from __future__ import annotations

from typing import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (duplicates are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume of the region dominated by ``points`` and bounded below by ``reference``.

    Exact, by slicing along the last objective (the HSO algorithm); fine for the tens of points a
    sweep produces. Points not strictly above the reference in every objective add nothing.
    """
    kept = [tuple(p) for p in points if all(x > r for x, r in zip(p, reference))]
    if not kept:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in kept) - reference[0]
    kept.sort(key=lambda p: p[-1], reverse=True)
    volume = 0.0
    for i, p in enumerate(kept):
        lower = kept[i + 1][-1] if i + 1 < len(kept) else reference[-1]
        if p[-1] > lower:
            volume += (p[-1] - lower) * hypervolume([q[:-1] for q in kept[: i + 1]], reference[:-1])
    return volume
