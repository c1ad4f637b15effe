"""The kit's ASGI server: pipeline runs over a WebSocket, and an Ollama-compatible HTTP API
(:mod:`llmfirst_kit.ollama_api`) and an OpenAI-compatible one (:mod:`llmfirst_kit.openai_api`, under /v1)
over the embedded models. Served by uvicorn, on loopback by default.

WebSocket ``/ws``
-----------------

The client sends JSON text messages:

- a run: ``{"query": "...", "preset": "direct", "model": "smollm2-135m", "backend": "embedded"}`` plus
  optional ``max_tokens``, ``rewrite``, ``review``, ``ref`` (a client's label, echoed on ``start``,
  ``complete`` and a refusal) and ``"type": "run"`` (the default). Unknown fields are refused.
- a cancel: ``{"type": "cancel"}`` cancels the current run; with ``"run_id"`` or ``"ref"`` it cancels that
  run, running or waiting. Cancelling a run that already ended does nothing.

Runs of one connection run one after another, in the order they were sent. Every message the server
sends has ``type``, ``run_id``, ``seq`` (0, 1, 2... within the run, so a client can check that nothing was
lost, duplicated or reordered) and ``t_ns`` (the server's monotonic clock, ``perf_counter_ns``, taken when
the event happened; differences are durations):

- ``start``: ref, preset, backend, model, stages, max_tokens (ids and figures only);
- ``stage_start`` (stage, model, call_id, visible), ``chunk`` (stage, call_id, content, tokens, visible),
  ``stage_end`` (stage, call_id, status, finish_reason, output_chars, metrics), ``decision`` (stage, name,
  value, status, call_id) -- the pipeline's events as they happen;
- ``error``: ``code`` (machine-readable) and ``detail`` (names the fix). With ``run_id`` null it refuses a
  message (bad JSON, unknown field, unknown model or preset, query too long...), and the connection stays
  open; within a run it is followed by that run's ``complete``;
- ``complete``: status (ok | cancelled | error), the run's metrics and compliance.

No message carries text the server wrote for a person to read: every word of content is a model's.

Backpressure: each client has a bounded send buffer that never blocks generation. While a client reads
more slowly than the model writes, waiting ``chunk`` messages of the same model call merge into one
(content joined, token counts added), so nothing is lost and the buffer stays as small as the text itself.
A client whose buffer still grows past ``send_buffer_bytes`` (it stopped reading) is dropped: its runs are
cancelled and the socket is closed with code 1008. Model access is fair: the embedded backend's FIFO
lock serves calls in arrival order, and a slow client's generation does not wait for its reader.

A client that disconnects cancels its runs; decoding stops within one token step.

Security
--------

Loopback by default. Listening on any other address requires a token (``token=`` or ``LLMFIRST_TOKEN``),
checked on every HTTP request and WebSocket handshake (``Authorization: Bearer <token>``). Browsers are
held back too: a request with an ``Origin`` header must come from a loopback page (or an origin in
``allowed_origins``), and a loopback server without a token answers only to loopback ``Host`` names (DNS
rebinding).

A WebSocket run may use only the backends in ``allowed_backends`` (default: embedded; ``ollama`` and
``openai`` would spend the operator's own server and key); others get ``backend_not_allowed``. A connection
with no message and no run for ``idle_timeout_s`` gets an ``idle_timeout`` error and is closed (code 1000).
Past a model's queue cap (``max_queue``), a call is refused: 503 on HTTP, ``queue_full`` on the WebSocket.
Client JSON schemas are checked by :mod:`llmfirst_kit.backends.schema_guard` (no remote or file references,
bounded repetition counts) before anything reads them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, ollama_api, openai_api
from .backends import BACKENDS, Backend, get_backend
from .backends.embedded import EmbeddedBackend
from .errors import InvalidInput, KitError
from .events import Decision, Error, Event, RunEnd, StageEnd, StageStart, Token
from .metrics import call_metrics, run_metrics
from .pipeline import Pipeline, Run

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "LLMFIRST_TOKEN"


@dataclass(frozen=True)
class ServerConfig:
    """What an operator can set. The defaults suit one researcher's machine."""

    token: str | None = None  # required off loopback; checked on every request when set
    default_model: str | None = None  # embedded model for a run that names none (None: the kit's default)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides loopback pages, e.g. "https://lab.example"
    check_host: bool = True  # answer only loopback Host names (set off when listening elsewhere with a token)
    max_message_bytes: int = 64 * 1024  # one WebSocket message
    max_query_chars: int = 8000
    max_tokens_limit: int = 4096  # largest max_tokens a WebSocket run may ask for
    max_predict: int | None = None  # cap on the tokens of any one model call (HTTP and WebSocket); None: none
    max_pending_runs: int = 8  # runs waiting or running on one connection
    max_connections: int = 64
    send_buffer_bytes: int = 1 << 20  # per client; past it the client is dropped (close code 1008)
    max_body_bytes: int = 4 << 20  # one HTTP request body
    max_num_ctx: int = 8192  # largest context an Ollama client may ask for (num_ctx)
    preload: tuple[str, ...] = ()  # embedded models to load at start-up
    n_threads: int | None = None  # decoding threads of the embedded models (None: all cores)
    max_queue: int | None = None  # calls that may wait per model (None: $LLMFIRST_MAX_QUEUE, else 64); more: 503
    # backends a WebSocket run may pick: ollama and openai spend the operator's server or key (OPENAI_API_KEY)
    allowed_backends: tuple[str, ...] = ("embedded",)
    idle_timeout_s: float | None = 300.0  # close a WebSocket with no message and no run for this long; None: never


