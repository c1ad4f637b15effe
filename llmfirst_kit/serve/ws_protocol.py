"""The WebSocket protocol of ``/ws``: what a client may send (pydantic models, checked against the server's
limits), what the server sends back, and the checks a client can run on one run's messages.

The client sends JSON text messages:

- a run: ``{"query": "...", "preset": "direct", "model": "smollm2-135m", "backend": "embedded"}`` plus
  optional ``max_tokens``, ``rewrite``, ``review``, ``ref`` (a client's label, echoed on ``start``,
  ``complete`` and a refusal) and ``"type": "run"`` (the default). Unknown fields are refused; ``null``
  is the same as leaving a field out.
- a cancel: ``{"type": "cancel"}`` cancels the current run; with ``"run_id"`` or ``"ref"`` it cancels that
  run, running or waiting. Cancelling a run that already ended does nothing.

Every message the server sends has ``type``, ``run_id``, ``seq`` (0, 1, 2... within the run, so a client can
check that nothing was lost, duplicated or reordered) and ``t_ns`` (the server's monotonic clock,
``perf_counter_ns``, taken when the event happened; differences are durations):

- ``start``: ref, preset, backend, model, stages, max_tokens (ids and figures only);
- ``stage_start`` (stage, model, call_id, visible), ``chunk`` (stage, call_id, content, tokens, visible),
  ``stage_end`` (stage, call_id, status, finish_reason, output_chars, metrics), ``decision`` (stage, name,
  value, status, call_id) -- the pipeline's events as they happen;
- ``error``: ``code`` (machine-readable) and ``detail`` (names the fix). With ``run_id`` null it refuses a
  message (bad JSON, unknown field, unknown model or preset, query too long...), and the connection stays
  open; within a run it is followed by that run's ``complete``;
- ``complete``: status (ok | cancelled | error), the run's metrics, and ``compliance`` / ``sink``: this
  WebSocket's own figure, from the chunk contents it sent of the shown stages (``compliance.sink_compliance``).

No message carries text the server wrote for a person to read: every word of content is a model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..backends.registry import DEFAULT_BACKEND
from ..errors import InvalidInput
from ..events import Decision, Error, Event, RunEnd, StageEnd, StageStart, Token
from ..metrics import RunMetrics
from .config import ServerConfig
from .security import backend_refusal

RUN_FIELDS = ("type", "query", "preset", "model", "backend", "max_tokens", "rewrite", "review", "ref")
CANCEL_FIELDS = ("type", "run_id", "ref")
MAX_REF_CHARS = 128
EXPECTED = {"string_type": "a string", "int_type": "an integer", "bool_type": "true or false"}


class ProtocolError(InvalidInput):
    """A WebSocket message the server refuses; ``code`` says which rule it broke."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------- client messages

class _ClientMessage(BaseModel):
    """A client message: exact JSON types (``"max_tokens": "5"`` is refused), no unknown fields, ``null``
    the same as absent. A refusal's ``code`` is the error type of the first problem, in field order."""

    model_config = ConfigDict(strict=True, frozen=True)

    @classmethod
    def _known_fields(cls, data: Any, allowed: tuple[str, ...], what: str) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise PydanticCustomError("unknown_field", f"unknown field(s) {', '.join(_short(k) for k in unknown)}; "
                                                       f"{what} takes: {', '.join(allowed)}")
        return {k: v for k, v in data.items() if k != "type" and v is not None}


class RunRequest(_ClientMessage):
    # checked in this order (the first problem is the one reported)
    query: str = Field("", validate_default=True)  # absent, not a string or blank: refused
    max_tokens: int | None = None
    ref: str | None = None
    backend: str = DEFAULT_BACKEND
    preset: str = "direct"
    model: str | None = None
    rewrite: bool = False
    review: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, data: Any) -> Any:
        return cls._known_fields(data, RUN_FIELDS, "a run message")

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise PydanticCustomError("invalid_input", 'the message has no query; send {"query": "your question"}')
        limit = _config(info).max_query_chars
        if len(value) > limit:
            raise PydanticCustomError("query_too_long", f"the query is {len(value)} characters; this server takes "
                                                        f"at most {limit}; shorten it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate sent as a JSON escape ("\ud800")
            raise PydanticCustomError("invalid_input", f"the query holds a lone surrogate at character {exc.start}, "
                                                       "which is not valid Unicode; send valid UTF-8 text") from None
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _config(info).max_tokens_limit
        if value is not None and not 0 < value <= limit:
            raise PydanticCustomError("invalid_field", f"max_tokens must be between 1 and {limit}, got {value}")
        return value

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_REF_CHARS:
            raise PydanticCustomError("invalid_field", f"ref is {len(value)} characters; keep it under {MAX_REF_CHARS}")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str, info: ValidationInfo) -> str:
        value = value or DEFAULT_BACKEND
        refusal = backend_refusal(value, _config(info))
        if refusal:
            raise PydanticCustomError("backend_not_allowed", refusal)
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        return value or "direct"


