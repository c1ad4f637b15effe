"""Events a pipeline run emits, in order, to every sink (CLI, widget, server, study runner).

Each event carries ``t_ns`` (``time.perf_counter_ns()``), taken by the pipeline before any sink sees the
event, so a slow sink never changes a measured latency. A :class:`Token` carries the arrival stamp of
its chunk and the id of the model call that produced it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .records import CallRecord, RunRecord


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    run_id: str
    t_ns: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (records flattened to dicts)."""
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class StageStart(Event):
    type: ClassVar[str] = "stage_start"
    stage: str
    model: str
    call_id: str
    visible: bool


@dataclass(frozen=True)
class Token(Event):
    type: ClassVar[str] = "token"
    stage: str
    call_id: str
    text: str
    tokens: int | None
    visible: bool


@dataclass(frozen=True)
class StageEnd(Event):
    type: ClassVar[str] = "stage_end"
    stage: str
    call_id: str
    status: str
    metrics: dict[str, Any]
    record: CallRecord


@dataclass(frozen=True)
class Decision(Event):
    """A decision a model returned as structured output (or ``undecided`` and the configured default)."""

    type: ClassVar[str] = "decision"
    stage: str
    name: str
    value: Any
    status: str  # decided | undecided
    call_id: str


@dataclass(frozen=True)
class RunEnd(Event):
    type: ClassVar[str] = "run_end"
    status: str
    metrics: dict[str, Any]
    record: RunRecord


@dataclass(frozen=True)
class Error(Event):
    type: ClassVar[str] = "error"
    stage: str | None
    code: str
    message: str
