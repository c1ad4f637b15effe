"""``llmfirst bench view``: the same greedy run with and without a live notebook view attached, interleaved.

The view (:class:`~llmfirst_kit.sinks.live_view.LiveView`, no frontend: widget state is serialised but not
sent) must cost the decoder nothing measurable and keep the frontend under ~20 messages a second.
"""

from __future__ import annotations

from typing import Any

from ..metrics import NS, decode_tps
from ..pipeline import Pipeline
from ..records import RunRecord
from ..sinks.live_view import FLUSH_INTERVAL_S, LiveView
from ._ab import median, run_interleaved

BENCH_QUERY = "Write a long story about a dragon who learns to fly."


async def view_overhead(model: str = "smollm2-135m", query: str = BENCH_QUERY, runs: int = 3, max_tokens: int = 256,
                        flush_interval_s: float = FLUSH_INTERVAL_S) -> dict[str, Any]:
    """After one warm-up run, ``runs`` rounds of (plain, viewed), the order alternating per round.

    Returns ``throughput_ratio`` (median decode tokens/s of the answer with the view / without),
    ``messages_per_s`` (frontend messages the view caused per second of run), the raw per-run figures,
    ``same_output`` (the greedy runs produced the same text) and ``ok`` against the goals (ratio >= 0.98,
    <= 20 messages/s)."""
    pipe = Pipeline.from_preset("direct", model=model, max_tokens=max_tokens, temperature=0.0, seed=0)

    async def measure(arm: str, _round: int) -> tuple[RunRecord, LiveView | None]:
        if arm == "plain":
            return await pipe.run(query), None
        view = LiveView(flush_interval_s=flush_interval_s, show=False)
        return await view.run(pipe, query), view

    await pipe.run(query)  # warm-up: loads the model, fills the prompt cache; not counted
    got = await run_interleaved(("plain", "viewed"), range(runs), measure, alternate=True)
    without = [r for r, _ in got["plain"]]
    with_view = [(r, v) for r, v in got["viewed"]]

    def tps(rec: RunRecord) -> float:
        return decode_tps(rec.stages[-1].call) or 0.0

    tps_without = [tps(r) for r in without]
    tps_with = [tps(r) for r, _ in with_view]
    rates = [v.messages / ((r.end_ns - r.start_ns) / NS) for r, v in with_view]
    texts = {r.stages[-1].call.text for r in without} | {r.stages[-1].call.text for r, _ in with_view}
    ratio = median(tps_with) / median(tps_without)
    messages_per_s = sum(v.messages for _, v in with_view) / sum((r.end_ns - r.start_ns) / NS for r, _ in with_view)
    return {
        "throughput_ratio": ratio,
        "messages_per_s": messages_per_s,
        "messages_per_s_max": max(rates),
        "tokens_per_s_with_view": tps_with,
        "tokens_per_s_without_view": tps_without,
        "messages": [v.messages for _, v in with_view],
        "output_tokens": [r.stages[-1].call.output_tokens for r in without],
        "same_output": len(texts) == 1,
        "model": model, "runs": runs, "max_tokens": max_tokens, "flush_interval_s": flush_interval_s,
        "goals": {"throughput_ratio": 0.98, "messages_per_s": 20.0},
        "ok": ratio >= 0.98 and messages_per_s <= 20.0,
    }
