"""``llmfirst bench batch``: the embedded engine's batch curve -- aggregate decode tokens/s and the time of one
step when 1, 2, 4, 8, 16 calls decode together -- so a user sees where this machine's knee is.

Each level sends B identical calls at once (the same prompt, temperature 0, ``max_tokens`` each) to one engine of
``parallel`` = the largest level; the prompt is evaluated before the timed window. The window runs from the moment
every call has its first token to the moment the first call ends, so every step inside it decoded B sequences:
aggregate tokens/s = tokens delivered in the window / its length; step time = the median gap between a call's
tokens (its ITL) inside the window. Levels are interleaved over ``rounds`` (1, 2, 4, ..., then again), and each
figure is the median over rounds. Compare the ratios, not the absolute numbers, between machines.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any, Sequence

from ..backends import CallRequest
from ..backends.embedded import EmbeddedBackend
from ..errors import InvalidInput
from ..metrics import NS

PROMPT = "Explain in detail how a hash table works, with examples. Do not stop early."


async def _level(backend: EmbeddedBackend, model: str, size: int, max_tokens: int) -> dict[str, float]:
    calls = [backend.call(CallRequest(messages=[{"role": "user", "content": PROMPT}], model=model,
                                      max_tokens=max_tokens, temperature=0.0)) for _ in range(size)]
    records = await asyncio.gather(*(c.collect() for c in calls))
    bad = [r for r in records if r.status != "ok" or len(r.chunk_ns) < 3]
    if bad:
        raise RuntimeError(f"a call of the batch failed: {bad[0].error or bad[0].status}")
    start = max(r.chunk_ns[0] for r in records)
    end = min(r.chunk_ns[-1] for r in records)
    tokens = sum(n for r in records for t, n in zip(r.chunk_ns, r.chunk_tokens) if start < t <= end)
    gaps = [(b - a) / NS for r in records for a, b in zip(r.chunk_ns, r.chunk_ns[1:]) if start <= a and b <= end]
    window = (end - start) / NS
    return {"aggregate_tokens_per_s": tokens / window if window > 0 else 0.0,
            "step_ms": statistics.median(gaps) * 1000 if gaps else 0.0,
            "batch_mean": statistics.mean(r.server["batch"]["mean"] for r in records)}


async def batch_curve(model: str = "qwen2.5-coder-0.5b", sizes: Sequence[int] = (1, 2, 4, 8, 16), *,
                      max_tokens: int = 48, rounds: int = 2, n_threads: int | None = None) -> dict[str, Any]:
    """Aggregate decode tokens/s and step time per batch size (module docstring); ratios against one sequence."""
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1:
        raise InvalidInput(f"batch sizes must be positive whole numbers, e.g. 1,2,4,8,16; got {list(sizes)!r}")
    if max_tokens < 8:
        raise InvalidInput(f"max_tokens must be at least 8 for a window of steps, got {max_tokens} (--max-tokens)")
    backend = EmbeddedBackend(model, n_threads=n_threads, parallel=max(sizes))
    loaded = await asyncio.to_thread(backend.load)
    await _level(backend, model, 1, 8)  # warm-up: first touch of the weights, the prompt in the cache
    samples: dict[int, list[dict[str, float]]] = {s: [] for s in sizes}
    for _ in range(rounds):
        for size in sizes:
            samples[size].append(await _level(backend, model, size, max_tokens))
    rows = []
    for size in sizes:
        tps = statistics.median(s["aggregate_tokens_per_s"] for s in samples[size])
        rows.append({"sequences": size, "aggregate_tokens_per_s": round(tps, 1),
                     "step_ms": round(statistics.median(s["step_ms"] for s in samples[size]), 1),
                     "batch_mean": round(statistics.median(s["batch_mean"] for s in samples[size]), 2)})
    one = rows[0]["aggregate_tokens_per_s"] if sizes[0] == 1 else None
    for row in rows:
        row["vs_one"] = round(row["aggregate_tokens_per_s"] / one, 2) if one else None
    from ..engine import choice

    return {"benchmark": "batch", "model": loaded.resolved.name, "cpu_model": choice().cpu_model,
            "engine": choice().config, "n_threads": loaded.n_threads, "max_tokens": max_tokens, "rounds": rounds,
            "rows": rows}
