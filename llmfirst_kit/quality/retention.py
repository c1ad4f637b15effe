"""Quality retention against a baseline system: pure formulas over pairwise, order-swapped verdicts.

Every query is judged twice, once with the baseline's answer shown first and once with the candidate's
first. Each judgment's outcome is one of ``"candidate"`` (the candidate's answer is better), ``"baseline"``,
``"tie"`` or ``None`` (the judge gave no valid verdict), or, where the judge's verdict was read as a choice,
its probabilities over the three (``{"candidate": 0.7, "baseline": 0.2, "tie": 0.1}``; see
:func:`judgment_outcome`). A verdict without probabilities counts as certain (probability 1).

- **query score**: a query's win-or-tie probability, averaged over its decided judgments (both orders). With
  certain verdicts that is the share of judgments in which the candidate wins or ties (0, 0.5 or 1 for two).
  Averaging the two orders cancels a judge that always prefers one position (it gives 0.5, not 0 or 1), and
  averaging probabilities lets a confident verdict in one order outweigh a hesitant one in the other (balanced
  position calibration, Wang et al. 2023, "Large Language Models are not Fair Evaluators").
- **retention** = the mean query score over the queries with at least one decided judgment (the candidate's
  win-or-tie share), with a percentile **bootstrap interval** over queries (resampled with a seed).
- **meets quality**: the interval's lower bound >= the target (0.8, the paper's "80 % of the baseline").
- **order disagreement**: the share of queries (both judgments decided) whose two outcomes differ, i.e. the
  verdict changed when only the order of the answers changed (position bias).
- **first-position rate**: the share of non-tie judgments that preferred the answer shown first (0.5 for a
  judge without position bias).

Nothing here calls a model; ``judge`` produces the outcomes, ``gate`` checks the judge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

OUTCOMES = ("candidate", "baseline", "tie")
QUALITY_TARGET = 0.8
DEFAULT_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 2000

Outcome = str | Mapping[str, float] | None  # a verdict, its probabilities, or None (undecided)


def judgment_outcome(judgment: Any, labels: tuple[str, str] = ("baseline", "candidate")) -> Outcome:
    """A judgment's (a :class:`~llmfirst_kit.quality.judge.Judgment` or its dict) outcome over ``labels`` and
    ``"tie"``: its verdict's probabilities mapped to the answers (A: the answer shown first), when it has them;
    else its winner; None when undecided."""
    get = judgment.get if isinstance(judgment, Mapping) else lambda key: getattr(judgment, key, None)
    winner, probs = get("winner"), get("probabilities")
    if winner is None or not probs:
        return winner
    first = get("shown_first")
    second = labels[1] if first == labels[0] else labels[0]
    return {first: float(probs.get("A", 0.0)), second: float(probs.get("B", 0.0)),
            "tie": float(probs.get("tie", 0.0))}


def outcome_probabilities(outcome: Outcome, names: tuple[str, ...] = OUTCOMES) -> dict[str, float] | None:
    """An outcome as probabilities over ``names`` (a verdict: probability 1; None stays None), normalised."""
    if outcome is None:
        return None
    if isinstance(outcome, str):
        if outcome not in names:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {names} or None")
        return {n: float(n == outcome) for n in names}
    unknown = set(outcome) - set(names)
    if unknown:
        raise ValueError(f"unknown outcome(s) {sorted(unknown)}; expected probabilities over {names}")
    total = sum(outcome.values())
    if total <= 0:
        raise ValueError(f"outcome probabilities must sum to more than 0, got {dict(outcome)}")
    return {n: outcome.get(n, 0.0) / total for n in names}


def hard_outcome(outcome: Outcome, names: tuple[str, ...] = OUTCOMES) -> str | None:
    """The verdict itself: the most probable outcome."""
    probs = outcome_probabilities(outcome, names)
    return None if probs is None else max(names, key=lambda n: probs[n])


def query_score(outcomes: Iterable[Outcome]) -> float | None:
    """A query's win-or-tie probability averaged over its decided judgments (None: none decided); with
    certain verdicts, the share of judgments in which the candidate wins or ties."""
    decided = [outcome_probabilities(o) for o in outcomes if o is not None]
    if not decided:
        return None
    return sum(1.0 - p["baseline"] for p in decided) / len(decided)


def win_or_tie_share(scores: Iterable[float | None]) -> float | None:
    """Mean of the per-query scores (queries without a decided judgment left out)."""
    values = [s for s in scores if s is not None]
    return sum(values) / len(values) if values else None


def bootstrap_ci(values: Sequence[float], *, level: float = DEFAULT_LEVEL, n_boot: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of ``values``: ``n_boot`` resamples of the same size, with
    replacement, drawn by ``numpy.random.default_rng(seed)``; the interval is the (1-level)/2 and
    1-(1-level)/2 quantiles of the resampled means. (None, None) without values."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_boot, data.size))
    means = data[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def order_disagreement(pairs: Iterable[Sequence[Outcome]]) -> float | None:
    """Share of queries, among those with both judgments decided, whose two verdicts differ."""
    both = [(hard_outcome(p[0]), hard_outcome(p[1])) for p in pairs
            if len(p) == 2 and p[0] is not None and p[1] is not None]
    if not both:
        return None
    return sum(a != b for a, b in both) / len(both)


def first_position_rate(verdicts: Iterable[str | None]) -> float | None:
    """Share of non-tie verdicts (``"A"`` = the answer shown first, ``"B"`` = second) that chose the first."""
    decided = [v for v in verdicts if v in ("A", "B")]
    if not decided:
        return None
    return sum(v == "A" for v in decided) / len(decided)


@dataclass(frozen=True)
class Retention:
    """A configuration's quality against the baseline, from its queries' order-swapped verdicts."""

    share: float | None  # the candidate's win-or-tie share (retention)
    ci_low: float | None
    ci_high: float | None
    level: float
    n_queries: int  # queries with at least one decided judgment
    n_undecided: int  # judgments without a valid verdict
    wins: int  # judgments (not queries): candidate better
    ties: int
    losses: int
    order_disagreement: float | None
    first_position_rate: float | None
    target: float
    meets_quality: bool | None  # ci_low >= target; None without any decided judgment

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retention(outcomes_by_query: Mapping[str, Sequence[Outcome]], *, positions: Iterable[str | None] = (),
              target: float = QUALITY_TARGET, level: float = DEFAULT_LEVEL, n_boot: int = DEFAULT_BOOTSTRAP,
              seed: int = 0) -> Retention:
    """Retention of a configuration: ``outcomes_by_query`` maps each query to its judgments' outcomes (two:
    baseline shown first, candidate shown first; verdicts or probabilities, see :func:`judgment_outcome`);
    ``positions`` are the raw verdicts (``"A"``/``"B"``/``"tie"``) for the first-position rate."""
    scores = [query_score(o) for o in outcomes_by_query.values()]
    decided = [s for s in scores if s is not None]
    flat = [hard_outcome(o) for os in outcomes_by_query.values() for o in os]
    share = win_or_tie_share(decided)
    low, high = bootstrap_ci(decided, level=level, n_boot=n_boot, seed=seed)
    return Retention(
        share=share, ci_low=low, ci_high=high, level=level, n_queries=len(decided),
        n_undecided=sum(o is None for o in flat), wins=flat.count("candidate"), ties=flat.count("tie"),
        losses=flat.count("baseline"), order_disagreement=order_disagreement(outcomes_by_query.values()),
        first_position_rate=first_position_rate(positions), target=target,
        meets_quality=None if low is None else bool(low >= target))


__all__ = ["OUTCOMES", "QUALITY_TARGET", "Retention", "bootstrap_ci", "first_position_rate", "hard_outcome",
           "judgment_outcome", "order_disagreement", "outcome_probabilities", "query_score", "retention",
           "win_or_tie_share"]
