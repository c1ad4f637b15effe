"""An OpenAI-compatible API over the embedded models: ``GET /v1/models`` and ``POST /v1/chat/completions``,
as Ollama (docs/openai.md) and vLLM serve them, so any OpenAI client -- the kit's own ``openai`` backend
first -- can use the kit's models.

What a client gets:

- server-sent events (``"stream": true``: ``chat.completion.chunk`` objects, then ``data: [DONE]``) or one
  ``chat.completion`` object; the last chunk carries the ``finish_reason``;
- ``usage`` with exact token counts (the embedded backend's own count): in the ``chat.completion``, and
  when streaming as one more chunk with empty ``choices`` if ``stream_options.include_usage`` is set;
- sampling: ``max_tokens`` (or ``max_completion_tokens``; absent: until the context is full),
  ``temperature`` and ``top_p`` (OpenAI's defaults: 1), ``seed``, ``stop``, and ``top_k`` as vLLM takes it
  (``extra_body``); anything this server cannot honour (``n`` > 1, penalties, ``logit_bias``, tools,
  logprobs) is refused with 400 rather than silently ignored;
- ``response_format``: ``json_schema`` (OpenAI's form), ``json_object``, and ``json_object`` with a
  ``schema`` (llama-cpp-python's form);
- errors as OpenAI shapes them, ``{"error": {"message", "type", "code"}}``: 404 for an unknown model, 400
  for a bad body, naming the fix. The server's token, if any, is the API key (``Authorization: Bearer``).

The call itself is the Ollama routes' (:mod:`llmfirst_kit.serve.calls`: the same plan and checks, the same
cancellation when the client goes away); only the request and response shapes differ.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..errors import KitError
from ..models import known_names
from ..records import CallRecord
from .calls import (ERROR_DESCRIPTIONS, SSE, SSE_EVENTS, ApiError, CallResponse, Options, Plan, StrictBody,
                    chat_messages, openapi_body, planned_call, read_json_body, status_of)
from .security import registry_model

DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # OpenAI's; top_k 0: off (no such OpenAI option)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 503: "server_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": None,
                      "code": None}}


# ------------------------------------------------------------------------------------- request bodies

class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str = Field(description="text only: this server has no image or audio input")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="llama-cpp-python's json_object form")


class ChatCompletionBody(StrictBody):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, description="not OpenAI's; vLLM and llama.cpp take it (extra_body)")
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None


def refuse_unsupported(body: ChatCompletionBody) -> None:
    """400 for what this server cannot honour, so that a result never comes from other settings."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n}: this server makes one choice per request; send n=1 or leave it out")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported by this server; leave it out or send 0")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server; leave it out")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported by this server; leave out 'logprobs'")
    if body.tools:
        raise ApiError(400, f"{body.model!r} does not support tools; leave out 'tools'")
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise ApiError(400, "response_format json_schema needs a 'json_schema' object with a 'schema'")


def format_of(fmt: ResponseFormat | None) -> str | dict[str, Any] | None:
    """The Ollama ``format`` for a ``response_format``: a JSON schema, ``"json"`` or none."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        return fmt.json_schema.schema_  # type: ignore[union-attr]
    return fmt.schema_ or "json"


def options_of(body: ChatCompletionBody) -> Options:
    """The call's sampling options (absent ones take :data:`DEFAULTS` when the call is planned)."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    limit = body.max_completion_tokens or body.max_tokens
    return Options(num_predict=-1 if limit is None else limit, temperature=body.temperature, top_p=body.top_p,
                   top_k=body.top_k, seed=body.seed, stop=stop)


# ------------------------------------------------------------------------ response shapes (for the docs)

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


BODY_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionBody,)


def _doc_responses(ok: type[BaseModel], *, stream: bool = False) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {code: {"model": ErrorBody, "description": d}
                                 for code, d in ERROR_DESCRIPTIONS.items()}
    out[200] = {"model": ok}
    if stream:  # server-sent events, each `data: {chat.completion.chunk as JSON}`, the last `data: [DONE]`
        out[200]["content"] = {SSE: {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {
                "type": "string", "description": "a chat.completion.chunk (JSON), or [DONE]"}}}}}
    return out


# ------------------------------------------------------------------------------------- the response

def usage_of(rec: CallRecord) -> dict[str, int]:
    prompt, completion = rec.prompt_tokens or 0, rec.output_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class CompletionAnswer:
    """A call's answer as a ``chat.completion``, or as server-sent ``chat.completion.chunk`` events: the
    first with the assistant's role, the last with the ``finish_reason``, then the usage if asked for."""

    framing = SSE_EVENTS

    def __init__(self, call_id: str, *, model: str, include_usage: bool):
        self.model = model
        self.include_usage = include_usage
        self.id = f"chatcmpl-{call_id}"
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def chunk(self, text: str, first: bool) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": text} if first else {"content": text})

    def tail(self, rec: CallRecord) -> list[dict[str, Any]]:
        out = [self._chunk({}, rec.finish_reason)]
        if self.include_usage:
            out.append({**self._chunk({}), "choices": [], "usage": usage_of(rec)})
        return out

    def stream_error(self, exc: KitError) -> dict[str, Any]:
        return error_body(status_of(exc), str(exc))  # mid-stream: an error event, as vLLM sends

    def whole(self, rec: CallRecord) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": rec.text},
                             "finish_reason": rec.finish_reason}],
                "usage": usage_of(rec)}

    def error(self, status: int, message: str) -> dict[str, Any]:
        return error_body(status, message)


# ----------------------------------------------------------------------------------------- routes

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", responses=_doc_responses(ModelList), summary="Models this server can run (OpenAI shape)")
async def models() -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                     "owned_by": "llmfirst_kit"} for name in known_names()]})


@router.post("/chat/completions", responses=_doc_responses(ChatCompletion, stream=True),
             openapi_extra=openapi_body(ChatCompletionBody), summary="Answer a conversation (OpenAI shape)")
async def chat_completions(request: Request) -> Response:
    body = await read_json_body(request, ChatCompletionBody)
    model = registry_model(body.model)
    refuse_unsupported(body)
    plan = Plan(model, chat_messages(body), options_of(body), format_of(body.response_format), body.stream,
                DEFAULTS)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    call = await planned_call(request, plan)
    answer = CompletionAnswer(call.record.call_id, model=body.model, include_usage=include_usage)
    return CallResponse(call, answer, stream=body.stream)
