"""The HTTP call plumbing the Ollama and OpenAI APIs share: reading and checking a body, planning the model
call (context size, token budget, structured output, sampling defaults), and streaming it back.

An API module only says what its requests and answers look like. It parses its body into a :class:`Plan`
(:func:`planned_call` turns that into a checked model call) and answers with a :class:`CallResponse` given
an :class:`AnswerShape` (the objects of its answer) and a :class:`Framing` (how they go on the wire): NDJSON
lines (:data:`NDJSON_LINES`, Ollama) or server-sent events (:data:`SSE_EVENTS`, OpenAI), interchangeable.

Leaving early is cheap: a client that disconnects (streamed or not) cancels its call, and decoding stops
within one token step.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Mapping, Protocol

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..backends.base import Backend, CallRequest, ModelCall
from ..errors import BackendUnavailable, ContextOverflow, InvalidInput, KitError, QueueFull, UnknownModel
from ..compliance import Transcript, sink_compliance
from ..records import CallRecord, RunRecord, StageRecord
from .config import ServerConfig

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
ERROR_DESCRIPTIONS = {
    400: "bad request body", 401: "token missing or wrong", 403: "origin or host not allowed",
    404: "unknown model", 413: "body too large", 500: "backend failure", 503: "backend unavailable",
}


class ApiError(Exception):
    """An HTTP error with ``status``, answered in the shape of the API of its path."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def status_of(exc: KitError) -> int:
    """The HTTP status for a kit error (as Ollama gives it)."""
    if isinstance(exc, UnknownModel):
        return 404
    if isinstance(exc, InvalidInput):  # includes ContextOverflow
        return 400
    if isinstance(exc, (BackendUnavailable, QueueFull)):  # QueueFull: as Ollama past OLLAMA_MAX_QUEUE
        return 503
    return 500


# ------------------------------------------------------------------------------------- request bodies

class StrictBody(BaseModel):
    """A request body. Strict: ``"stream": "true"`` or ``"num_predict": "5"`` is a bad body (400), as in
    Ollama's Go decoder; unknown top-level fields are ignored, as Ollama ignores them."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


# The sampling options of a call, in Ollama's ``options`` shape (the OpenAI API translates into it). No
# docstring: it would become the schema's description in the OpenAPI document.
class Options(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    num_predict: int | None = Field(None, ge=-2, description="max tokens; -1 or -2: until the context is full")
    temperature: float | None = Field(None, ge=0)
    seed: int | None = Field(None, description="negative: a random seed")
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: list[str] | None = None
    num_ctx: int | None = Field(None, ge=1)


Format = Literal["", "json"] | dict[str, Any] | None


def parse_body(raw: bytes, model: type[StrictBody]) -> Any:
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise ApiError(400, describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    """A pydantic error as one line that points at the field (``options.temperature: ...``)."""
    parts = []
    for err in exc.errors()[:3]:
        if err["type"] == "json_invalid":
            return f"the body is not valid JSON ({err['msg']}); send one JSON object"
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        parts.append(f"{loc or 'body'}: {err['msg']}")
    return "invalid request body: " + "; ".join(dict.fromkeys(parts))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes without reading all of it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {declared} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over {limit} bytes; this server takes at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, model: type[StrictBody]) -> Any:
    """The request's body, size-capped and parsed into ``model`` (400 / 413 naming the problem)."""
    return parse_body(await read_body(request, config_of(request).max_body_bytes), model)


def config_of(request: Request) -> ServerConfig:
    return request.app.state.kit.config