class CancelRequest(_ClientMessage):
    run_id: str | None = None
    ref: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, data: Any) -> Any:
        return cls._known_fields(data, CANCEL_FIELDS, "a cancel message")


def _config(info: ValidationInfo) -> ServerConfig:
    return (info.context or {}).get("config") or ServerConfig()


def parse_message(message: dict[str, Any], config: ServerConfig) -> RunRequest | CancelRequest:
    """A client's WebSocket message (an ASGI ``websocket.receive``) -> a request, or ProtocolError /
    InvalidInput naming the fix."""
    text = message.get("text")
    if text is None:
        raise ProtocolError("invalid_message", "binary messages are not read; send each message as JSON text")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > config.max_message_bytes:
        raise ProtocolError("message_too_large", f"the message is {size} bytes; this server takes at most "
                                                 f"{config.max_message_bytes} bytes per message; shorten the query")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" ({exc.msg} at character {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ProtocolError("invalid_json", f"the message is not valid JSON{where}; send one JSON object, e.g. "
                                            '{"query": "...", "model": "smollm2-135m"}') from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", f"the message is a JSON {type(data).__name__}; send one JSON object, "
                                               'e.g. {"query": "..."}')
    kind = data.get("type", "run")
    if kind == "cancel":
        model: type[_ClientMessage] = CancelRequest
    elif kind == "run":
        model = RunRequest
    else:
        raise ProtocolError("invalid_field", f"unknown message type {_short(kind)}; send 'run' (the default) or 'cancel'")
    try:
        return model.model_validate(data, context={"config": config})  # type: ignore[return-value]
    except ValidationError as exc:
        raise refusal(exc) from None