class TokenRequired(InvalidInput):
    code = "token_required"


class ProtocolError(InvalidInput):
    """A WebSocket message the server refuses; ``code`` says which rule it broke."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ security

def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); False for anything else, including
    0.0.0.0 and names that would need a DNS lookup."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen off loopback without a token."""
    if not is_loopback(host) and not token:
        raise TokenRequired(
            f"refusing to listen on {host!r} without a token: anyone who can reach that address could run models "
            f"on this machine; pass --token T (or set {TOKEN_ENV}), or listen on {DEFAULT_HOST}")


def _host_name(value: str) -> str | None:
    try:
        return urlsplit(value if "//" in value else f"//{value}").hostname
    except ValueError:
        return None


class Guard:
    """Checks every HTTP request and WebSocket handshake before the app sees it: the bearer token (when the
    server has one), the ``Origin`` (a browser page that is not loopback or allowed), and the ``Host``."""

    def __init__(self, app: Callable, config: ServerConfig):
        self.app = app
        self.token = config.token.encode() if config.token else None
        self.allowed_origins = frozenset(o.rstrip("/") for o in config.allowed_origins)
        self.check_host = config.check_host

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            problem = self.problem(Headers(scope=scope))
            if problem is not None:
                await _refuse(scope, receive, send, *problem)
                return
        await self.app(scope, receive, send)

    def problem(self, headers: Headers) -> tuple[int, str] | None:
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return 401, ("missing or wrong token; send the header 'Authorization: Bearer <token>' with the "
                             f"token the server was started with (--token or {TOKEN_ENV})")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin):
            return 403, (f"origin {origin!r} is not allowed; serve the page from localhost, or start the server "
                         f"with allowed_origins=({origin!r},)")
        host = headers.get("host")
        if self.check_host and host is not None and not is_loopback(_host_name(host) or ""):
            return 403, (f"host {host!r} is not a loopback name; connect to {DEFAULT_HOST} or localhost (to serve "
                         f"other names, listen on that address with a token)")
        return None

    def _origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/") in self.allowed_origins or is_loopback(_host_name(origin) or "")


def _error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """An HTTP error shaped as the API of its path: OpenAI's under /v1, Ollama's ``{"error": "..."}`` else."""
    if path.startswith(openai_api.router.prefix + "/"):
        return openai_api.error_body(status, message)
    return {"error": message}


