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

Leaving early is cheap: a client that disconnects (streamed or not) cancels its call, and decoding stops
within one token step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .backends.base import CallRequest, ModelCall
from .backends.embedded import DEFAULT_N_CTX, EmbeddedBackend, grammar_problem, loaded_models
from .errors import BackendUnavailable, ContextOverflow, InvalidInput, KitError, QueueFull, UnknownModel
from .models import REGISTRY, known_names, status as model_status
from .records import CallRecord

NDJSON = "application/x-ndjson"
TAG = ":latest"

# Ollama's defaults for a model without a Modelfile of its own (the ones `ollama show` lists).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
SUPPORTED_OPTIONS = ("num_predict", "temperature", "seed", "top_k", "top_p", "stop", "num_ctx")
# load-time and hardware options: they change where and how fast a model runs, not what it writes
IGNORED_OPTIONS = frozenset({
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap",
    "use_mlock", "embedding_only", "num_thread", "num_keep",
})


class ApiError(Exception):
    """An HTTP error answered as Ollama answers: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def status_of(exc: KitError) -> int:
    """The HTTP status Ollama would give for a kit error."""
    if isinstance(exc, UnknownModel):
        return 404
    if isinstance(exc, InvalidInput):  # includes ContextOverflow
        return 400
    if isinstance(exc, (BackendUnavailable, QueueFull)):  # QueueFull: as Ollama past OLLAMA_MAX_QUEUE
        return 503
    return 500


# ------------------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # strict: "stream": "true" or "num_predict": "5" is a bad body (400), as in Ollama's Go decoder;
    # unknown top-level fields are ignored, as Ollama ignores them
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


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


class GenerateBody(_Body):
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


class ChatBody(_Body):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None


class ShowRequestBody(_Body):
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
    errors = {
        400: "bad request body", 401: "token missing or wrong", 403: "origin or host not allowed",
        404: "unknown model", 413: "body too large", 500: "backend failure", 503: "backend unavailable",
    }
    out: dict[int | str, Any] = {code: {"model": ErrorBody, "description": d} for code, d in errors.items()}
    if ok is not None:
        out[200] = {"model": ok}
        if stream:
            out[200]["content"] = {NDJSON: {"schema": {"$ref": f"#/components/schemas/{ok.__name__}"}}}
    return out


# ------------------------------------------------------------------------------------------- helpers

def registry_model(name: str) -> str:
    """A registry name from a client's model name (``smollm2-135m`` or ``smollm2-135m:latest``)."""
    base = name[: -len(TAG)] if name.endswith(TAG) else name
    if base in REGISTRY:
        return base
    raise UnknownModel(f"model {name!r} not found; known: {', '.join(known_names())}")


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_body(raw: bytes, model: type[_Body]) -> Any:
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


def _config(request: Request) -> Any:
    return request.app.state.kit.config


def _backend(request: Request) -> EmbeddedBackend:
    return request.app.state.kit.embedded


# ------------------------------------------------------------------------------ listing and metadata

