"""Across-run repeats (``--repeats N``): a whole benchmark run N times, one after another in one process, and
each headline figure reported as its mean with a Student-t 95 % interval over the runs, as AIPerf reports
multi-run results.

The two intervals answer different questions: a benchmark's own interval (over the paired rounds of one run,
``_ab``) says how precisely that run measured its figure; the across-run interval says how much a whole
run's result moves from one run to the next (warm caches, the machine's other work, frequency changes). A
goal is met across runs only when the whole across-run interval is on its side (``_ab.verdict``).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, Sequence

from ..errors import InvalidInput
from ._ab import mean_interval, verdict


def across_runs(results: Sequence[Mapping[str, Any]], keys: Sequence[str],
                goals: Mapping[str, tuple[float, bool]] | None = None) -> dict[str, Any]:
    """For each of ``keys`` (a number in every result; ``"staged.user_ttft_s.median"`` reads nested keys): the
    values run by run, their mean and its 95 % interval; ``goals`` maps a key to (goal, at_least) for a verdict
    by the across-run interval."""
    out: dict[str, Any] = {}
    for key in keys:
        values = [_get(r, key) for r in results]
        mean, low, high = mean_interval(values)
        row: dict[str, Any] = {"values": values, "mean": _r(mean), "ci95": [_r(low), _r(high)]}
        if goals and key in goals:
            goal, at_least = goals[key]
            row["verdict"] = verdict(low, high, goal, at_least=at_least)
        out[key] = row
    return out


async def repeat(run: Callable[[], Awaitable[dict[str, Any]]], repeats: int, keys: Sequence[str],
                 goals: Mapping[str, tuple[float, bool]] | None = None) -> dict[str, Any]:
    """``run`` once (its result as it is) or ``repeats`` times: then ``{"repeats", "across_runs", "runs"}``."""
    if repeats < 1:
        raise InvalidInput(f"repeats must be 1 or more, got {repeats}")
    if repeats == 1:
        return await run()
    results = [await run() for _ in range(repeats)]
    return {"repeats": repeats, "across_runs": across_runs(results, keys, goals), "runs": results}


def _get(result: Mapping[str, Any], key: str) -> Any:
    value: Any = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


__all__ = ["across_runs", "repeat"]