async def _refuse(scope: dict, receive: Callable, send: Callable, status: int, message: str) -> None:
    """Answer ``{"error": message}`` (OpenAI's error shape under /v1) with ``status``; for a WebSocket,
    refuse the handshake."""
    body = json.dumps(_error_body(scope.get("path", ""), status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


# ------------------------------------------------------------------------------- client messages

RUN_FIELDS = ("type", "query", "preset", "model", "backend", "max_tokens", "rewrite", "review", "ref")
CANCEL_FIELDS = ("type", "run_id", "ref")
MAX_REF_CHARS = 128


@dataclass(frozen=True)
class RunRequest:
    query: str
    preset: str = "direct"
    model: str | None = None
    backend: str = "embedded"
    max_tokens: int | None = None
    rewrite: bool = False
    review: bool = False
    ref: str | None = None


@dataclass(frozen=True)
class CancelRequest:
    run_id: str | None = None
    ref: str | None = None


def parse_message(message: dict[str, Any], config: ServerConfig) -> RunRequest | CancelRequest:
    """A client's WebSocket message -> a request, or ProtocolError / InvalidInput naming the fix."""
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
        _check_fields(data, CANCEL_FIELDS, "a cancel message")
        return CancelRequest(run_id=_optional(data, "run_id", str), ref=_optional(data, "ref", str))
    if kind != "run":
        raise ProtocolError("invalid_field", f"unknown message type {_short(kind)}; send 'run' (the default) or 'cancel'")
    return _run_request(data, config)


def _run_request(data: dict[str, Any], config: ServerConfig) -> RunRequest:
    _check_fields(data, RUN_FIELDS, "a run message")
    query = data.get("query")
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput('the message has no query; send {"query": "your question"}')
    if len(query) > config.max_query_chars:
        raise ProtocolError("query_too_long", f"the query is {len(query)} characters; this server takes at most "
                                              f"{config.max_query_chars}; shorten it")
    max_tokens = _optional(data, "max_tokens", int)
    if max_tokens is not None and not 0 < max_tokens <= config.max_tokens_limit:
        raise ProtocolError("invalid_field", f"max_tokens must be between 1 and {config.max_tokens_limit}, "
                                             f"got {max_tokens}")
    ref = _optional(data, "ref", str)
    if ref is not None and len(ref) > MAX_REF_CHARS:
        raise ProtocolError("invalid_field", f"ref is {len(ref)} characters; keep it under {MAX_REF_CHARS}")
    backend = _optional(data, "backend", str) or "embedded"
    if backend in BACKENDS and backend not in config.allowed_backends:
        raise ProtocolError(
            "backend_not_allowed",
            f"backend {backend!r} is not enabled on this server: it would run on the operator's own {backend} "
            f"server and credentials; enabled: {', '.join(config.allowed_backends) or 'none'}. The operator can "
            f"enable it with `llmfirst serve --allow-backend {backend}` (ServerConfig(allowed_backends=...))")
    return RunRequest(
        query=query, preset=_optional(data, "preset", str) or "direct", model=_optional(data, "model", str),
        backend=backend, max_tokens=max_tokens,
        rewrite=bool(_optional(data, "rewrite", bool)), review=bool(_optional(data, "review", bool)), ref=ref,
    )


def _check_fields(data: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ProtocolError("unknown_field", f"unknown field(s) {', '.join(_short(k) for k in unknown)}; {what} "
                                             f"takes: {', '.join(allowed)}")


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "a string", int: "an integer", bool: "true or false"}[kind]
        raise ProtocolError("invalid_field", f"{name} must be {expected}, got {_short(value)}")
    return value


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


class Outbox:
    """A client's send buffer: never blocks the producer; merges waiting chunks of one call; reports
    overflow (``overflowed`` is set) once more than ``max_bytes`` wait."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.waiting_bytes = 0
        self.overflowed = asyncio.Event()
        self._items: collections.deque[Outgoing] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, item: Outgoing) -> bool:
        if self._items and self._items[-1].mergeable(item):
            self.waiting_bytes += self._items[-1].merge(item)
        else:
            self._items.append(item)
            self.waiting_bytes += item.size
        self._ready.set()
        if self.waiting_bytes > self.max_bytes:
            self.overflowed.set()
            return False
        return True

    async def get(self) -> Outgoing:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self.waiting_bytes -= item.size
        return item

    def __len__(self) -> int:
        return len(self._items)


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
            "metrics": event.metrics})
    if isinstance(event, Decision):
        return Outgoing("decision", run_id, t, {"stage": event.stage, "name": event.name, "value": event.value,
                                                "status": event.status, "call_id": event.call_id})
    if isinstance(event, Error):
        return Outgoing("error", run_id, t, {"stage": event.stage, "code": event.code, "detail": event.message})
    if isinstance(event, RunEnd):
        return complete_message(run_id, t, event.status, event.metrics)
    raise TypeError(f"no message for event {type(event).__name__}")


def complete_message(run_id: str, t_ns: int, status: str, metrics: dict[str, Any],
                     ref: str | None = None) -> Outgoing:
    return Outgoing("complete", run_id, t_ns, {"ref": ref, "status": status, "metrics": metrics,
                                               "compliance": metrics.get("compliance")})


# ----------------------------------------------------------------------------------- connections

@dataclass
class Job:
    """One accepted run of a connection."""

    run: Run
    ref: str | None
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    open_calls: set[str] = field(default_factory=set)  # stage_start sent, stage_end not yet

    @property
    def run_id(self) -> str:
        return self.run.record.run_id


class ServerState:
    """Shared by every request: the config and one backend object per backend name."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.embedded = EmbeddedBackend(model=config.default_model, n_threads=config.n_threads,
                                        max_queue=config.max_queue)
        self._backends: dict[str, Backend] = {"embedded": self.embedded}
        self._backends_lock = threading.Lock()  # runs are built in worker threads
        self.connections = 0

    def backend(self, name: str) -> Backend:
        with self._backends_lock:
            if name not in self._backends:
                self._backends[name] = get_backend(name)  # unknown name: InvalidInput naming the known ones
            return self._backends[name]

    def start_run(self, req: RunRequest) -> Run:
        """Build and start a run (in a worker thread: resolving a model reads files)."""
        backend = self.backend(req.backend)
        model = req.model
        if backend is self.embedded and model is not None:
            model = ollama_api.registry_model(model)  # registry names only: no file paths from clients
        max_tokens = req.max_tokens or Pipeline.max_tokens
        if self.config.max_predict:
            max_tokens = min(max_tokens, self.config.max_predict)
        pipe = Pipeline.from_preset(req.preset, backend=backend, model=model, rewrite=req.rewrite,
                                    review=req.review, max_tokens=max_tokens)
        return pipe.start(req.query, labels={"client": "ws"})

    async def aclose(self) -> None:
        for backend in self._backends.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


class Connection:
    """One WebSocket client: a reader (requests, cancels, disconnect), a runner (its runs, one at a time),
    a writer (the outbox) and a watch on the outbox's overflow, as four tasks; when any of them ends, all
    of them do and every run of the connection is cancelled."""

    def __init__(self, ws: WebSocket, state: ServerState):
        self.ws = ws
        self.state = state
        self.config = state.config
        self.outbox = Outbox(self.config.send_buffer_bytes)
        self.queue: collections.deque[Job] = collections.deque()
        self.current: Job | None = None
        self._wake = asyncio.Event()
        self._seq: dict[str, int] = {}
        self.last_activity = time.monotonic()  # the client's last message, or the end of its last run
        self.idle_closed = False

    async def serve(self) -> None:
        await self.ws.accept()
        coros = [self._read_loop(), self._run_loop(), self._write_loop(), self.outbox.overflowed.wait()]
        if self.config.idle_timeout_s:
            coros.append(self._idle_watch(self.config.idle_timeout_s))
        tasks = [asyncio.create_task(coro) for coro in coros]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._cancel_all(tasks)
        for task in tasks:
            _log_failure(task)
        if self.idle_closed:
            await self._close_idle(self.config.idle_timeout_s or 0)
        if self.outbox.overflowed.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=1008, reason="send buffer full: the client stopped reading"),
                                       timeout=1.0)

    async def _cancel_all(self, tasks: list[asyncio.Task[Any]]) -> None:
        running = [j.task for j in (self.current, *self.queue) if j is not None and j.task is not None]
        for task in (*running, *tasks):
            task.cancel()
        await asyncio.gather(*running, *tasks, return_exceptions=True)

    async def _idle_watch(self, idle_s: float) -> None:
        """Returns once the client has sent nothing, and had no run running or waiting and nothing to
        receive, for ``idle_s`` seconds (a silent client holds a connection slot and its buffers)."""
        while True:
            if self.current is not None or self.queue or len(self.outbox):
                self.last_activity = time.monotonic()
            left = self.last_activity + idle_s - time.monotonic()
            if left <= 0:
                self.idle_closed = True
                return
            await asyncio.sleep(left)

    async def _close_idle(self, idle_s: float) -> None:
        detail = (f"closing this connection: no message and no run for {idle_s:g} s; reconnect to send more, or send "
                  f"something within {idle_s:g} s to keep it open (the server's --ws-idle-timeout)")
        message = Outgoing("error", None, time.perf_counter_ns(),
                           {"ref": None, "code": "idle_timeout", "detail": detail})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.send_text(message.render(None)), timeout=1.0)
            await asyncio.wait_for(self.ws.close(code=1000, reason="idle timeout"), timeout=1.0)

    # ----------------------------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            self.last_activity = time.monotonic()
            if message["type"] == "websocket.disconnect":
                return
            ref = None
            try:
                request = parse_message(message, self.config)
                ref = request.ref
                if isinstance(request, CancelRequest):
                    self._cancel(request)
                else:
                    await self._accept(request)
            except KitError as exc:
                self._put(Outgoing("error", None, time.perf_counter_ns(),
                                   {"ref": ref, "code": exc.code, "detail": str(exc)}))

    async def _accept(self, request: RunRequest) -> None:
        pending = len(self.queue) + (self.current is not None)
        if pending >= self.config.max_pending_runs:
            raise ProtocolError("too_many_pending", f"this connection has {pending} runs running or waiting (at most "
                                                    f"{self.config.max_pending_runs}); wait for a 'complete' or cancel one")
        run = await asyncio.to_thread(self.state.start_run, request)
        self.queue.append(Job(run=run, ref=request.ref))
        self._wake.set()

    def _cancel(self, request: CancelRequest) -> None:
        jobs = [j for j in (self.current, *self.queue) if j is not None]
        if request.run_id is not None:
            targets = [j for j in jobs if j.run_id == request.run_id]
        elif request.ref is not None:
            targets = [j for j in jobs if j.ref == request.ref]
        else:
            targets = [self.current] if self.current is not None else []
        for job in targets:
            job.cancel_requested = True
            if job.task is not None:
                job.task.cancel()

    # ----------------------------------------------------------------------------------- runner

    async def _run_loop(self) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            job = self.current = self.queue.popleft()
            try:
                if job.cancel_requested:  # cancelled while waiting: it starts and ends at once
                    self._put(self._start_message(job))
                    job.run.record.status = "cancelled"
                    self._put_complete(job)
                    continue
                job.task = asyncio.create_task(self._stream(job))
                await asyncio.wait({job.task})  # not `await job.task`: a cancel message must not stop this loop
                if job.task.cancelled():
                    self._put_complete(job)
                elif job.task.exception() is not None:
                    self._internal_error(job, job.task.exception())
            finally:
                self.current = None
                self.last_activity = time.monotonic()

    async def _stream(self, job: Job) -> None:
        self._put(self._start_message(job))
        async for event in job.run:
            message = event_message(event)
            if message.type == "stage_start":
                job.open_calls.add(message.fields["call_id"])
            elif message.type == "stage_end":
                job.open_calls.discard(message.fields["call_id"])
            elif message.type == "complete":
                message.fields["ref"] = job.ref
            self._put(message)

    def _start_message(self, job: Job) -> Outgoing:
        pipe = job.run.pipeline
        return Outgoing("start", job.run_id, time.perf_counter_ns(), {
            "ref": job.ref, "preset": pipe.name, "backend": pipe.backend.name, "model": job.run.record.labels["model"],
            "stages": [s.name for s in pipe.stages], "max_tokens": pipe.max_tokens})

    def _put_complete(self, job: Job) -> None:
        """The closing messages of a run whose own StageEnd and RunEnd events did not reach us (it was
        cancelled): a ``stage_end`` for every stage still open, from its record, then ``complete``."""
        rec = job.run.record
        slo = job.run.pipeline.slo
        for stage in rec.stages:
            if stage.call.call_id in job.open_calls:
                crec = stage.call
                self._put(Outgoing("stage_end", job.run_id, crec.end_ns or time.perf_counter_ns(), {
                    "stage": stage.name, "call_id": crec.call_id, "status": crec.status,
                    "finish_reason": crec.finish_reason, "output_chars": len(crec.text),
                    "metrics": call_metrics(crec, slo)}))
        job.open_calls.clear()
        self._put(complete_message(job.run_id, time.perf_counter_ns(), rec.status,
                                   run_metrics(rec, slo), job.ref))

    def _internal_error(self, job: Job, exc: BaseException) -> None:
        log.error("run %s failed inside the server", job.run_id, exc_info=exc)
        self._put(Outgoing("error", job.run_id, time.perf_counter_ns(),
                           {"stage": None, "code": "internal", "detail": f"{type(exc).__name__}: {exc}"}))
        job.run.record.status = "error"
        self._put_complete(job)

    # ----------------------------------------------------------------------------------- writer

    def _put(self, message: Outgoing) -> None:
        was_full = self.outbox.overflowed.is_set()
        if not self.outbox.put(message) and not was_full:
            log.warning("dropping a WebSocket client: %d bytes wait in its send buffer", self.outbox.waiting_bytes)

    async def _write_loop(self) -> None:
        while True:
            message = await self.outbox.get()
            seq = None
            if message.run_id is not None:
                seq = self._seq.get(message.run_id, 0)
                self._seq[message.run_id] = seq + 1
                if message.type == "complete":
                    del self._seq[message.run_id]
            await self.ws.send_text(message.render(seq))


