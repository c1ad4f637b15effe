"""The interleaved A/B runner every side-by-side benchmark shares, and the intervals they report.

Two (or more) arms measured one round at a time, A B, A B, ..., in one process, so that whatever else the
machine is doing meanwhile falls on every arm alike; the ratio of their medians is what a benchmark
reports. ``alternate`` swaps the order within every other round (A B, B A, ...), for arms whose order in a
round matters (the second one finds warm caches).

Paired figures (one per round) get a Student-t 95 % interval: :func:`mean_interval` for differences
(TTFT added), :func:`ratio_interval` for ratios (the mean of the log-ratios, exponentiated: a geometric
mean, symmetric in which arm is on top). :func:`verdict` says whether a goal is met by the whole interval.
"""

from __future__ import annotations

import math
import statistics
from typing import Awaitable, Callable, Iterable, Iterator, Sequence, TypeVar

from ..metrics import median_ci

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
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def median_interval(values: Sequence[float]) -> dict[str, float | None]:
    """The median with its distribution-free 95 % interval (``metrics.median_ci``) and that interval's actual
    coverage, rounded for a report."""
    low, high, coverage = median_ci(list(values))
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"median": r(median(values)), "ci_low": r(low), "ci_high": r(high),
            "ci_coverage": None if coverage is None else round(coverage, 3)}


# Student t, 0.975 quantile, df = 1..30 (beyond: the Cornish-Fisher expansion around the normal quantile)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the mean and its Student-t 95 % interval (low = high = None with one value)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return None, None, None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None, None
    half = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def ratio_interval(ratios: Iterable[float | None]) -> tuple[float | None, float | None, float | None]:
    """(geometric mean, low, high) of paired ratios: a t interval on their logarithms, exponentiated."""
    logs = [math.log(r) for r in ratios if r is not None and r > 0 and not math.isnan(r)]
    m, low, high = mean_interval(logs)
    return tuple(None if v is None else math.exp(v) for v in (m, low, high))  # type: ignore[return-value]


def verdict(low: float | None, high: float | None, goal: float, *, at_least: bool = True) -> str:
    """``met`` when the whole interval is on the goal's side, ``not met`` when the whole interval is on the
    other side, ``undecided`` when it straddles the goal (or there is no interval: more pairs needed)."""
    if low is None or high is None:
        return "undecided"
    if at_least:
        return "met" if low >= goal else "not met" if high < goal else "undecided"
    return "met" if high <= goal else "not met" if low > goal else "undecided"
