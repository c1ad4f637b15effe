"""Batch calibration of a choice read from next-token probabilities (Zhou et al., "Batch Calibration",
ICLR 2024; after Zhao et al., "Calibrate Before Use", 2021).

A small model's probabilities over a choice's options carry a prior that no query causes: asked how a
query should be answered, the 0.5B model put ``analytical`` first for 63 of the 72 study queries, simple
and comprehensive ones alike, although its probabilities still moved with the query. The prior is the mean of the model's option probabilities over
the **calibration queries** (``assets/queries/calibration.jsonl``: 12 queries, half Korean, of every kind,
none of them in the study's query set, no labels), each asked with the very prompt the decision uses. A
calibrated choice divides each option's probability by its prior and renormalises; the decision is the
option with the largest result, i.e. the option this query raised most above the model's habit.

Nothing looks at the query: the prior is the model's own output on other queries, the same for every query,
and the decision is still the model's probabilities, rescaled. The prior is computed once per process for a
(backend, model, prompt, options) and kept in memory; the run that computes it records how long it took.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..data import CALIBRATION_QUERIES
from ..errors import KitError

PLACEHOLDER = "\x00query\x00"  # stands for the query when a prompt is used as the prior's key


@dataclass(frozen=True)
class Prior:
    """The mean option probabilities over the calibration queries (``probabilities``), how many queries they
    came from, and the seconds it took to compute them (in the run that computed them; None elsewhere)."""

    probabilities: dict[str, float]
    queries: int
    computed_s: float | None = None


_PRIORS: dict[Any, Prior] = {}
_LOCKS: dict[Any, asyncio.Lock] = {}


def calibration_queries() -> list[str]:
    """The calibration queries, in file order."""
    rows = [json.loads(line) for line in CALIBRATION_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["query"] for row in rows]


async def option_prior(key: Any, options: list[str], messages_for: Callable[[str], list[dict[str, str]]],
                       probabilities_of: Callable[[list[dict[str, str]]], Awaitable[dict[str, float]]]) -> Prior:
    """The prior of a choice: ``probabilities_of(messages_for(q))`` averaged over the calibration queries
    ``q``, computed once for ``key`` (with ``computed_s`` set on the Prior returned to the caller that computed
    it). A calibration call that fails raises KitError naming the query, and nothing is kept."""
    known = _PRIORS.get(key)
    if known is not None:
        return known
    lock = _LOCKS.setdefault(key, asyncio.Lock())
    async with lock:  # two runs deciding at once compute the prior once
        if key in _PRIORS:
            return _PRIORS[key]
        start = time.perf_counter()
        sums = dict.fromkeys(options, 0.0)
        queries = calibration_queries()
        for q in queries:
            try:
                probs = await probabilities_of(messages_for(q))
            except KitError as exc:
                raise KitError(f"calibrating the choice among {options} failed on the calibration query {q!r}: "
                               f"{exc}") from exc
            for option in options:
                sums[option] += probs[option]
        prior = Prior({o: round(s / len(queries), 6) for o, s in sums.items()}, len(queries))
        _PRIORS[key] = prior
        return Prior(prior.probabilities, prior.queries, round(time.perf_counter() - start, 4))


def calibrated(probabilities: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    """Each option's probability divided by its prior, renormalised to sum to 1 (an option with prior 0
    keeps weight 0: the model never gives it probability on the calibration queries either)."""
    ratios = {o: (p / prior[o] if prior[o] > 0 else 0.0) for o, p in probabilities.items()}
    total = sum(ratios.values())
    if total <= 0:
        return dict(probabilities)
    return {o: r / total for o, r in ratios.items()}


def forget_priors() -> None:
    """Drop every prior kept in memory (tests; a changed calibration file)."""
    _PRIORS.clear()
    _LOCKS.clear()


__all__ = ["PLACEHOLDER", "Prior", "calibrated", "calibration_queries", "forget_priors", "option_prior"]