def backend_of(request: Request) -> Backend:
    """The backend the HTTP APIs serve (the embedded models of this process)."""
    return request.app.state.kit.embedded


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """The documented request body (read by hand: Ollama's clients and curl examples send JSON under any
    content type, which FastAPI's own body parsing would refuse)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def chat_messages(body: Any) -> list[dict[str, str]]:
    """The messages of a chat body (Ollama's /api/chat or OpenAI's /v1/chat/completions), checked."""
    messages = [{"role": m.role, "content": m.content} for m in body.messages or []]
    for m in messages:
        if m["role"] not in ("system", "user", "assistant"):
            raise ApiError(400, f"message role {m['role']!r} is not supported; use system, user or assistant")
    if messages and messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message is from {messages[-1]['role']!r}; end the conversation with a "
                            f"user message (continuing an assistant message is not supported)")
    return messages


# ------------------------------------------------------------------------------- building the call

@dataclass
class Plan:
    """Everything checked and decided before the call is issued."""

    model: str  # registry name
    messages: list[dict[str, str]]
    options: Options
    format: Format
    stream: bool
    defaults: Mapping[str, float]  # the API's temperature, top_k and top_p when the client sends none


def context_size(num_ctx: int | None, limit: int, default: int) -> int:
    """The context to load: the backend's default, or the next power of two that holds ``num_ctx`` (so a
    client cannot make the server load one model copy per distinct value)."""
    if num_ctx is None or num_ctx <= default:
        return default
    if num_ctx > limit:
        raise ApiError(400, f"num_ctx {num_ctx} is larger than this server allows ({limit}); lower num_ctx")
    size = default
    while size < num_ctx:
        size *= 2
    return size


def format_schema(fmt: Format) -> dict[str, Any] | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "object"}  # Ollama's "json": a JSON object, as llama.cpp's json grammar
    return fmt  # type: ignore[return-value]


def plan_call(plan: Plan, backend: Backend, config: ServerConfig) -> CallRequest:
    """The CallRequest for a plan (runs in a worker thread: it may load the model and tokenize)."""
    opts = plan.options
    default = backend.default_n_ctx or config.max_num_ctx
    n_ctx = context_size(opts.num_ctx, config.max_num_ctx, default)
    schema = format_schema(plan.format)
    if schema is not None:
        problem = backend.schema_problem(schema, plan.model, n_ctx)
        if problem:
            raise ApiError(400, f"format: {problem}")
    if opts.num_predict is None or opts.num_predict < 0:  # Ollama's -1 / -2: until the context is full
        budget = n_ctx - (backend.prompt_tokens(plan.messages, plan.model, n_ctx) or 0)
        if budget <= 0:
            raise ContextOverflow(f"the prompt fills the whole context of {n_ctx} tokens; shorten it or raise "
                                  f"num_ctx (up to {config.max_num_ctx})")
    elif opts.num_predict == 0:
        raise ApiError(400, "num_predict 0 asks for no tokens; give a positive number, or -1 for no limit")
    else:
        budget = opts.num_predict
    if config.max_predict:
        budget = min(budget, config.max_predict)
    seed = None if opts.seed is None or opts.seed < 0 else opts.seed % 2**32
    defaults = plan.defaults
    return CallRequest(
        messages=plan.messages, model=plan.model, max_tokens=budget,
        temperature=defaults["temperature"] if opts.temperature is None else opts.temperature,
        seed=seed, top_k=defaults["top_k"] if opts.top_k is None else opts.top_k,
        top_p=defaults["top_p"] if opts.top_p is None else opts.top_p,
        stop=[s for s in opts.stop or [] if s], json_schema=schema,
        num_ctx=None if n_ctx == default else n_ctx,
    )


async def planned_call(request: Request, plan: Plan) -> ModelCall:
    """The model call for a plan, checked and ready to stream (planning may load the model: in a thread)."""
    backend = backend_of(request)
    return backend.call(await asyncio.to_thread(plan_call, plan, backend, config_of(request)))


# ------------------------------------------------------------------------------------- the response

class Framing:
    """How the objects of a streamed answer go on the wire: a media type, one frame per object, and what
    closes the stream."""

    media_type: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    terminator: bytes = b""  # sent after the last object (empty: the last object closes the stream)

    def frame(self, obj: dict[str, Any]) -> bytes:
        raise NotImplementedError


class NdjsonFraming(Framing):
    """One JSON object per line (Ollama)."""

    media_type = NDJSON

    def frame(self, obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


class SseFraming(Framing):
    """Server-sent events, ``data: {json}`` each, then ``data: [DONE]`` (OpenAI)."""

    media_type = SSE
    headers = ((b"cache-control", b"no-cache"),)
    terminator = b"data: [DONE]\n\n"

    def frame(self, obj: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


NDJSON_LINES = NdjsonFraming()
SSE_EVENTS = SseFraming()


class AnswerShape(Protocol):
    """What one API's answer to a model call looks like."""

    framing: Framing  # when streamed

    def chunk(self, text: str, first: bool) -> dict[str, Any]:
        """The object carrying one content chunk of a streamed answer."""

    def tail(self, rec: CallRecord) -> list[dict[str, Any]]:
        """The objects after the content of a streamed answer that ended (final statistics...)."""

    def stream_error(self, exc: KitError) -> dict[str, Any]:
        """The object that ends a stream that failed midway (the text already sent stays sent)."""

    def whole(self, rec: CallRecord) -> dict[str, Any]:
        """The answer of a call that was not streamed, once it has ended."""

    def error(self, status: int, message: str) -> dict[str, Any]:
        """An error body, answered with ``status`` before anything else was sent."""