def _details(name: str, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    spec = REGISTRY[name]
    arch = (metadata or {}).get("general.architecture")
    return ModelDetails(family=arch, families=[arch] if arch else None, parameter_size=spec.parameters,
                        quantization_level=spec.quantization).model_dump()


def _modified_at(path: str | None) -> str | None:
    import os

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


def running_models() -> list[dict[str, Any]]:
    """``/api/ps``: every loaded model (one row per context size)."""
    out = []
    for lm in loaded_models():
        name = lm.resolved.name
        if name not in REGISTRY:
            continue
        out.append({"name": name + TAG, "model": name + TAG, "size": lm.resolved.path.stat().st_size,
                    "digest": lm.resolved.sha256, "details": _details(name, lm.llm.metadata),
                    "size_vram": 0, "context_length": lm.n_ctx})
    return out


_METADATA: dict[str, dict[str, str]] = {}


def model_metadata(name: str) -> dict[str, str]:
    """The GGUF's key-value metadata (from the loaded model, else a vocab-only load: no weights)."""
    if name in _METADATA:
        return _METADATA[name]
    loaded = [lm for lm in loaded_models() if lm.resolved.name == name]
    if loaded:
        meta = dict(loaded[0].llm.metadata)
    else:
        from .engine import new_llama
        from .models import resolve

        llm = new_llama(str(resolve(name).path), vocab_only=True)
        meta = dict(llm.metadata)
        llm.close()
    _METADATA[name] = meta
    return meta


def _typed(value: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def show_model(name: str) -> dict[str, Any]:
    meta = model_metadata(name)
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


# ------------------------------------------------------------------------------- building the call

@dataclass
class Plan:
    """Everything checked and decided before the call is issued."""

    model: str  # registry name
    messages: list[dict[str, str]]
    options: Options
    format: Format
    stream: bool


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


def context_size(num_ctx: int | None, limit: int) -> int:
    """The context to load: the default, or the next power of two that holds ``num_ctx`` (so a client
    cannot make the server load one model copy per distinct value)."""
    if num_ctx is None or num_ctx <= DEFAULT_N_CTX:
        return DEFAULT_N_CTX
    if num_ctx > limit:
        raise ApiError(400, f"num_ctx {num_ctx} is larger than this server allows ({limit}); lower num_ctx")
    size = DEFAULT_N_CTX
    while size < num_ctx:
        size *= 2
    return size


def format_schema(fmt: Format) -> dict[str, Any] | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "object"}  # Ollama's "json": a JSON object, as llama.cpp's json grammar
    return fmt  # type: ignore[return-value]


def plan_call(plan: Plan, backend: EmbeddedBackend, config: Any) -> CallRequest:
    """The CallRequest for a plan (runs in a worker thread: it may load the model and tokenize)."""
    opts = plan.options
    n_ctx = context_size(opts.num_ctx, config.max_num_ctx)
    schema = format_schema(plan.format)
    loaded = None
    if schema is not None:
        loaded = backend.load(plan.model, n_ctx)
        problem = grammar_problem(schema, loaded)
        if problem:
            raise ApiError(400, f"format: {problem}")
    if opts.num_predict is None or opts.num_predict < 0:  # Ollama's -1 / -2: until the context is full
        loaded = loaded or backend.load(plan.model, n_ctx)
        budget = n_ctx - len(loaded.format_prompt(plan.messages))
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
    return CallRequest(
        messages=plan.messages, model=plan.model, max_tokens=budget,
        temperature=OLLAMA_DEFAULTS["temperature"] if opts.temperature is None else opts.temperature,
        seed=seed, top_k=OLLAMA_DEFAULTS["top_k"] if opts.top_k is None else opts.top_k,
        top_p=OLLAMA_DEFAULTS["top_p"] if opts.top_p is None else opts.top_p,
        stop=[s for s in opts.stop or [] if s], json_schema=schema,
        num_ctx=None if n_ctx == DEFAULT_N_CTX else n_ctx,
    )


def durations(rec: CallRecord, received_ns: int) -> dict[str, Any]:
    """Ollama's final statistics from the call record (all nanoseconds, all measured)."""
    granted = rec.start_ns + int(rec.server.get("queue_ns", 0))
    first = rec.chunk_ns[0] if rec.chunk_ns else rec.end_ns
    return {
        "done_reason": rec.finish_reason,
        "total_duration": rec.end_ns - received_ns,
        "load_duration": rec.start_ns - received_ns,
        "prompt_eval_count": rec.prompt_tokens,
        "prompt_eval_duration": max(0, first - granted),
        "eval_count": rec.output_tokens,
        "eval_duration": max(0, rec.end_ns - first),
    }


# ------------------------------------------------------------------------------------- the response

Render = Callable[[str], dict[str, Any]]


class CallResponse(Response):
    """Streams one model call as Ollama does (NDJSON lines, or one JSON object when not streamed).

    A plain ASGI response rather than Starlette's StreamingResponse because the status must wait for the
    call's first result (an error found while preparing the call is a 400/404, not a broken 200 stream),
    and because a non-streamed call must also stop when its client goes away: it listens for
    ``http.disconnect`` all along and cancels the call, which stops decoding within one token step.
    """

    def __init__(self, call: ModelCall, render: Render, *, stream: bool, received_ns: int):
        super().__init__(media_type=NDJSON if stream else "application/json")
        self.call = call
        self.render = render
        self.stream = stream
        self.received_ns = received_ns

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

    def error(self, status: int, message: str) -> dict[str, Any]:
        """An error body, shaped as the API this response belongs to (Ollama: ``{"error": message}``)."""
        return {"error": message}

    def _final(self, text: str) -> dict[str, Any]:
        return {**self.render(text), "done": True, **durations(self.call.record, self.received_ns)}

    async def _produce(self, send: Callable) -> None:
        chunks: AsyncIterator[Any] = aiter(self.call)
        try:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except KitError as exc:
                await _send_json(send, status_of(exc), self.error(status_of(exc), str(exc)))
                return
            if self.stream:
                await self._stream(send, chunks, first)
            else:
                await self._whole(send, chunks, first)
        finally:
            await chunks.aclose()  # a cancelled response (client gone) stops the model call here

    async def _stream(self, send: Callable, chunks: AsyncIterator[Any], first: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", NDJSON.encode())]})
        try:
            if first is not None:
                await _send_line(send, {**self.render(first.text), "done": False})
                async for chunk in chunks:
                    await _send_line(send, {**self.render(chunk.text), "done": False})
            final = self._final("")
        except KitError as exc:  # mid-stream: Ollama sends an error line; the text already sent stays sent
            final = {"error": str(exc)}
        await send({"type": "http.response.body", "body": _line(final), "more_body": False})

    async def _whole(self, send: Callable, chunks: AsyncIterator[Any], first: Any) -> None:
        try:
            if first is not None:
                async for _ in chunks:
                    pass
        except KitError as exc:
            await _send_json(send, status_of(exc), self.error(status_of(exc), str(exc)))
            return
        await _send_json(send, 200, self.whole_body())

    def whole_body(self) -> dict[str, Any]:
        """The answer of a call that was not streamed, once it has ended."""
        return self._final(self.call.record.text)


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


async def _send_line(send: Callable, obj: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": _line(obj), "more_body": True})


async def _send_json(send: Callable, status: int, obj: dict[str, Any]) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------- routes

router = APIRouter(prefix="/api", tags=["ollama"])


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """The documented request body (read by hand: Ollama's clients and curl examples send JSON under any
    content type, which FastAPI's own body parsing would refuse)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


BODY_MODELS: tuple[type[BaseModel], ...] = (GenerateBody, ChatBody, ShowRequestBody)


@router.get("/version", responses=_doc_responses(VersionBody), summary="Server version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@router.get("/tags", responses=_doc_responses(TagsBody), summary="Models this server can run")
async def tags() -> JSONResponse:
    return JSONResponse({"models": await asyncio.to_thread(list_models)})


@router.get("/ps", responses=_doc_responses(PsBody), summary="Models loaded in memory")
async def ps() -> JSONResponse:
    return JSONResponse({"models": running_models()})


@router.post("/show", responses=_doc_responses(ShowBody), openapi_extra=_openapi_body(ShowRequestBody),
             summary="A model's details, metadata and chat template")
async def show(request: Request) -> JSONResponse:
    body = parse_body(await read_body(request, _config(request).max_body_bytes), ShowRequestBody)
    given = body.model or body.name
    if not given:
        raise ApiError(400, "the body has no 'model'; send {\"model\": \"<name>\"}")
    return JSONResponse(await asyncio.to_thread(show_model, registry_model(given)))


@router.post("/generate", responses=_doc_responses(GenerateChunk, stream=True),
             openapi_extra=_openapi_body(GenerateBody), summary="Complete a prompt")
async def generate(request: Request) -> Response:
    received = time.perf_counter_ns()
    body = parse_body(await read_body(request, _config(request).max_body_bytes), GenerateBody)
    model = registry_model(body.model)
    refuse_unsupported(body, body.model)

    def render(text: str) -> dict[str, Any]:
        return {"model": body.model, "created_at": created_at(), "response": text}

    if not body.prompt:  # Ollama: an empty prompt loads the model and answers done_reason "load"
        return await _load_only(request, model, render, body.stream)
    plan = Plan(model, generate_messages(body), body.options or Options(), body.format, body.stream)
    return await _respond(request, plan, render, received)


@router.post("/chat", responses=_doc_responses(ChatChunk, stream=True), openapi_extra=_openapi_body(ChatBody),
             summary="Answer a conversation")
async def chat(request: Request) -> Response:
    received = time.perf_counter_ns()
    body = parse_body(await read_body(request, _config(request).max_body_bytes), ChatBody)
    model = registry_model(body.model)
    refuse_unsupported(body, body.model)
    messages = chat_messages(body)

    def render(text: str) -> dict[str, Any]:
        return {"model": body.model, "created_at": created_at(), "message": {"role": "assistant", "content": text}}

    if not messages:  # Ollama: no messages loads the model and answers done_reason "load"
        return await _load_only(request, model, render, body.stream)
    plan = Plan(model, messages, body.options or Options(), body.format, body.stream)
    return await _respond(request, plan, render, received)


async def planned_call(request: Request, plan: Plan) -> ModelCall:
    """The model call for a plan, checked and ready to stream (planning may load the model: in a thread)."""
    backend = _backend(request)
    return backend.call(await asyncio.to_thread(plan_call, plan, backend, _config(request)))


async def _respond(request: Request, plan: Plan, render: Render, received: int) -> CallResponse:
    return CallResponse(await planned_call(request, plan), render, stream=plan.stream, received_ns=received)


async def _load_only(request: Request, model: str, render: Render, stream: bool) -> Response:
    await asyncio.to_thread(_backend(request).load, model)
    final = {**render(""), "done": True, "done_reason": "load"}
    if stream:
        return Response(_line(final), media_type=NDJSON)
    return JSONResponse(final)
