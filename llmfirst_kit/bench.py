"""Benchmarks that compare two things side by side in one run (interleaved A B A B ...), reporting ratios.

Timing goals live here, not in the test suite: a ratio measured in one run on one machine is meaningful;
an absolute time asserted in a test is not.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from .backends import CallRequest
from .backends.embedded import EmbeddedBackend
from .metrics import kit_overhead_s, run_e2e_s, stage_gaps_s, user_ttft_s
from .pipeline import Pipeline

NS = 1e9

# A prompt that keeps a model writing until max_tokens, so both sides decode the same number of tokens.
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm. Do not stop early."

PIPELINE_QUERIES = (
    "What is the difference between a process and a thread?",
    "파이썬에서 리스트와 튜플의 차이는 무엇인가요?",
    "Why is the sky blue?",
)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _decode_tps(t0: int, stamps: list[int], tokens: int) -> tuple[float, float]:
    """(TTFT in s, decode tokens/s) from a request start and the content chunks' arrival stamps."""
    ttft = (stamps[0] - t0) / NS
    return ttft, (tokens - 1) / ((stamps[-1] - stamps[0]) / NS)


def _raw_once(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """The baseline: llama-cpp-python's own streaming chat completion, same sampling settings."""
    llm.reset()  # cold: evaluate the whole prompt
    stamps: list[int] = []
    text, finish = "", None
    t0 = time.perf_counter_ns()
    for part in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens, temperature=0.0,
                                           seed=0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        choice = part["choices"][0]
        content = choice["delta"].get("content")
        if content:
            stamps.append(time.perf_counter_ns())
            text += content
        finish = choice.get("finish_reason") or finish
    ttft, tps = _decode_tps(t0, stamps, max_tokens)
    return {"ttft_s": ttft, "tokens_per_s": tps, "text": text, "finish_reason": finish}


async def _kit_once(backend: EmbeddedBackend, model: str, messages: list[dict[str, str]],
                    max_tokens: int) -> dict[str, Any]:
    call = backend.call(CallRequest(messages=messages, model=model, max_tokens=max_tokens, temperature=0.0,
                                    seed=0, cache="cold"))
    stamps: list[int] = []
    t0 = time.perf_counter_ns()  # before prompt building, like the raw side
    async for chunk in call:
        stamps.append(chunk.t_ns)
    rec = call.record
    ttft, tps = _decode_tps(t0, stamps, rec.output_tokens or 0)
    return {"ttft_s": ttft, "tokens_per_s": tps, "text": rec.text, "finish_reason": rec.finish_reason,
            "output_tokens": rec.output_tokens}


async def overhead(model: str = "qwen2.5-coder-0.5b", runs: int = 5, max_tokens: int = 128) -> dict[str, Any]:
    """The kit's embedded backend against a raw llama-cpp-python streaming loop on the same ``Llama``:
    greedy, cold cache, same prompt and max tokens, interleaved pairs."""
    backend = EmbeddedBackend(model)
    loaded = backend.load()
    messages = [{"role": "user", "content": LONG_PROMPT}]
    await _kit_once(backend, model, messages, 8)  # warm-up of both paths, excluded
    await asyncio.to_thread(_raw_once, loaded.llm, messages, 8)
    pairs = []
    for i in range(runs):
        if i % 2 == 0:  # alternate which side goes first within a pair
            raw = await asyncio.to_thread(_raw_once, loaded.llm, messages, max_tokens)
            kit = await _kit_once(backend, model, messages, max_tokens)
        else:
            kit = await _kit_once(backend, model, messages, max_tokens)
            raw = await asyncio.to_thread(_raw_once, loaded.llm, messages, max_tokens)
        pairs.append((raw, kit))
    ratios = [k["tokens_per_s"] / r["tokens_per_s"] for r, k in pairs]
    added = [(k["ttft_s"] - r["ttft_s"]) * 1000 for r, k in pairs]
    return {
        "benchmark": "overhead", "model": loaded.resolved.name, "runs": runs, "max_tokens": max_tokens,
        "n_threads": loaded.n_threads,
        "throughput_ratio": _median(ratios), "ttft_added_ms": _median(added),
        "raw_tokens_per_s": _median([r["tokens_per_s"] for r, _ in pairs]),
        "kit_tokens_per_s": _median([k["tokens_per_s"] for _, k in pairs]),
        "raw_ttft_ms": _median([r["ttft_s"] * 1000 for r, _ in pairs]),
        "kit_ttft_ms": _median([k["ttft_s"] * 1000 for _, k in pairs]),
        "same_text": all(r["text"] == k["text"] for r, k in pairs),
        "kit_output_tokens": [k["output_tokens"] for _, k in pairs],
        "goals": {"throughput_ratio": ">= 0.98", "ttft_added_ms": "<= 5"},
    }


async def pipeline(model: str | None = None, presets: tuple[str, ...] = ("direct", "staged"),
                   queries: tuple[str, ...] = PIPELINE_QUERIES, max_tokens: int = 256,
                   repeats: int = 1) -> dict[str, Any]:
    """User-visible TTFT, E2E and kit overhead of presets, interleaved per query, cold cache."""
    pipes = {p: Pipeline.from_preset(p.split(":")[0], model=model, max_tokens=max_tokens, cache="cold",
                                     analysis_first=p.endswith(":analysis-first")) for p in presets}
    await pipes[presets[0]].run("Say hello.", warmup=True)  # load the models; excluded
    per: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "e2e": [], "overhead": [], "gaps": []}
                                              for p in presets}
    for _ in range(repeats):
        for q in queries:
            for p in presets:
                rec = await pipes[p].run(q)
                per[p]["ttft"].append(user_ttft_s(rec) or float("nan"))
                per[p]["e2e"].append(run_e2e_s(rec) or float("nan"))
                per[p]["overhead"].append(kit_overhead_s(rec))
                per[p]["gaps"].extend(stage_gaps_s(rec))
    out: dict[str, Any] = {"benchmark": "pipeline", "model": pipes[presets[0]].backend.resolve_model(model),
                           "queries": len(queries), "repeats": repeats, "max_tokens": max_tokens}
    base = _median(per[presets[0]]["ttft"])
    for p in presets:
        out[p] = {"user_ttft_s_median": _median(per[p]["ttft"]), "e2e_s_median": _median(per[p]["e2e"]),
                  "kit_overhead_ms_per_run_median": _median([x * 1000 for x in per[p]["overhead"]]),
                  "stage_gap_ms_median": _median([x * 1000 for x in per[p]["gaps"]])}
        if p != presets[0] and base:
            out[p][f"user_ttft_ratio_vs_{presets[0]}"] = out[p]["user_ttft_s_median"] / base
    out["goals"] = {"staged user_ttft ratio vs direct": "<= 1.2", "stage_gap_ms_median (kit time between stages)": "<= 10"}
    return out
