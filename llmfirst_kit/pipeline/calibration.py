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
and the decision is still the model's probabilities, rescaled. The prior is computed once for a (backend,
model, prompt, options, calibration queries) and kept in memory; where the backend can say what identifies the
model's weights and engine (``Backend.model_identity``: the embedded model's sha256, llama-cpp-python's version,
the engine configuration), it is also kept in ``$LLMFIRST_CACHE/priors/``, so a later process reads it
instead of computing it again (~4 s on the 0.5B). The run that computed it records how long it took; one
that read it from disk records the file.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from .._fs import atomic_write
from ..data import CALIBRATION_QUERIES
from ..errors import KitError
from ..models.files import cache_dir

PLACEHOLDER = "\x00query\x00"  # stands for the query when a prompt is used as the prior's key


@dataclass(frozen=True)
class Prior:
    """The mean option probabilities over the calibration queries (``probabilities``), how many queries they
    came from, the seconds it took to compute them (in the run that computed them; None elsewhere) and the
    file it was read from (in the first run of a process that read it from disk)."""

    probabilities: dict[str, float]
    queries: int
    computed_s: float | None = None
    file: str | None = None


_PRIORS: dict[str, Prior] = {}
_LOCKS: dict[str, asyncio.Lock] = {}


def calibration_queries() -> list[str]:
    """The calibration queries, in file order."""
    rows = [json.loads(line) for line in CALIBRATION_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["query"] for row in rows]


@functools.cache
def _calibration_digest() -> str:
    """The calibration file's sha256 (package data: read once a process, not at every decision)."""
    return hashlib.sha256(CALIBRATION_QUERIES.read_bytes()).hexdigest()


def priors_dir() -> Path:
    return cache_dir() / "priors"


def _stored(path: Path, key: dict[str, Any], options: list[str]) -> Prior | None:
    """The prior kept in ``path`` for exactly ``key``; None if there is none, or it is unreadable or for another
    key (a hash collision, a torn file): then it is computed again and the file replaced."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] == key and sorted(data["probabilities"]) == sorted(options):
            return Prior({o: float(data["probabilities"][o]) for o in options}, int(data["queries"]), None, str(path))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


async def option_prior(key: dict[str, Any], options: list[str], messages_for: Callable[[str], list[dict[str, str]]],
                       probabilities_of: Callable[[list[dict[str, str]]], Awaitable[dict[str, float]]],
                       model_identity: Callable[[], str | None] = lambda: None) -> Prior:
    """The prior of a choice: ``probabilities_of(messages_for(q))`` averaged over the calibration queries
    ``q``, once for ``key`` (what the prior depends on, JSON-able; the calibration queries are added to it),
    with ``computed_s`` set on the Prior returned to the caller that computed it. When it is not in memory and
    ``model_identity()`` names the weights and engine, the prior is read from and written to ``priors_dir()``
    (the identity joins the key there; it is asked for only then, not at every decision). A calibration call
    that fails raises KitError naming the query, and nothing is kept."""
    key = {**key, "calibration_queries": _calibration_digest()}
    name = json.dumps(key, sort_keys=True, ensure_ascii=False)
    known = _PRIORS.get(name)
    if known is not None:
        return replace(known, file=None)
    lock = _LOCKS.setdefault(name, asyncio.Lock())
    async with lock:  # two runs deciding at once compute the prior once
        if name in _PRIORS:
            return replace(_PRIORS[name], file=None)
        identity = model_identity()
        key = {**key, "model_identity": identity}
        stored_as = json.dumps(key, sort_keys=True, ensure_ascii=False)
        path = priors_dir() / f"{hashlib.sha256(stored_as.encode()).hexdigest()[:32]}.json" if identity else None
        stored = _stored(path, key, options) if path is not None and path.is_file() else None
        if stored is not None:
            _PRIORS[name] = stored
            return stored
        start = time.perf_counter()
        sums = dict.fromkeys(options, 0.0)
        queries = calibration_queries()
        async def probabilities(q: str) -> dict[str, float]:
            try:
                return await probabilities_of(messages_for(q))
            except KitError as exc:
                raise KitError(f"calibrating the choice among {options} failed on the calibration query {q!r}: "
                               f"{exc}") from exc

        # the calibration queries at once: on the embedded engine they are sequences of one batch
        for probs in await asyncio.gather(*(probabilities(q) for q in queries)):
            for option in options:
                sums[option] += probs[option]
        prior = Prior({o: round(s / len(queries), 6) for o, s in sums.items()}, len(queries))
        _PRIORS[name] = prior
        computed_s = round(time.perf_counter() - start, 4)
        if path is not None:
            atomic_write(path, json.dumps({"key": key, "probabilities": prior.probabilities, "queries": prior.queries,
                                           "computed_s": computed_s}, ensure_ascii=False, indent=1))
        return replace(prior, computed_s=computed_s)


def calibrated(probabilities: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    """Each option's probability divided by its prior, renormalised to sum to 1 (an option with prior 0
    keeps weight 0: the model never gives it probability on the calibration queries either)."""
    ratios = {o: (p / prior[o] if prior[o] > 0 else 0.0) for o, p in probabilities.items()}
    total = sum(ratios.values())
    if total <= 0:
        return dict(probabilities)
    return {o: r / total for o, r in ratios.items()}


def forget_priors() -> None:
    """Drop every prior kept in memory, as a new process starts (the files in ``priors_dir()`` stay)."""
    _PRIORS.clear()
    _LOCKS.clear()


__all__ = ["PLACEHOLDER", "Prior", "calibrated", "calibration_queries", "forget_priors", "option_prior", "priors_dir"]