class CallResponse(Response):
    """Streams one model call (``shape.framing``), or answers it as one JSON object when not streamed.

    A plain ASGI response rather than Starlette's StreamingResponse because the status must wait for the
    call's first result (an error found while preparing the call is a 400/404, not a broken 200 stream),
    and because a non-streamed call must also stop when its client goes away: it listens for
    ``http.disconnect`` all along and cancels the call, which stops decoding within one token step.
    """

    def __init__(self, call: ModelCall, shape: AnswerShape, *, stream: bool):
        super().__init__(media_type=shape.framing.media_type if stream else "application/json")
        self.call = call
        self.shape = shape
        self.stream = stream
        self.transcript = Transcript("http")  # the model text this response put in its bodies, as sent

    def _sink_figures(self, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` (the last object of the answer) with this response's own compliance under ``llmfirst``: its
        bodies' content against the call's output (an extra key; clients of both APIs ignore keys they do not
        know). The client wrote the prompt, so nothing the model repeats of it is the kit's."""
        run = RunRecord(run_id=self.call.record.call_id, preset="api", query="",
                        stages=[StageRecord(name="answer", visible=True, call=self.call.record)])
        report = sink_compliance(run, self.transcript)
        return {**obj, "llmfirst": {"compliance": report.compliance, "sink": report.to_dict()}}

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        produce = asyncio.create_task(self._produce(send))
        watch = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({produce, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (produce, watch):
                task.cancel()
            await asyncio.gather(produce, watch, return_exceptions=True)
        if produce.done() and not produce.cancelled() and produce.exception() is not None:
            raise produce.exception()  # a bug, not a model error: let the server log it and answer 500

    async def _produce(self, send: Callable) -> None:
        chunks: AsyncIterator[Any] = aiter(self.call)
        try:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except KitError as exc:
                await send_json(send, status_of(exc), self.shape.error(status_of(exc), str(exc)))
                return
            if self.stream:
                await self._stream(send, chunks, first)
            else:
                await self._whole(send, chunks, first)
        finally:
            await chunks.aclose()  # a cancelled response (client gone) stops the model call here

    async def _stream(self, send: Callable, chunks: AsyncIterator[Any], first: Any) -> None:
        framing = self.shape.framing
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", framing.media_type.encode()), *framing.headers]})
        try:
            if first is not None:
                self.transcript.content("answer", first.text)
                await _send_frame(send, framing.frame(self.shape.chunk(first.text, True)))
                async for chunk in chunks:
                    self.transcript.content("answer", chunk.text)
                    await _send_frame(send, framing.frame(self.shape.chunk(chunk.text, False)))
            tail = self.shape.tail(self.call.record)
            if tail:
                tail[-1] = self._sink_figures(tail[-1])
        except KitError as exc:  # mid-stream: an error object; the text already sent stays sent
            tail = [self.shape.stream_error(exc)]
        frames = [framing.frame(obj) for obj in tail] + ([framing.terminator] if framing.terminator else [])
        for body in frames[:-1]:
            await _send_frame(send, body)
        await send({"type": "http.response.body", "body": frames[-1], "more_body": False})

    async def _whole(self, send: Callable, chunks: AsyncIterator[Any], first: Any) -> None:
        try:
            if first is not None:
                async for _ in chunks:
                    pass
        except KitError as exc:
            await send_json(send, status_of(exc), self.shape.error(status_of(exc), str(exc)))
            return
        self.transcript.content("answer", self.call.record.text)  # the whole answer goes in the one body
        await send_json(send, 200, self._sink_figures(self.shape.whole(self.call.record)))


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_frame(send: Callable, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def send_json(send: Callable, status: int, obj: dict[str, Any]) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
