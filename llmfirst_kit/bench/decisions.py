"""``llmfirst bench decisions``: the strategy decision alone, over a query set -- how its choices are
distributed and how often they agree with the queries' evaluation labels, read from the model's own
probabilities before and after calibration (:mod:`llmfirst_kit.pipeline.calibration`), in one run: each
query is decided once, and both readings come from that one call.

The labels (``category``) are for evaluation only: the model never sees them and nothing is decided by them.
The calibration queries are not in the study's query set, so the agreement is measured on queries the prior
was not computed from.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..backends import Backend, get_backend
from ..data import QUERIES
from ..errors import InvalidInput
from ..pipeline import STRATEGIES, Pipeline, strategy_stage
from ..quality.retention import bootstrap_ci
from ..study.queries import load_queries
from ..sync import gather_at_most
from ._ab import median_interval
from .pipeline import decision_s


def _reading(choices: list[str], labels: list[str]) -> dict[str, Any]:
    """Distribution of ``choices``, their agreement with ``labels`` (with a 95 % bootstrap interval) and the
    choices made for each label."""
    hits = [float(c == lab) for c, lab in zip(choices, labels)]
    low, high = bootstrap_ci(hits)
    return {"distribution": {s: choices.count(s) for s in STRATEGIES},
            "agreement": round(sum(hits) / len(hits), 4), "agreement_ci95": [low, high],
            "by_label": {lab: dict(Counter(c for c, lb in zip(choices, labels) if lb == lab))
                         for lab in STRATEGIES if lab in labels}}


async def decisions(model: str | None = None, queries: str | Path = QUERIES, *, n_threads: int | None = None,
                    backend: Backend | None = None, concurrency: int = 8) -> dict[str, Any]:
    """The strategy decision on every query of ``queries`` (a JSONL/CSV query set with ``category`` labels):
    the raw reading (the most probable option) against the calibrated one (the decision the pipeline takes),
    the difference in agreement with a paired 95 % bootstrap interval, and the decision's latency. The first
    query is decided alone (it computes or reads the prior), the others ``concurrency`` at a time (on the embedded
    engine, sequences of one batch), so ``decision_s`` is the latency under that load (``concurrency`` says it)."""
    if not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInput(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
    be = backend or get_backend("embedded", **({"n_threads": n_threads} if n_threads else {}))
    if not be.capabilities.next_token_choice:
        raise InvalidInput(f"the {be.name} backend cannot read a choice from next-token probabilities, so there is "
                           f"nothing to calibrate; pass the embedded backend (get_backend('embedded'))")
    qs = [q for q in load_queries(queries) if q.category in STRATEGIES]
    if not qs:
        raise InvalidInput(f"no query in {str(queries)!r} has a category label ({', '.join(STRATEGIES)}); the "
                           f"agreement needs one (the format: llmfirst_kit/assets/README.md)")
    pipe = Pipeline(stages=[strategy_stage()], name="strategy", backend=be, model=model)
    async def decide(q: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        rec = await pipe.run(q.query, labels=q.labels())
        d = rec.decisions["strategy"]
        if not d.by_model or not d.calibration:
            raise InvalidInput(f"query {q.id}: the model made no decision ({d.problem}); nothing to compare")
        raw = d.calibration["raw"]
        return d.calibration, {"id": q.id, "lang": q.lang, "label": q.category, "raw": max(raw, key=raw.get),
                               "calibrated": d.value["strategy"], "decision_s": decision_s(rec, {"strategy"})}

    calibration, first = await decide(qs[0])  # the first: it says how long computing the prior took
    rows = [first] + [row for _, row in await gather_at_most(concurrency, (decide(q) for q in qs[1:]))]
    labels = [r["label"] for r in rows]
    gain = [float(r["calibrated"] == r["label"]) - float(r["raw"] == r["label"]) for r in rows]
    out: dict[str, Any] = {
        "benchmark": "decisions", "model": be.resolve_model(model), "queries": len(rows), "concurrency": concurrency,
        "prior": calibration["prior"], "calibration_queries": calibration["queries"],
        "calibration_s": calibration["computed_s"],
        "raw": _reading([r["raw"] for r in rows], labels),
        "calibrated": _reading([r["calibrated"] for r in rows], labels),
        "agreement_gain": round(sum(gain) / len(gain), 4), "agreement_gain_ci95": list(bootstrap_ci(gain)),
        "by_language": {lang: {k: _reading([r[k] for r in rows if r["lang"] == lang],
                                           [r["label"] for r in rows if r["lang"] == lang])["agreement"]
                               for k in ("raw", "calibrated")}
                        for lang in sorted({r["lang"] for r in rows})},
        "decision_s": median_interval([r["decision_s"] for r in rows]),
        "rows": rows,
    }
    return out
