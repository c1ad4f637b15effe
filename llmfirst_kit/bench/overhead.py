"""``llmfirst bench overhead``: the kit's embedded backend against a raw llama-cpp-python streaming loop on
the same ``Llama`` -- greedy, cold cache, same prompt and max tokens, interleaved pairs -- reported as the
throughput ratio kit/raw and the TTFT the kit adds.

Timing goals live here, not in the test suite: a ratio measured in one run on one machine is meaningful;
an absolute time asserted in a test is not.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..backends import CallRequest
from ..backends.embedded import EmbeddedBackend
from ..metrics import decode_tps, ttft_s
from ..records import CallRecord
from ._ab import median, run_interleaved

# A prompt that keeps a model writing until max_tokens, so both sides decode the same number of tokens.
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm. Do not stop early."


def _timing(t0: int, stamps: list[int], tokens: int) -> tuple[float | None, float | None]:
    """(TTFT in s, decode tokens/s) from a request start and the content chunks' arrival stamps, by the
    formulas of :mod:`llmfirst_kit.metrics` (decode tokens/s = output tokens / (E2E - TTFT))."""
    rec = CallRecord(call_id="bench", backend="bench", model="", start_ns=t0, chunk_ns=stamps, output_tokens=tokens)
    return ttft_s(rec), decode_tps(rec)


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
    ttft, tps = _timing(t0, stamps, max_tokens)
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
    ttft, tps = _timing(t0, stamps, rec.output_tokens or 0)
    return {"ttft_s": ttft, "tokens_per_s": tps, "text": rec.text, "finish_reason": rec.finish_reason,
            "output_tokens": rec.output_tokens}


async def overhead(model: str = "qwen2.5-coder-0.5b", runs: int = 5, max_tokens: int = 128) -> dict[str, Any]:
    """The kit's embedded backend against a raw llama-cpp-python streaming loop on the same ``Llama``:
    greedy, cold cache, same prompt and max tokens, interleaved pairs (which side goes first alternates)."""
    backend = EmbeddedBackend(model)
    loaded = backend.load()
    messages = [{"role": "user", "content": LONG_PROMPT}]
    await _kit_once(backend, model, messages, 8)  # warm-up of both paths, excluded
    await asyncio.to_thread(_raw_once, loaded.llm, messages, 8)

    async def measure(side: str, _: int) -> dict[str, Any]:
        if side == "raw":
            return await asyncio.to_thread(_raw_once, loaded.llm, messages, max_tokens)
        return await _kit_once(backend, model, messages, max_tokens)

    sides = await run_interleaved(("raw", "kit"), range(runs), measure, alternate=True)
    pairs = list(zip(sides["raw"], sides["kit"]))
    ratios = [k["tokens_per_s"] / r["tokens_per_s"] for r, k in pairs]
    added = [(k["ttft_s"] - r["ttft_s"]) * 1000 for r, k in pairs]
    return {
        "benchmark": "overhead", "model": loaded.resolved.name, "runs": runs, "max_tokens": max_tokens,
        "n_threads": loaded.n_threads,
        "throughput_ratio": median(ratios), "ttft_added_ms": median(added),
        "raw_tokens_per_s": median([r["tokens_per_s"] for r, _ in pairs]),
        "kit_tokens_per_s": median([k["tokens_per_s"] for _, k in pairs]),
        "raw_ttft_ms": median([r["ttft_s"] * 1000 for r, _ in pairs]),
        "kit_ttft_ms": median([k["ttft_s"] * 1000 for _, k in pairs]),
        "same_text": all(r["text"] == k["text"] for r, k in pairs),
        "kit_output_tokens": [k["output_tokens"] for _, k in pairs],
        "goals": {"throughput_ratio": ">= 0.98", "ttft_added_ms": "<= 5"},
    }
