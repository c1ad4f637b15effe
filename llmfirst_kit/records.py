"""Records: what one model call and one pipeline run leave behind.

Records hold raw observations only (monotonic ``time.perf_counter_ns()`` stamps, texts, token counts as
the backend reported them). Every derived figure (TTFT, TPOT, ...) is computed from them in
``llmfirst_kit.metrics``; nothing here does arithmetic on time.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class CallRecord:
    """One streamed model call, as observed by the client.

    ``start_ns`` is taken just before the backend call is issued (after prompt building).
    ``chunk_ns[i]`` is the arrival time of the i-th non-empty content chunk and ``chunk_tokens[i]``
    how many output tokens it carried (a chunk can hold several tokens, e.g. a Korean syllable split
    over two byte-level tokens).
    """

    call_id: str
    backend: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=utc_now)
    start_ns: int = 0
    end_ns: int = 0  # when the call returned (after its final statistics)
    chunk_ns: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    token_count_source: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    status: str = "running"  # running | ok | cancelled | error
    error: str | None = None
    load_s: float | None = None  # model load paid by this call (embedded load or Ollama load_duration)
    cold_load: bool = False
    server: dict[str, Any] = field(default_factory=dict)  # server-side timings in ns, as the server gave them
    # a server's own per-request timings beside the client's clock (llama-server's ``timings``, cached prompt
    # tokens from OpenAI ``usage``): {"source": ..., "raw": {...as sent}, normalised fields}; None: none sent
    server_timings: dict[str, Any] | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    choice: dict[str, Any] | None = None  # a choice call: options, their probabilities, the one chosen
    run_id: str | None = None  # the pipeline run this call belongs to (None: a call on its own)
    warmup: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CallRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StageRecord:
    name: str
    visible: bool
    call: CallRecord
    wait_ns: int = 0  # run start -> this stage's request start


@dataclass
class RunRecord:
    """One pipeline run: its stages (each one model call), its decisions and the kit prompts it sent. What a
    person saw is each sink's own record (``compliance.Transcript``)."""

    run_id: str
    preset: str
    query: str
    started_at: str = field(default_factory=utc_now)
    start_ns: int = 0
    end_ns: int = 0
    status: str = "running"  # running | ok | cancelled | error
    error: str | None = None
    stages: list[StageRecord] = field(default_factory=list)
    decisions: dict[str, Any] = field(default_factory=dict)
    kit_prompts: list[str] = field(default_factory=list)  # the kit-written prompt texts sent (prompt-echo check)
    quality: dict[str, Any] | None = None
    labels: dict[str, Any] = field(default_factory=dict)  # study parameters: model, quantization, repeat...
    environment: dict[str, Any] = field(default_factory=dict)  # CPU, the embedded engine's configuration
    warmup: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        data = dict(data)
        data["stages"] = [
            StageRecord(name=s["name"], visible=s["visible"], call=CallRecord.from_dict(s["call"]),
                        wait_ns=s.get("wait_ns", 0))
            for s in data.get("stages", [])
        ]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
