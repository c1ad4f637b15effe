"""``llmfirst bench pipeline``: user-visible TTFT, E2E, kit overhead and the kit's time between stages of
presets, interleaved per query (every preset on a query before the next query), cold cache."""

from __future__ import annotations

import itertools
from typing import Any

from ..metrics import kit_overhead_s, run_e2e_s, stage_gaps_s, user_ttft_s
from ..pipeline import Pipeline
from ..records import RunRecord
from ._ab import interleave, median

PIPELINE_QUERIES = (
    "What is the difference between a process and a thread?",
    "파이썬에서 리스트와 튜플의 차이는 무엇인가요?",
    "Why is the sky blue?",
)


async def pipeline(model: str | None = None, presets: tuple[str, ...] = ("direct", "staged"),
                   queries: tuple[str, ...] = PIPELINE_QUERIES, max_tokens: int = 256,
                   repeats: int = 1) -> dict[str, Any]:
    """User-visible TTFT, E2E and kit overhead of presets (any of ``pipeline.PRESET_NAMES``, e.g.
    ``staged:analysis-first``), interleaved per query, cold cache."""
    pipes = {p: Pipeline.from_preset(p, model=model, max_tokens=max_tokens, cache="cold") for p in presets}
    await pipes[presets[0]].run("Say hello.", warmup=True)  # load the models; excluded
    per: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "e2e": [], "overhead": [], "gaps": []}
                                              for p in presets}
    rounds = itertools.chain.from_iterable(queries for _ in range(repeats))
    for q, p in interleave(presets, rounds):
        rec: RunRecord = await pipes[p].run(q)
        per[p]["ttft"].append(user_ttft_s(rec) or float("nan"))
        per[p]["e2e"].append(run_e2e_s(rec) or float("nan"))
        per[p]["overhead"].append(kit_overhead_s(rec))
        per[p]["gaps"].extend(stage_gaps_s(rec))
    out: dict[str, Any] = {"benchmark": "pipeline", "model": pipes[presets[0]].backend.resolve_model(model),
                           "queries": len(queries), "repeats": repeats, "max_tokens": max_tokens}
    base = median(per[presets[0]]["ttft"])
    for p in presets:
        out[p] = {"user_ttft_s_median": median(per[p]["ttft"]), "e2e_s_median": median(per[p]["e2e"]),
                  "kit_overhead_ms_per_run_median": median([x * 1000 for x in per[p]["overhead"]]),
                  "stage_gap_ms_median": median([x * 1000 for x in per[p]["gaps"]])}
        if p != presets[0] and base:
            out[p][f"user_ttft_ratio_vs_{presets[0]}"] = out[p]["user_ttft_s_median"] / base
    out["goals"] = {"staged user_ttft ratio vs direct": "<= 1.2",
                    "stage_gap_ms_median (kit time between stages)": "<= 10"}
    return out
