"""``llmfirst bench judge``: can the judge tell a right answer from one with a wrong fact, with and without the
query's reference facts, and how fast does it judge one at a time against batched?

1. **Correct answers**: the answer model answers every query of the set (the ``direct`` preset, temperature 0,
   all at once on the batched engine); an answer is kept as correct when it ended on its own and states every
   reference key fact of its query (:mod:`llmfirst_kit.quality.facts`; evaluation only).
2. **Fact-changed answers**: the same model rewrites each kept answer with one key fact made wrong
   (:func:`~llmfirst_kit.quality.gate.fact_changed_pairs`); a rewrite that still states the fact is dropped.
3. **Judging**: each (correct, fact-changed) pair in both orders, once reference-free and once reference-guided
   (the query's facts in its language as data). Per design: the share of pairs right in both orders, right with
   the two orders' probabilities averaged (the kit's rule), right under MT-Bench's rule (two orders that disagree
   are a tie, counted as not right), and the share of decided verdicts that chose the answer shown first.
4. **Throughput**: the first ``speed_pairs`` pairs judged by the same judge with ``parallel=1`` (one call at a
   time, the engine before batching) and with the batched engine, side by side: judgments per minute.

The pairs are built here from fresh answers, not from a study's gate. Everything is written to ``out`` (a JSON
file) so the figures can be read again and the pairs reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from .._fs import atomic_write
from ..backends.embedded import EmbeddedBackend
from ..data import QUERIES
from ..errors import InvalidInput
from ..pipeline import Pipeline
from ..quality.facts import key_fact_recall, reference_sentences
from ..quality.gate import PLANTED, REAL, GatePair, RealAnswer, fact_changed_pairs, pair_correct
from ..quality.judge import PairwiseJudge
from ..quality.retention import bootstrap_ci, first_position_rate, judgment_outcome
from ..study.queries import load_queries
from ..sync import gather_at_most

DESIGNS = ("reference-free", "reference-guided")


def mt_bench_correct(judgments: Sequence[Any]) -> bool:
    """MT-Bench's rule: the real answer wins only if it wins in both orders (disagreeing orders are a tie)."""
    return bool(judgments) and all(j["winner"] == REAL for j in judgments)