def _log_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    if type(exc).__name__ not in ("WebSocketDisconnect", "ClientDisconnected"):
        log.error("WebSocket connection task failed", exc_info=exc)


async def ws_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.kit
    if state.connections >= state.config.max_connections:
        detail = f"this server has {state.connections} connections (at most {state.config.max_connections}); retry later"
        try:
            await websocket.send_denial_response(JSONResponse({"error": detail}, status_code=503))
        except RuntimeError:  # the server cannot send an HTTP answer to a handshake
            await websocket.close(code=1013)
        return
    state.connections += 1
    try:
        await Connection(websocket, state).serve()
    finally:
        state.connections -= 1


# ------------------------------------------------------------------------------------------- the app

def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The ASGI application (serve it with uvicorn, or use :func:`serve` / :class:`ServerThread`)."""
    config = config or ServerConfig()
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for name in config.preload:
            await asyncio.to_thread(state.embedded.load, ollama_api.registry_model(name))
        yield
        await state.aclose()

    app = FastAPI(title="llmfirst_kit", version=__version__, lifespan=lifespan,
                  description="Pipeline runs over the WebSocket /ws, and Ollama- and OpenAI-compatible APIs over "
                              "the embedded models.")
    app.state.kit = state
    app.include_router(ollama_api.router)
    app.include_router(openai_api.router)
    app.add_api_websocket_route("/ws", ws_endpoint)
    _add_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(Guard, config=config)
    return app


def _error(request: Request, status: int, message: str) -> JSONResponse:
    return JSONResponse(_error_body(request.url.path, status, message), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every HTTP error as the API of its path shapes it (see :func:`_error_body`)."""

    async def api_error(request: Request, exc: ollama_api.ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message)

    async def kit_error(request: Request, exc: KitError) -> JSONResponse:
        return _error(request, ollama_api.status_of(exc), str(exc))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, 400, f"invalid request: {exc.errors()[:3]}")

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(request, 500, f"internal error ({type(exc).__name__}); see the server log")

    app.add_exception_handler(ollama_api.ApiError, api_error)
    app.add_exception_handler(KitError, kit_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies the Ollama routes read by hand, with examples."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (*ollama_api.BODY_MODELS, *openai_api.BODY_MODELS):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    model = app.state.kit.embedded.default_model
    examples = {
        "/api/generate": {"model": model, "prompt": "Why is the sky blue?", "stream": False,
                          "options": {"num_predict": 8, "temperature": 0}},
        "/api/chat": {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                      "options": {"num_predict": 8}},
        "/api/show": {"model": model},
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                                 "max_tokens": 8},
    }
    for path, example in examples.items():
        schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"] = example
    app.openapi_schema = schema
    return schema


