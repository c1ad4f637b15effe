"""``llmfirst bench pipeline``: user-visible TTFT, E2E, kit overhead, the kit's time between stages, the
strategy decision's own latency and the prompt tokens evaluated before the first visible token of presets,
interleaved per query (every preset on a query before the next query, the order reversed every other round).

Every preset is warmed the same way before anything is measured: one warm-up run of each, on the first
query, so models are loaded, their weights touched and grammars built; what that first run cost beyond a
measured run of the same query (model loads, grammar builds, first touch) is reported apart
(``first_run``), never mixed into the medians.

Cache state, **cold per run**: every loaded model's KV cache is emptied once at the start of each run
(warm-up or measured) and the run's calls use ``cache="reuse"``, so within a run the stages share the
prompt prefix they have in common (a staged run's decision and answer begin with the same system prompt
and query), as they would in use, while no run profits from the one before. (``cache="cold"`` per call
would throw that shared prefix away and charge the staged flow for prefills it does not pay in use.) This
needs the embedded backend (its loaded models are in this process); another backend keeps its own cache
and the result says so (``cache``).
"""

from __future__ import annotations

import itertools
from typing import Any

from ..backends import Backend, get_backend
from ..metrics import NS, kit_overhead_s, run_e2e_s, stage_gaps_s, user_ttft_s
from ..pipeline import Pipeline
from ..records import RunRecord
from ._ab import interleave, median, median_interval, ratio_interval, verdict

PIPELINE_QUERIES = (
    "What is the difference between a process and a thread?",
    "파이썬에서 리스트와 튜플의 차이는 무엇인가요?",
    "Why is the sky blue?",
)
GOAL_STAGED_TTFT_RATIO = 1.2  # staged user-visible TTFT <= 1.2x direct (issue 14)


def _duration_s(call: Any) -> float | None:
    return (call.end_ns - call.start_ns) / NS if call.end_ns and call.start_ns else None


def decision_s(rec: RunRecord, stage_names: set[str]) -> float | None:
    """The strategy decision's own latency in a run: its call's duration (request start -> call returned),
    a retry included; None when the run made no such call."""
    calls = [s.call for s in rec.stages if s.name.split(".")[0] in stage_names]
    spans = [_duration_s(c) for c in calls]
    return sum(s for s in spans if s is not None) if calls else None


def prefill_tokens_to_first_visible(rec: RunRecord) -> int | None:
    """Prompt tokens the calls up to and including the first visible stage's evaluated (the KV cache's share
    left out): what the first visible token waits for, since a prefill costs about the same per token. None
    when a call did not report it (a backend without that count) or nothing visible ran."""
    total = 0
    for stage in rec.stages:
        n = stage.call.server.get("prompt_eval_tokens")
        if n is None:
            return None
        total += n
        if stage.visible:
            return total
    return None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


