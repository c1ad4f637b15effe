"""Benchmarks: side-by-side ratios measured in one run (:mod:`._ab`, the interleaved A/B runner) --
``overhead`` (kit vs raw llama-cpp-python), ``pipeline`` (presets' user-visible TTFT), ``decisions`` (the
strategy decision's choices and their agreement with labels, raw vs calibrated), ``engine`` (extra buffers on
vs off) -- and load: ``ws_load`` (concurrent WebSocket clients) and ``load_sweep`` (latency and
throughput against concurrency). Each is a ``llmfirst bench`` command.

The names below are imported on first use (``from llmfirst_kit.bench import sweep`` loads only the load
sweep, not the server). The overhead, pipeline and decisions benchmarks are ``bench.overhead.overhead``,
``bench.pipeline.pipeline`` and ``bench.decisions.decisions`` (their modules' names)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LONG_PROMPT": "overhead", "PIPELINE_QUERIES": "pipeline",
    "compare": "engine",
    "bench_serve": "ws_load", "bench_serve_async": "ws_load", "format_bench": "ws_load",
    "LoadLevel": "load_sweep", "format_sweep": "load_sweep", "load_target": "load_sweep",
    "parse_concurrency": "load_sweep", "sweep": "load_sweep", "sweep_queries": "load_sweep",
    "target_of": "load_sweep", "view_overhead": "view",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = sorted(_EXPORTS)