# ------------------------------------------------------------------------------------------- running

def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, *,
          config: ServerConfig | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted (``llmfirst serve``). Off loopback a token is required: ``token``
    or the ``LLMFIRST_TOKEN`` environment variable."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    config = dataclasses.replace(config or ServerConfig(), token=token, check_host=is_loopback(host))
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level,
                ws_max_size=4 * config.max_message_bytes, timeout_graceful_shutdown=5)


class ServerThread:
    """The server in a background thread on a loopback port (``port=0``: a free one), for tests, notebooks
    and the load benchmark::

        with ServerThread(config=ServerConfig(default_model="smollm2-135m")) as server:
            server.url, server.ws_url
    """

    def __init__(self, app: FastAPI | None = None, *, config: ServerConfig | None = None, host: str = DEFAULT_HOST,
                 port: int = 0, log_level: str = "warning"):
        import uvicorn

        config = config or ServerConfig()
        check_bind(host, config.token)
        self.app = app or create_app(config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound here, so the port is known and cannot be taken meanwhile
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, log_level=log_level, ws_max_size=4 * config.max_message_bytes, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"llmfirst-server-{self.port}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    def start(self, timeout_s: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped while starting; see the log above")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------------- load benchmark

BENCH_QUERIES = (
    "What is the capital of France?",
    "Explain what a hash table is.",
    "Give two tips for writing clear code.",
    "What does HTTP stand for?",
    "Why do leaves change colour in autumn?",
)
MAX_BENCH_CLIENTS = 200
MAX_BENCH_QUERIES = 50


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


