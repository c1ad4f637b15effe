"""An Ollama-compatible HTTP API over the embedded models (the routes of Ollama's docs/api.md that a client
needs to chat: version, tags, show, ps, generate, chat).

What a client gets, as Ollama documents it:

- NDJSON streaming (``application/x-ndjson``, the default) or one JSON object with ``"stream": false``;
- the final object carries ``done_reason`` and durations in nanoseconds, measured for real from the
  call's ``perf_counter_ns`` stamps (the request's arrival is the handler's first line):
  ``load_duration`` = arrival -> request start (model load when cold, chat template, tokenization,
  grammar); ``prompt_eval_duration`` = model granted -> first token (the wait for the model's FIFO lock is
  left out, as Ollama leaves out its queue); ``eval_duration`` = first token -> end of generation;
  ``total_duration`` = arrival -> end (queue wait included, so the parts add up to less than the total
  when the request waited, as in Ollama); ``prompt_eval_count`` / ``eval_count`` are exact token counts;
  ``prompt_eval_cached_count`` is how many of the prompt's tokens came from the model's KV cache (the
  prefix it shares with what the model evaluated last, e.g. the same conversation sent again, or just the
  chat template's opening after another conversation; the last prompt token is always evaluated again, for
  its logits, so an identical prompt reports ``prompt_eval_count - 1``);
- ``options``: ``num_predict``, ``temperature``, ``seed``, ``top_k``, ``top_p``, ``stop``, ``num_ctx``
  (Ollama's defaults when absent: temperature 0.8, top_k 40, top_p 0.9, random seed, num_predict -1 =
  until the context is full). Hardware options (``num_thread``, ``num_gpu``...) are accepted and ignored;
  sampling options this server cannot honour (``repeat_penalty``...) are refused with 400 rather than
  silently dropped, so a measured result never comes from settings other than the ones asked for;
- ``format``: a JSON schema (structured output) or ``"json"`` (any JSON object);
- errors as ``{"error": "..."}``: 404 for an unknown model, 400 for a bad body, 503 ``"server busy, ..."``
  past the model's queue cap (as Ollama past ``OLLAMA_MAX_QUEUE``), naming the fix.

Model names are the kit's registry names, with an optional ``:latest`` tag. Paths to local files are
refused: a remote client must not make the server open files by name.

The call itself (plan, checks, streaming, cancellation when the client leaves) is
:mod:`llmfirst_kit.serve.calls`; this module says what Ollama's requests and answers look like.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..backends import Backend
from ..errors import KitError
from ..models import REGISTRY, known_names, status as model_status
from ..records import CallRecord
from .calls import (ERROR_DESCRIPTIONS, NDJSON, NDJSON_LINES, ApiError, CallResponse, Format, Options, Plan,
                    StrictBody, backend_of, chat_messages, openapi_body, planned_call, read_json_body)
from .security import TAG, registry_model

# Ollama's defaults for a model without a Modelfile of its own (the ones `ollama show` lists).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
SUPPORTED_OPTIONS = ("num_predict", "temperature", "seed", "top_k", "top_p", "stop", "num_ctx")
# load-time and hardware options: they change where and how fast a model runs, not what it writes
IGNORED_OPTIONS = frozenset({
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap",
    "use_mlock", "embedding_only", "num_thread", "num_keep",
})


# ------------------------------------------------------------------------------------- request bodies

class GenerateBody(StrictBody):
    model: str = Field(min_length=1)
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool = True
    raw: bool | None = None
    format: Format = None
    images: list[str] | None = None
    options: Options | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(StrictBody):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None


class ShowRequestBody(StrictBody):
    model: str | None = None
    name: str | None = Field(None, description="the older spelling of model")


# ------------------------------------------------------------------------ response shapes (for the docs)

class ErrorBody(BaseModel):
    error: str


class VersionBody(BaseModel):
    version: str


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str | None = None
    families: list[str] | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str | None = None
    size: int
    digest: str
    details: ModelDetails


class TagsBody(BaseModel):
    models: list[ListedModel]


class RunningModel(ListedModel):
    size_vram: int = 0
    context_length: int


class PsBody(BaseModel):
    models: list[RunningModel]


class ShowBody(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str | None = None


class _Final(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_cached_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateChunk(_Final):
    response: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChunk(_Final):
    message: AssistantMessage


def _doc_responses(ok: type[BaseModel] | None = None, *, stream: bool = False) -> dict[int | str, Any]:
    """OpenAPI ``responses``: the success shape (JSON, and NDJSON lines when streamed) and every error."""
    out: dict[int | str, Any] = {code: {"model": ErrorBody, "description": d}
                                 for code, d in ERROR_DESCRIPTIONS.items()}
    if ok is not None:
        out[200] = {"model": ok}
        if stream:
            out[200]["content"] = {NDJSON: {"schema": {"$ref": f"#/components/schemas/{ok.__name__}"}}}
    return out


# ------------------------------------------------------------------------------ listing and metadata

def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _details(name: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    spec = REGISTRY[name]
    arch = (metadata or {}).get("general.architecture")
    return ModelDetails(family=arch, families=[arch] if arch else None, parameter_size=spec.parameters,
                        quantization_level=spec.quantization).model_dump()


def _modified_at(path: str | None) -> str | None:
    if not path or not os.path.exists(path):
        return None
    return datetime.fromtimestamp(os.path.getmtime(path), timezone.utc).isoformat().replace("+00:00", "Z")


def list_models() -> list[dict[str, Any]]:
    """``/api/tags``: the registry models whose packages are installed (nothing is hashed or loaded)."""
    out = []
    for name in known_names():
        row = model_status(name)
        if not row["installed"]:
            continue
        spec = REGISTRY[name]
        out.append({"name": name + TAG, "model": name + TAG, "modified_at": _modified_at(row.get("path")),
                    "size": spec.size, "digest": spec.sha256, "details": _details(name)})
    return out


def running_models(backend: Backend) -> list[dict[str, Any]]:
    """``/api/ps``: every loaded model (one row per context size), with its batch: ``parallel`` sequences decoded
    at once (Ollama's OLLAMA_NUM_PARALLEL), how many are decoding and how many calls wait."""
    return [{"name": m.name + TAG, "model": m.name + TAG, "size": os.path.getsize(m.path), "digest": m.sha256,
             "details": _details(m.name, m.metadata), "size_vram": 0, "context_length": m.n_ctx,
             "parallel": m.parallel, "active": m.active, "waiting": m.waiting}
            for m in backend.loaded() if m.name in REGISTRY]


_METADATA: dict[str, dict[str, str]] = {}


def model_metadata(backend: Backend, name: str) -> dict[str, str]:
    """The GGUF's key-value metadata, read once per process."""
    if name not in _METADATA:
        _METADATA[name] = backend.model_metadata(name)
    return _METADATA[name]


def _typed(value: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def show_model(backend: Backend, name: str) -> dict[str, Any]:
    meta = model_metadata(backend, name)
    spec = REGISTRY[name]
    params = "\n".join(f"{k} {v}" for k, v in OLLAMA_DEFAULTS.items())
    info = {k: _typed(v) for k, v in meta.items() if not k.startswith("tokenizer.chat_template")}
    return {
        "modelfile": f"# {spec.title}, served by llmfirst_kit {__version__} from {spec.file}\nFROM {spec.file}\n",
        "parameters": params,
        "template": meta.get("tokenizer.chat_template", ""),
        "details": _details(name, meta),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": _modified_at(model_status(name).get("path")),
    }


# --------------------------------------------------------------------------------- checking the call

def refuse_unsupported(body: GenerateBody | ChatBody, model: str) -> None:
    """400 for features the embedded models cannot serve, naming what to send instead."""
    if body.think:
        raise ApiError(400, f"{model!r} does not support thinking; leave out 'think'")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported by this server; leave out 'logprobs'")
    if isinstance(body, GenerateBody):
        if body.suffix:
            raise ApiError(400, f"{model!r} does not support insert (suffix); send the prompt only")
        if body.template:
            raise ApiError(400, "a custom template is not supported: the model's own chat template is applied; "
                                "leave out 'template'")
        if body.raw:
            raise ApiError(400, "raw prompts are not supported: the model's chat template is always applied; "
                                "leave out 'raw'")
        if body.context:
            raise ApiError(400, "'context' is not supported; send the conversation as messages to /api/chat")
        if body.images:
            raise ApiError(400, f"{model!r} does not support images")
    else:
        if body.tools:
            raise ApiError(400, f"{model!r} does not support tools; leave out 'tools'")
        for m in body.messages or []:
            if m.images:
                raise ApiError(400, f"{model!r} does not support images")
    options = body.options or Options()
    unknown = sorted(set(options.model_extra or {}) - IGNORED_OPTIONS)
    if unknown:
        raise ApiError(400, f"option(s) {', '.join(unknown)} not supported by this server; supported: "
                            f"{', '.join(SUPPORTED_OPTIONS)} (hardware options such as num_thread are ignored)")


def generate_messages(body: GenerateBody) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": body.system}] if body.system else []
    return messages + [{"role": "user", "content": body.prompt or ""}]


def cached_prompt_tokens(rec: CallRecord) -> int | None:
    """Prompt tokens served from the KV cache: the prompt's tokens less the ones the engine evaluated (the
    embedded backend's ``server["prompt_eval_tokens"]``); None when either count is unknown."""
    evaluated = rec.server.get("prompt_eval_tokens")
    if rec.prompt_tokens is None or evaluated is None:
        return None
    return max(0, rec.prompt_tokens - int(evaluated))


def durations(rec: CallRecord, received_ns: int) -> dict[str, Any]:
    """Ollama's final statistics from the call record (all nanoseconds, all measured)."""
    granted = rec.start_ns + int(rec.server.get("queue_ns", 0))
    first = rec.chunk_ns[0] if rec.chunk_ns else rec.end_ns
    return {
        "done_reason": rec.finish_reason,
        "total_duration": rec.end_ns - received_ns,
        "load_duration": rec.start_ns - received_ns,
        "prompt_eval_count": rec.prompt_tokens,
        "prompt_eval_cached_count": cached_prompt_tokens(rec),
        "prompt_eval_duration": max(0, first - granted),
        "eval_count": rec.output_tokens,
        "eval_duration": max(0, rec.end_ns - first),
    }


# ------------------------------------------------------------------------------------- the response

Render = Callable[[str], dict[str, Any]]


class OllamaAnswer:
    """A call's answer as Ollama shapes it: ``render(text)`` objects with ``"done": false`` as NDJSON lines,
    then one with ``"done": true`` and the final statistics (or ``{"error": ...}`` when the call failed)."""

    framing = NDJSON_LINES

    def __init__(self, render: Render, received_ns: int):
        self.render = render
        self.received_ns = received_ns

    def chunk(self, text: str, first: bool) -> dict[str, Any]:
        return {**self.render(text), "done": False}

    def _final(self, rec: CallRecord, text: str) -> dict[str, Any]:
        return {**self.render(text), "done": True, **durations(rec, self.received_ns)}

    def tail(self, rec: CallRecord) -> list[dict[str, Any]]:
        return [self._final(rec, "")]

    def stream_error(self, exc: KitError) -> dict[str, Any]:
        return {"error": str(exc)}  # mid-stream: Ollama sends an error line

    def whole(self, rec: CallRecord) -> dict[str, Any]:
        return self._final(rec, rec.text)

    def error(self, status: int, message: str) -> dict[str, Any]:
        return {"error": message}


# ----------------------------------------------------------------------------------------- routes

router = APIRouter(prefix="/api", tags=["ollama"])


BODY_MODELS: tuple[type[BaseModel], ...] = (GenerateBody, ChatBody, ShowRequestBody)


@router.get("/version", responses=_doc_responses(VersionBody), summary="Server version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/tags", responses=_doc_responses(TagsBody), summary="Models this server can run")
async def tags() -> JSONResponse:
    return JSONResponse({"models": await asyncio.to_thread(list_models)})


@router.get("/ps", responses=_doc_responses(PsBody), summary="Models loaded in memory")
async def ps(request: Request) -> JSONResponse:
    return JSONResponse({"models": running_models(backend_of(request))})


@router.post("/show", responses=_doc_responses(ShowBody), openapi_extra=openapi_body(ShowRequestBody),
             summary="A model's details, metadata and chat template")
async def show(request: Request) -> JSONResponse:
    body = await read_json_body(request, ShowRequestBody)
    given = body.model or body.name
    if not given:
        raise ApiError(400, "the body has no 'model'; send {\"model\": \"<name>\"}")
    return JSONResponse(await asyncio.to_thread(show_model, backend_of(request), registry_model(given)))


@router.post("/generate", responses=_doc_responses(GenerateChunk, stream=True),
             openapi_extra=openapi_body(GenerateBody), summary="Complete a prompt")
async def generate(request: Request) -> Response:
    received = time.perf_counter_ns()
    body = await read_json_body(request, GenerateBody)
    model = registry_model(body.model)
    refuse_unsupported(body, body.model)

    def render(text: str) -> dict[str, Any]:
        return {"model": body.model, "created_at": created_at(), "response": text}

    if not body.prompt:  # Ollama: an empty prompt loads the model and answers done_reason "load"
        return await _load_only(request, model, render, body.stream)
    plan = Plan(model, generate_messages(body), body.options or Options(), body.format, body.stream, OLLAMA_DEFAULTS)
    return await _respond(request, plan, render, received)


@router.post("/chat", responses=_doc_responses(ChatChunk, stream=True), openapi_extra=openapi_body(ChatBody),
             summary="Answer a conversation")
async def chat(request: Request) -> Response:
    received = time.perf_counter_ns()
    body = await read_json_body(request, ChatBody)
    model = registry_model(body.model)
    refuse_unsupported(body, body.model)
    messages = chat_messages(body)

    def render(text: str) -> dict[str, Any]:
        return {"model": body.model, "created_at": created_at(), "message": {"role": "assistant", "content": text}}

    if not messages:  # Ollama: no messages loads the model and answers done_reason "load"
        return await _load_only(request, model, render, body.stream)
    plan = Plan(model, messages, body.options or Options(), body.format, body.stream, OLLAMA_DEFAULTS)
    return await _respond(request, plan, render, received)


async def _respond(request: Request, plan: Plan, render: Render, received: int) -> CallResponse:
    return CallResponse(await planned_call(request, plan), OllamaAnswer(render, received), stream=plan.stream)


async def _load_only(request: Request, model: str, render: Render, stream: bool) -> Response:
    await asyncio.to_thread(backend_of(request).load, model)
    final = {**render(""), "done": True, "done_reason": "load"}
    if stream:
        return Response(NDJSON_LINES.frame(final), media_type=NDJSON)
    return JSONResponse(final)
