"""Records: what one model call and one pipeline run leave behind.

Records hold raw observations only (monotonic ``time.perf_counter_ns()`` stamps, texts, token counts as
the backend reported them). Every derived figure (TTFT, TPOT, ...) is computed from them in
``llmfirst_kit.metrics``; nothing here does arithmetic on time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator


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


class RunLog:
    """Append-only JSONL log. Each record is written and fsync'ed as soon as it is finished, so a crash
    loses at most the call in progress."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: CallRecord | RunRecord) -> None:
        kind = "run" if isinstance(record, RunRecord) else "call"
        line = json.dumps({"kind": kind, **record.to_dict()}, ensure_ascii=False)
        # after a crash mid-write the file ends in a torn line: start on a fresh line, or this record is lost too
        prefix = "\n" if _ends_torn(self.path) else ""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(prefix + line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def __iter__(self) -> Iterator[CallRecord | RunRecord]:
        return iter(read_log(self.path))


def _ends_torn(path: Path) -> bool:
    """True if the file exists, is not empty and does not end with a newline."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


class CorruptLog(ValueError):
    """Lines of a run log that are not records (other than a torn last line)."""


def read_log(path: str | os.PathLike[str], *, strict: bool = False,
             problems: list[str] | None = None) -> list[CallRecord | RunRecord]:
    """Read a JSONL run log. A torn last line (a crash mid-write) is expected and skipped. Any other line
    that is not a record is reported, never skipped silently: appended to ``problems`` as
    ``"FILE:LINE: what"`` if given, else warned about (``strict=True``: raises :class:`CorruptLog`)."""
    out: list[CallRecord | RunRecord] = []
    found: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
            kind = data.pop("kind", "call")
            out.append(RunRecord.from_dict(data) if kind == "run" else CallRecord.from_dict(data))
        except (json.JSONDecodeError, AttributeError, TypeError, KeyError) as exc:
            if i == last and isinstance(exc, json.JSONDecodeError):
                continue  # the torn last line of a crash mid-write
            found.append(f"{path}:{i + 1}: not a record ({type(exc).__name__}: {exc}; a line torn by an earlier "
                         f"crash, or corruption); it stays in the file: fix or delete it")
    if found:
        if strict:
            raise CorruptLog("; ".join(found))
        if problems is not None:
            problems.extend(found)
        else:
            import warnings

            warnings.warn(f"{len(found)} corrupt line(s) in {path}: " + "; ".join(found[:3]), stacklevel=2)
    return out


def write_log(path: str | os.PathLike[str], records: Iterable[CallRecord | RunRecord]) -> None:
    log = RunLog(path)
    for r in records:
        log.append(r)