@dataclass
class _ClientRun:
    client: int
    index: int
    sent_ns: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    first_visible_ns: int | None = None
    last_visible_ns: int | None = None

    def row(self) -> dict[str, Any]:
        last = self.messages[-1] if self.messages else {}
        metrics = last.get("metrics") or {}
        gap = lambda t: None if t is None else (t - self.sent_ns) / 1e9  # noqa: E731
        return {"client": self.client, "query": self.index, "run_id": last.get("run_id"),
                "status": last.get("status") if last.get("type") == "complete" else last.get("code", "incomplete"),
                "messages": len(self.messages), "user_ttft_s": gap(self.first_visible_ns),
                "e2e_s": gap(self.last_visible_ns), "server_user_ttft_s": metrics.get("user_ttft_s"),
                "server_e2e_s": metrics.get("e2e_s"), "problems": check_run_messages(self.messages)}


async def _client_session(url: str, client: int, queries: int, request: dict[str, Any],
                          headers: dict[str, str]) -> list[_ClientRun]:
    """One benchmark client: its queries one after another over one connection."""
    from websockets.asyncio.client import connect

    runs = []
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=60) as ws:
        for i in range(queries):
            query = BENCH_QUERIES[(client + i) % len(BENCH_QUERIES)]
            run = _ClientRun(client, i, time.perf_counter_ns())
            runs.append(run)
            await ws.send(json.dumps({**request, "query": query, "ref": f"c{client}q{i}"}))
            while True:
                message = json.loads(await ws.recv())
                now = time.perf_counter_ns()
                if message["type"] == "error" and message["run_id"] is None:  # refused
                    run.messages.append(message)
                    break
                run.messages.append(message)
                if message["type"] == "chunk" and message["visible"]:
                    run.first_visible_ns = run.first_visible_ns or now
                    run.last_visible_ns = now
                if message["type"] == "complete":
                    break
    return runs