async def pipeline(model: str | None = None, presets: tuple[str, ...] = ("direct", "staged"),
                   queries: tuple[str, ...] = PIPELINE_QUERIES, max_tokens: int = 256,
                   repeats: int = 1, *, n_threads: int | None = None,
                   backend: Backend | None = None) -> dict[str, Any]:
    """User-visible TTFT, E2E, kit overhead and decision latency of presets (any of
    ``pipeline.PRESET_NAMES``, e.g. ``staged:analysis-first``), interleaved per query, cold per run, every
    preset warmed by one run first (its cost reported apart in ``first_run``). The first preset is the one
    the others are compared to (``direct`` by default). ``backend`` (default: embedded, ``n_threads``)."""
    be = backend or get_backend("embedded", **({"n_threads": n_threads} if n_threads else {}))
    pipes = {p: Pipeline.from_preset(p, backend=be, model=model, max_tokens=max_tokens, cache="reuse")
             for p in presets}
    strategy_stages = {p: {s.name for s in pipe.stages if s.decision == "strategy"} for p, pipe in pipes.items()}
    warm_query = queries[0]

    first_run: dict[str, dict[str, Any]] = {}
    cold_per_run = True
    for p in presets:  # every preset warmed the same way: one full run on the first query
        cold_per_run = be.empty_caches() and cold_per_run
        grammars = be.grammars_built()
        rec = await pipes[p].run(warm_query, warmup=True)
        loads = [s.call for s in rec.stages if s.call.cold_load]
        first_run[p] = {"status": rec.status, "user_ttft_s": _r(user_ttft_s(rec)), "e2e_s": _r(run_e2e_s(rec)),
                        "models_loaded": sorted({c.model for c in loads}),
                        "load_s": round(sum(c.load_s or 0.0 for c in loads), 4),
                        "grammars_built": be.grammars_built() - grammars,
                        "decision_s": _r(decision_s(rec, strategy_stages[p]))}

    per: dict[str, dict[str, list[Any]]] = {p: {"ttft": [], "e2e": [], "overhead": [], "gaps": [], "decision": [],
                                                "round": [], "warm_query_ttft": [], "errors": [], "prefill": []}
           for p in presets}
    rounds = list(itertools.chain.from_iterable(queries for _ in range(repeats)))
    for (i, q), p in interleave(presets, list(enumerate(rounds)), alternate=True):
        be.empty_caches()  # cold per run: within the run, calls share their prefix
        rec: RunRecord = await pipes[p].run(q)
        if rec.status != "ok":
            per[p]["errors"].append(rec.error or rec.status)
        ttft = user_ttft_s(rec)
        per[p]["round"].append((i, ttft))
        per[p]["ttft"].append(ttft)
        per[p]["e2e"].append(run_e2e_s(rec))
        per[p]["overhead"].append(kit_overhead_s(rec))
        per[p]["gaps"].extend(stage_gaps_s(rec))
        per[p]["prefill"].append(prefill_tokens_to_first_visible(rec))
        d = decision_s(rec, strategy_stages[p])
        if d is not None:
            per[p]["decision"].append(d)
        if q == warm_query and ttft is not None:
            per[p]["warm_query_ttft"].append(ttft)

    base_name = presets[0]
    out: dict[str, Any] = {"benchmark": "pipeline", "model": be.resolve_model(model), "queries": len(queries),
                           "repeats": repeats, "max_tokens": max_tokens, "baseline": base_name,
                           "cache": "cold per run (KV caches emptied at each run's start; calls in a run share "
                                    "their prefix)" if cold_per_run else
                                    "reuse (this backend's cache could not be emptied from here)",
                           "warmup": f"one run of every preset on {warm_query!r}, excluded"}
    base_by_round = dict(per[base_name]["round"])
    for p in presets:
        row: dict[str, Any] = {
            "user_ttft_s": median_interval([v for v in per[p]["ttft"] if v is not None]),
            "e2e_s_median": _r(median(per[p]["e2e"])),
            "kit_overhead_ms_per_run_median": _r(median([x * 1000 for x in per[p]["overhead"]])),
            "stage_gap_ms_median": _r(median([x * 1000 for x in per[p]["gaps"]])),
            "prefill_tokens_to_first_visible_median": median(per[p]["prefill"]),
            "runs": len(per[p]["ttft"]), "errors": per[p]["errors"],
        }
        if strategy_stages[p]:
            row["decision_s"] = median_interval(per[p]["decision"])
        if p != base_name:
            base_med, med = out[base_name]["user_ttft_s"]["median"], row["user_ttft_s"]["median"]
            row[f"user_ttft_ratio_vs_{base_name}"] = med / base_med if med and base_med else None
            paired = [t / base_by_round[i] for i, t in per[p]["round"] if t and base_by_round.get(i)]
            g, low, high = ratio_interval(paired)
            row[f"user_ttft_ratio_vs_{base_name}"] = _r(row[f"user_ttft_ratio_vs_{base_name}"])
            row[f"user_ttft_paired_ratio_vs_{base_name}"] = {"geometric_mean": _r(g), "ci95_low": _r(low),
                                                            "ci95_high": _r(high)}
            if p.startswith("staged"):
                row["verdict_ttft_ratio_le_1_2"] = verdict(low, high, GOAL_STAGED_TTFT_RATIO, at_least=False)
        warm = median(per[p]["warm_query_ttft"])
        fr = first_run[p]
        fr["user_ttft_extra_s"] = _r(fr["user_ttft_s"] - warm) if fr["user_ttft_s"] is not None and warm else None
        row["first_run"] = fr
        out[p] = row
    out["goals"] = {f"staged user_ttft ratio vs {base_name}": f"<= {GOAL_STAGED_TTFT_RATIO}",
                    "stage_gap_ms_median (kit time between stages)": "<= 10"}
    return out