def refusal(exc: ValidationError) -> InvalidInput:
    """The first problem of a client message as the error the client gets."""
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    if kind in EXPECTED:
        name = ".".join(str(p) for p in err["loc"])
        return ProtocolError("invalid_field", f"{name} must be {EXPECTED[kind]}, got {_short(err['input'])}")
    if kind == InvalidInput.code:
        return InvalidInput(err["msg"])
    if kind in ("unknown_field", "query_too_long", "invalid_field", "backend_not_allowed"):
        return ProtocolError(kind, err["msg"])
    name = ".".join(str(p) for p in err["loc"]) or "the message"
    return ProtocolError("invalid_field", f"{name}: {err['msg']}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ server messages

MESSAGE_OVERHEAD_BYTES = 96  # type, ids, seq, stamp and keys of a message, roughly


@dataclass
class Outgoing:
    """One message on its way to a client; ``seq`` is given when it is sent (so merged chunks leave no gap)."""

    type: str
    run_id: str | None
    t_ns: int
    fields: dict[str, Any]
    size: int = 0

    def __post_init__(self) -> None:
        content = self.fields.get("content")
        body = len(content.encode()) if isinstance(content, str) else len(json.dumps(self.fields, default=str))
        self.size = MESSAGE_OVERHEAD_BYTES + body

    def mergeable(self, later: "Outgoing") -> bool:
        return self.type == later.type == "chunk" and self.fields["call_id"] == later.fields["call_id"]

    def merge(self, later: "Outgoing") -> int:
        """Absorb a later chunk of the same model call (the first chunk's stamp is kept); returns the bytes
        this message grew by."""
        self.fields["content"] += later.fields["content"]
        a, b = self.fields.get("tokens"), later.fields.get("tokens")
        self.fields["tokens"] = None if a is None or b is None else a + b
        grown = later.size - MESSAGE_OVERHEAD_BYTES
        self.size += grown
        return grown

    def render(self, seq: int | None) -> str:
        head: dict[str, Any] = {"type": self.type, "run_id": self.run_id}
        if seq is not None:
            head["seq"] = seq
        head["t_ns"] = self.t_ns
        return json.dumps({**head, **self.fields}, ensure_ascii=False, default=str)


def event_message(event: Event) -> Outgoing:
    """A pipeline event as a WebSocket message (figures and model text only)."""
    run_id, t = event.run_id, event.t_ns
    if isinstance(event, StageStart):
        return Outgoing("stage_start", run_id, t, {"stage": event.stage, "model": event.model,
                                                   "call_id": event.call_id, "visible": event.visible})
    if isinstance(event, Token):
        return Outgoing("chunk", run_id, t, {"stage": event.stage, "call_id": event.call_id, "content": event.text,
                                             "tokens": event.tokens, "visible": event.visible})
    if isinstance(event, StageEnd):
        return Outgoing("stage_end", run_id, t, {
            "stage": event.stage, "call_id": event.call_id, "status": event.status,
            "finish_reason": event.record.finish_reason, "output_chars": len(event.record.text),
            "metrics": event.metrics.as_dict()})
    if isinstance(event, Decision):
        return Outgoing("decision", run_id, t, {"stage": event.stage, "name": event.name, "value": event.value,
                                                "status": event.status, "call_id": event.call_id,
                                                "used": event.used, "source": event.source,
                                                "probabilities": event.probabilities,
                                                "calibration": {k: event.calibration[k] for k in ("raw", "prior", "queries")}
                                                if event.calibration else None, "how": event.how()})
    if isinstance(event, Error):
        return Outgoing("error", run_id, t, {"stage": event.stage, "code": event.code, "detail": event.message})
    if isinstance(event, RunEnd):
        return complete_message(run_id, t, event.status, event.metrics)
    raise TypeError(f"no message for event {type(event).__name__}")


def complete_message(run_id: str, t_ns: int, status: str, metrics: RunMetrics, ref: str | None = None) -> Outgoing:
    return Outgoing("complete", run_id, t_ns, {"ref": ref, "status": status, "metrics": metrics.as_dict(),
                                               "compliance": metrics.compliance})


# ------------------------------------------------------------------------ checking what a client got

def check_run_messages(messages: list[dict[str, Any]]) -> list[str]:
    """Problems with one run's messages as a client received them: ids, ``seq`` 0..n-1 (none lost,
    duplicated or reordered), start first and complete last, stages opened and closed, and every token of
    every model call delivered (chunk token counts add up to the call's output_tokens and the content to
    its output_chars). Empty when all is well."""
    if not messages:
        return ["no message"]
    problems = []
    run_ids = {m.get("run_id") for m in messages}
    if len(run_ids) != 1 or None in run_ids:
        problems.append(f"run ids {sorted(map(str, run_ids))}")
    seqs = [m.get("seq") for m in messages]
    if seqs != list(range(len(messages))):
        problems.append(f"seq {seqs[:8]}... is not 0..{len(messages) - 1}")
    types = [m.get("type") for m in messages]
    if types[0] != "start" or types[-1] != "complete" or types.count("start") != 1 or types.count("complete") != 1:
        problems.append(f"types {types[0]}...{types[-1]}: want one start first and one complete last")
    open_calls: dict[str, dict[str, Any]] = {}
    for m in messages:
        if m["type"] == "stage_start":
            open_calls[m["call_id"]] = {"tokens": 0, "chars": 0}
        elif m["type"] == "chunk":
            if m["call_id"] not in open_calls:
                problems.append(f"chunk outside its stage ({m['stage']})")
                continue
            open_calls[m["call_id"]]["tokens"] += m.get("tokens") or 0
            open_calls[m["call_id"]]["chars"] += len(m["content"])
        elif m["type"] == "stage_end":
            got = open_calls.pop(m["call_id"], None)
            if got is None:
                problems.append(f"stage_end without stage_start ({m['stage']})")
            elif m["status"] == "ok" and (got["tokens"] != m["metrics"]["output_tokens"]
                                          or got["chars"] != m["output_chars"]):
                problems.append(f"stage {m['stage']}: received {got['tokens']} tokens / {got['chars']} chars, the "
                                f"call made {m['metrics']['output_tokens']} / {m['output_chars']}")
    if open_calls:
        problems.append(f"stages never ended: {sorted(open_calls)}")
    return problems