async def bench_serve_async(clients: int = 20, queries: int = 3, *, model: str = "smollm2-135m",
                            preset: str = "direct", max_tokens: int = 32, timeout_s: float = 300.0,
                            url: str | None = None, token: str | None = None,
                            n_threads: int | None = None) -> dict[str, Any]:
    """Load benchmark of the WebSocket API: ``clients`` concurrent connections, each sending ``queries``
    queries one after another. Starts its own server on a free loopback port unless given the ``url`` of a
    loopback one. Bounded: at most 200 clients x 50 queries, and ``timeout_s`` for the whole load, after which
    it stops and reports what finished. ``n_threads`` sets the decoding threads of the server it starts.
    Returns client-side user-visible TTFT and E2E percentiles (p50/p95,
    from sending the query), the server's own figures, runs per minute, and every delivery problem found."""
    if not 0 < clients <= MAX_BENCH_CLIENTS or not 0 < queries <= MAX_BENCH_QUERIES:
        raise InvalidInput(f"clients must be 1..{MAX_BENCH_CLIENTS} and queries 1..{MAX_BENCH_QUERIES}, "
                           f"got {clients} and {queries}")
    if url is not None and not is_loopback(_host_name(url) or ""):
        raise InvalidInput(f"the load benchmark only targets loopback servers, not {url!r}")
    if url is not None:
        return await _bench(url, clients, queries, model, preset, max_tokens, timeout_s, token)
    config = ServerConfig(default_model=model, max_connections=clients + 8, preload=(model,), n_threads=n_threads)
    server = await asyncio.to_thread(ServerThread(config=config).start)
    try:
        return await _bench(server.ws_url, clients, queries, model, preset, max_tokens, timeout_s, token)
    finally:
        await asyncio.to_thread(server.stop)


