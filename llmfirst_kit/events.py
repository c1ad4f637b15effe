"""Events a pipeline run emits, in order, to every sink (CLI, widget, server, study runner).

Each event carries ``t_ns`` (``time.perf_counter_ns()``), taken by the pipeline before any sink sees the
event, so a slow sink never changes a measured latency. A :class:`Token` carries the arrival stamp of
its chunk and the id of the model call that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .records import CallRecord, RunRecord

if TYPE_CHECKING:
    from .compliance import Transcript
    from .metrics import CallMetrics, RunMetrics


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"
    run_id: str
    t_ns: int


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
    metrics: CallMetrics
    record: CallRecord


@dataclass(frozen=True)
class Decision(Event):
    """A decision a model returned as structured output. ``undecided``: the model's output failed twice,
    ``value`` is None and the run uses ``used``, the configured default (``source="kit default"``): a sink shows
    it as undecided, never as the model's."""

    type: ClassVar[str] = "decision"
    stage: str
    name: str
    value: Any  # what the model decided; None when undecided
    status: str  # decided | undecided
    call_id: str
    used: Any = None  # what the run goes on with: the model's value, or the kit's default
    source: str = "model"  # model | kit default
    probabilities: dict[str, float] | None = None  # a choice's option probabilities (calibrated where it was)
    calibration: dict[str, Any] | None = None  # a calibrated choice: the model's raw probabilities and its prior

    def how(self) -> str:
        """How a choice was read, in one line a person understands (empty for other decisions): the option
        probabilities the decision came from and, for a calibrated one, the model's raw probabilities and the
        prior they were divided by -- so a raw option is never mistaken for the decision."""
        def probs(p: dict[str, float]) -> str:
            return " · ".join(f"{o.strip()} {v:.2f}" for o, v in sorted(p.items(), key=lambda kv: -kv[1]))

        cal = self.calibration or {}
        if cal.get("raw") and cal.get("prior") and self.probabilities:
            return (f"calibrated: the model's next-token probabilities {probs(cal['raw'])}, divided by its prior on "
                    f"{cal.get('queries', '?')} other queries ({probs(cal['prior'])}), give {probs(self.probabilities)}")
        if self.probabilities:
            return f"the model's next-token probabilities {probs(self.probabilities)}"
        return ""


@dataclass(frozen=True)
class RunEnd(Event):
    type: ClassVar[str] = "run_end"
    status: str
    metrics: RunMetrics
    record: RunRecord


@dataclass(frozen=True)
class Error(Event):
    type: ClassVar[str] = "error"
    stage: str | None
    code: str
    message: str


@runtime_checkable
class Sink(Protocol):
    """Anything that shows a run to a person: the terminal (``sinks.console``), the notebook view
    (``sinks.live_view``), the server's WebSocket and HTTP APIs. It gets every event in order (``handle``) and
    keeps a transcript of exactly what it emitted, from which its LLM-first compliance is computed
    (:func:`llmfirst_kit.compliance.sink_compliance`)."""

    name: str
    transcript: "Transcript"

    def handle(self, event: Event) -> Any:
        ...


class RecordLog(Protocol):
    """Where a run appends each model call's record as the call ends (``sinks.jsonl.RunLog``: a JSONL file,
    fsynced), so that a crash mid-run keeps every finished call."""

    def append(self, record: Any) -> None:
        ...
