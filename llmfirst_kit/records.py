"""Records: what one model call and one pipeline run leave behind.

Records hold raw observations only (monotonic ``time.perf_counter_ns()`` stamps, texts, token counts as
the backend reported them). Every derived figure (TTFT, TPOT, ...) is computed from them in
``llmfirst_kit.metrics``; nothing here does arithmetic on time.

They are pydantic models: typed, checked when built or read back (``from_dict``), written as JSON
(``to_dict``); fields a later version adds are ignored when an older kit reads its log. Assignment is not
validated: a call's record is filled in as its tokens stream.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Record(BaseModel):
    """What every record shares: a plain-JSON form and back."""

    model_config = ConfigDict(extra="ignore")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)


class CallRecord(Record):
    """One streamed model call, as observed by the client.

    ``start_ns`` is taken just before the backend call is issued (after prompt building).
    ``chunk_ns[i]`` is the arrival time of the i-th non-empty content chunk and ``chunk_tokens[i]``
    how many output tokens it carried (a chunk can hold several tokens, e.g. a Korean syllable split
    over two byte-level tokens).
    """

    call_id: str
    backend: str
    model: str
    params: dict[str, Any] = Field(default_factory=dict)
    started_at: str = Field(default_factory=utc_now)
    start_ns: int = 0
    end_ns: int = 0  # when the call returned (after its final statistics)
    chunk_ns: list[int] = Field(default_factory=list)
    chunk_tokens: list[int] = Field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    token_count_source: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    status: str = "running"  # running | ok | cancelled | error
    error: str | None = None
    load_s: float | None = None  # model load paid by this call (embedded load or Ollama load_duration)
    cold_load: bool = False
    server: dict[str, Any] = Field(default_factory=dict)  # server-side timings in ns, as the server gave them
    # a server's own per-request timings beside the client's clock (llama-server's ``timings``, cached prompt
    # tokens from OpenAI ``usage``): {"source": ..., "raw": {...as sent}, normalised fields}; None: none sent
    server_timings: dict[str, Any] | None = None
    model_info: dict[str, Any] = Field(default_factory=dict)
    choice: dict[str, Any] | None = None  # a choice call: options, their probabilities, the one chosen
    run_id: str | None = None  # the pipeline run this call belongs to (None: a call on its own)
    warmup: bool = False


class StageRecord(Record):
    name: str
    visible: bool
    call: CallRecord
    wait_ns: int = 0  # run start -> this stage's request start


class DecisionRecord(Record):
    """One decision of a run: what the model chose and what the run went on with.

    ``value`` is the model's structured output (None: undecided); ``used`` is what the run acted on: the
    model's value, or the configured default when the model made no decision (``source`` "kit default",
    ``status`` "undecided"). ``method`` says how the decision was read: ``"structured output"`` (JSON schema),
    ``"next-token choice"`` (the options' next-token probabilities after one prefill, kept in
    ``probabilities``; ``mass`` = their share of all probability; a calibrated choice keeps the model's
    probabilities, the prior they were divided by and the calibrated ones, which decided, in ``calibration``
    and ``probabilities``) or ``"free text"`` (the rewritten query:
    ``structured`` False, not a decision among options, so not counted in decision compliance). A strategy
    also records its ``plan``: which later stages run, which wait for a decision, which are skipped, and
    each stage's budget.
    """

    value: Any = None
    used: Any = None
    status: str = "decided"  # decided | undecided
    source: str = "model"  # model | kit default
    method: str = "structured output"  # structured output | next-token choice | free text
    call_id: str | None = None
    problem: str | None = None  # why the model's output was not a decision (undecided)
    cut_by_limit: bool = False  # the token limit, not the model, ended the decision's call
    probabilities: dict[str, float] | None = None
    mass: float | None = None
    calibration: dict[str, Any] | None = None  # method, prior, queries, computed_s / file (this run), raw
    plan: dict[str, Any] | None = None
    structured: bool = True

    @property
    def by_model(self) -> bool:
        return self.status == "decided" and self.source == "model"


class RunRecord(Record):
    """One pipeline run: its stages (each one model call), its decisions and the kit prompts it sent. What a
    person saw is each sink's own record (``compliance.Transcript``)."""

    run_id: str
    preset: str
    query: str
    started_at: str = Field(default_factory=utc_now)
    start_ns: int = 0
    end_ns: int = 0
    status: str = "running"  # running | ok | cancelled | error
    error: str | None = None
    stages: list[StageRecord] = Field(default_factory=list)
    decisions: dict[str, DecisionRecord] = Field(default_factory=dict)  # by name: strategy, quality, ...
    kit_prompts: list[str] = Field(default_factory=list)  # the kit-written prompt texts sent (prompt-echo check)
    quality: dict[str, Any] | None = None
    labels: dict[str, Any] = Field(default_factory=dict)  # study parameters: model, quantization, repeat...
    environment: dict[str, Any] = Field(default_factory=dict)  # CPU, the embedded engine's configuration
    warmup: bool = False

    def answer_call(self, *, or_last: bool = False) -> CallRecord | None:
        """The call whose text is the run's answer, the one definition every report uses: its last visible stage's
        (a revision the judge decided comes after the draft, a review is not shown); None when no visible stage
        ran, or with ``or_last`` the last stage's call (a run that failed before its answer)."""
        visible = [s for s in self.stages if s.visible]
        if visible:
            return visible[-1].call
        return self.stages[-1].call if or_last and self.stages else None
