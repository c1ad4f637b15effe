"""llmfirst_kit: streaming LLM-first pipelines with exact latency metrics, for Jupyter and studies.

The public API (imported on first use, so ``import llmfirst_kit`` stays light)::

    from llmfirst_kit import Pipeline, Stage, get_backend, CallRequest, RunRecord, run_sync, events
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time each is imported on first use
    from . import compliance, events, metrics, records
    from .backends import Backend, CallRequest, get_backend
    from .compliance import Transcript, sink_compliance
    from .events import Sink
    from .pipeline import PRESET_NAMES, Pipeline, Stage
    from .records import CallRecord, DecisionRecord, RunRecord
    from .sync import run_sync

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