def design_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Subtle-error detection of one judge design over its judged pairs."""
    averaged = [float(pair_correct([judgment_outcome(j, (REAL, PLANTED)) for j in r["judgments"]])) for r in rows]
    both = [float(mt_bench_correct(r["judgments"])) for r in rows]
    verdicts = [j["verdict"] for r in rows for j in r["judgments"]]
    out: dict[str, Any] = {"pairs": len(rows)}
    for name, hits in (("averaged", averaged), ("both_orders", both)):
        out[name] = round(sum(hits) / len(hits), 4) if hits else None
        out[f"{name}_ci95"] = list(bootstrap_ci(hits)) if hits else None
    out["first_position_rate"] = first_position_rate(verdicts)
    out["undecided"] = sum(j["winner"] is None for r in rows for j in r["judgments"])
    out["by_language"] = {lang: round(sum(a for a, r in zip(averaged, rows) if r["lang"] == lang)
                                      / sum(1 for r in rows if r["lang"] == lang), 4)
                          for lang in sorted({r["lang"] for r in rows})}
    return out


async def _judge_all(judge: PairwiseJudge, pairs: list[GatePair], refs: dict[str, list[str]] | None,
                     concurrency: int) -> list[list[dict[str, Any]]]:
    async def one(p: GatePair) -> list[dict[str, Any]]:
        js = await judge.compare(p.query, p.real, p.planted, labels=(REAL, PLANTED),
                                 reference=refs.get(p.query_id) if refs is not None else None)
        return [j.to_dict() for j in js]

    return await gather_at_most(concurrency, (one(p) for p in pairs))


async def judge_bench(*, answer_model: str = "qwen2.5-coder-1.5b", judge_model: str = "qwen2.5-coder-1.5b",
                      queries: str | Path = QUERIES, limit: int = 0, answer_tokens: int = 192,
                      concurrency: int = 4, speed_pairs: int = 4, n_threads: int | None = None,
                      out: str | Path | None = None, echo: Any = print) -> dict[str, Any]:
    """The measurement of the module docstring; returns its figures (and writes everything to ``out``)."""
    if concurrency < 1 or speed_pairs < 0 or answer_tokens < 16:
        raise InvalidInput("concurrency must be >= 1, speed_pairs >= 0 and answer_tokens >= 16")
    qs = [q for q in load_queries(queries) if q.facts]
    if limit:
        qs = qs[:limit]
    if not qs:
        raise InvalidInput(f"no query in {str(queries)!r} has reference facts (`facts`); the bench needs them")
    backend = EmbeddedBackend(judge_model, n_threads=n_threads)
    t0 = time.perf_counter()
    pipe = Pipeline.from_preset("direct", backend=backend, model=answer_model, max_tokens=answer_tokens)
    records = await gather_at_most(8, (pipe.run(q.query) for q in qs))
    reals, dropped = [], {"not complete": 0, "misses a key fact": 0}
    for q, rec in zip(qs, records):
        answer = rec.answer_call()
        text = answer.text if answer else ""
        if rec.status != "ok" or answer is None or answer.finish_reason != "stop":
            dropped["not complete"] += 1
        elif key_fact_recall(text, q.facts) != 1.0:
            dropped["misses a key fact"] += 1
        else:
            reals.append(RealAnswer(query_id=q.id, query=q.query, text=text, lang=q.lang, twin=q.twin,
                                    facts=tuple(q.facts)))
    echo(f"answers: {len(reals)} of {len(qs)} correct ({dropped}) in {time.perf_counter() - t0:.0f} s")
    rejected: list[dict[str, str]] = []
    t0 = time.perf_counter()
    pairs = await fact_changed_pairs(backend, reals, model=answer_model,
                                     on_rejected=lambda r, why: rejected.append({"query_id": r.query_id, "why": why}))
    echo(f"fact-changed answers: {len(pairs)} kept, {len(rejected)} rejected in {time.perf_counter() - t0:.0f} s")
    if not pairs:
        raise InvalidInput("no usable fact-changed answer was written; nothing to judge")
    lang = {q.id: q.lang for q in qs}
    refs = {q.id: reference_sentences(q.facts, q.lang) for q in qs}
    judge = PairwiseJudge(backend=backend, model=judge_model)
    judged: dict[str, list[list[dict[str, Any]]]] = {}
    figures: dict[str, Any] = {}
    for design in DESIGNS:
        t0 = time.perf_counter()
        judged[design] = await _judge_all(judge, pairs, refs if design == "reference-guided" else None, concurrency)
        rows = [{"lang": lang[p.query_id], "judgments": js} for p, js in zip(pairs, judged[design])]
        figures[design] = design_figures(rows)
        echo(f"{design}: {figures[design]} in {time.perf_counter() - t0:.0f} s")
    speed: dict[str, Any] = {}
    if speed_pairs:
        some = pairs[:speed_pairs]
        serial = PairwiseJudge(backend=EmbeddedBackend(judge_model, n_threads=n_threads, parallel=1),
                               model=judge_model)
        await serial.compare(some[0].query, some[0].real, some[0].planted)  # warm-up: the copy's first load
        for name, j, conc in (("one_at_a_time", serial, 1), ("batched", judge, concurrency)):
            t0 = time.perf_counter()
            await _judge_all(j, some, refs, conc)
            seconds = time.perf_counter() - t0
            speed[name] = {"judgments": 2 * len(some), "seconds": round(seconds, 1),
                           "judgments_per_minute": round(2 * len(some) * 60 / seconds, 2)}
        speed["ratio"] = round(speed["batched"]["judgments_per_minute"]
                               / speed["one_at_a_time"]["judgments_per_minute"], 2)
    from ..engine import choice

    result = {"benchmark": "judge", "answer_model": answer_model, "judge_model": judge_model,
              "cpu_model": choice().cpu_model, "engine": choice().config, "queries": len(qs),
              "correct_answers": len(reals), "dropped": dropped, "pairs": len(pairs), "rejected": len(rejected),
              "designs": figures, "throughput": speed}
    if out is not None:
        atomic_write(Path(out), json.dumps({**result, "rejected_rewrites": rejected, "pair_data": [
            {**p.to_dict(), "lang": lang[p.query_id], "reference": refs[p.query_id],
             **{design: judged[design][i] for design in DESIGNS}} for i, p in enumerate(pairs)]},
            ensure_ascii=False, indent=1))
    return result
