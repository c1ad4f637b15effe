"""llmfirst_kit: streaming LLM-first pipelines with exact latency metrics, for Jupyter and studies.

The public API (imported on first use, so ``import llmfirst_kit`` stays light)::

    from llmfirst_kit import Pipeline, Stage, get_backend, CallRequest, RunRecord, run_sync, events
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "pipeline", "Stage": "pipeline", "PRESET_NAMES": "pipeline",
    "get_backend": "backends", "CallRequest": "backends", "Backend": "backends",
    "CallRecord": "records", "RunRecord": "records", "DecisionRecord": "records",
    "Sink": "events", "Transcript": "compliance", "sink_compliance": "compliance",
    "run_sync": "sync",
}
_MODULES = ("events", "metrics", "compliance", "records")


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = sorted([*_EXPORTS, *_MODULES])