async def _bench(url: str, clients: int, queries: int, model: str, preset: str, max_tokens: int,
                 timeout_s: float, token: str | None) -> dict[str, Any]:
    request = {"model": model, "preset": preset, "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    warmup = await _client_session(url, 0, 1, request, headers)  # loads the model and warms caches: excluded
    t0 = time.perf_counter()
    sessions = [asyncio.create_task(_client_session(url, c, queries, request, headers)) for c in range(clients)]
    done, pending = await asyncio.wait(sessions, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall_s = time.perf_counter() - t0
    rows = [run.row() for task in done if not task.exception() for run in task.result()]
    failures = [f"{type(t.exception()).__name__}: {t.exception()}" for t in done if t.exception()]
    return _bench_summary(rows, warmup[0].row(), failures, clients, queries, wall_s, bool(pending), url,
                          dict(request))


def _bench_summary(rows: list[dict[str, Any]], warmup: dict[str, Any], failures: list[str], clients: int,
                   queries: int, wall_s: float, timed_out: bool, url: str, request: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from .metrics import percentiles

    ok = [r for r in rows if r["status"] == "ok" and not r["problems"]]
    columns = ["user_ttft_s", "e2e_s", "server_user_ttft_s", "server_e2e_s"]
    stats: dict[str, Any] = {}
    if ok:
        stats = percentiles(pd.DataFrame(ok), columns=columns, q=(50, 95)).iloc[0].to_dict()
        stats.pop("n", None)
    return {
        "url": url, **request, "clients": clients, "queries_per_client": queries, "runs_expected": clients * queries,
        "runs_completed": len(ok), "runs_with_problems": [r for r in rows if r["status"] != "ok" or r["problems"]],
        "client_failures": failures, "timed_out": timed_out, "wall_s": wall_s,
        "runs_per_min": len(ok) / wall_s * 60 if wall_s > 0 else None,
        **{k: (None if pd.isna(v) else float(v)) for k, v in stats.items()},
        "warmup": {k: warmup[k] for k in ("status", "user_ttft_s", "e2e_s")},
    }


def bench_serve(clients: int = 20, queries: int = 3, **options: Any) -> dict[str, Any]:
    """Synchronous :func:`bench_serve_async` (``llmfirst bench serve``)."""
    from .sync import run_sync

    return run_sync(bench_serve_async(clients, queries, **options))


def format_bench(result: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    def s(key: str) -> str:
        value = result.get(key)
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"{result['clients']} clients x {result['queries_per_client']} queries, model {result['model']}, "
        f"preset {result['preset']}, max_tokens {result['max_tokens']}",
        f"runs completed: {result['runs_completed']}/{result['runs_expected']} in {result['wall_s']:.1f} s "
        f"({result['runs_per_min'] or 0:.1f} runs/min){' -- timed out' if result['timed_out'] else ''}",
        f"user-visible TTFT (client)  p50 {s('user_ttft_s_p50')} s   p95 {s('user_ttft_s_p95')} s",
        f"E2E (client)                p50 {s('e2e_s_p50')} s   p95 {s('e2e_s_p95')} s",
        f"user-visible TTFT (server)  p50 {s('server_user_ttft_s_p50')} s   p95 {s('server_user_ttft_s_p95')} s",
    ]
    for run in result["runs_with_problems"][:5]:
        lines.append(f"problem: client {run['client']} query {run['query']}: {run['status']} {run['problems']}")
    lines += [f"client failure: {f}" for f in result["client_failures"][:5]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m llmfirst_kit.server [--host H] [--port P] [--token T]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmfirst_kit.server", description=serve.__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.token)
    except TokenRequired as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
