"""The interleaved A/B runner every side-by-side benchmark shares.

Two (or more) arms measured one round at a time, A B, A B, ..., in one process, so that whatever else the
machine is doing meanwhile falls on every arm alike; the ratio of their medians is what a benchmark
reports. ``alternate`` swaps the order within every other round (A B, B A, ...), for arms whose order in a
round matters (the second one finds warm caches).
"""

from __future__ import annotations

import statistics
from typing import Awaitable, Callable, Iterable, Iterator, Sequence, TypeVar

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")


def interleave(arms: Sequence[A], rounds: Iterable[R], *, alternate: bool = False) -> Iterator[tuple[R, A]]:
    """``(round, arm)`` in the order to measure them: every arm once per round."""
    for i, round_ in enumerate(rounds):
        for arm in (arms if not alternate or i % 2 == 0 else arms[::-1]):
            yield round_, arm


async def run_interleaved(arms: Sequence[A], rounds: Iterable[R], measure: Callable[[A, R], Awaitable[T]], *,
                          alternate: bool = False) -> dict[A, list[T]]:
    """Measure every arm in every round, interleaved; each arm's results in round order."""
    out: dict[A, list[T]] = {arm: [] for arm in arms}
    for round_, arm in interleave(arms, rounds, alternate=alternate):
        out[arm].append(await measure(arm, round_))
    return out


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values measured (None for none)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
