"""The kit's ASGI server: pipeline runs over the WebSocket ``/ws`` (:mod:`~llmfirst_kit.serve.ws`), an
Ollama-compatible HTTP API (:mod:`~llmfirst_kit.serve.ollama_api`) and an OpenAI-compatible one
(:mod:`~llmfirst_kit.serve.openai_api`, under /v1) over the embedded models. Served by uvicorn, on loopback
by default (:mod:`~llmfirst_kit.serve.security`).

:func:`create_app` builds the application, :func:`serve` runs it until interrupted (``llmfirst serve``) and
:class:`ServerThread` runs it in a background thread on a free loopback port (tests, notebooks, benchmarks).
Client JSON schemas are checked by :mod:`llmfirst_kit.backends.schema_guard` (no remote or file references,
bounded repetition counts) before anything reads them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import KitError
from . import ollama_api, openai_api
from .calls import ApiError, status_of
from .config import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, ServerConfig
from .security import Guard, check_bind, is_loopback, registry_model
from .state import ServerState
from .ws import ws_endpoint


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """An HTTP error shaped as the API of its path: OpenAI's under /v1, Ollama's ``{"error": "..."}`` else."""
    if path.startswith(openai_api.router.prefix + "/"):
        return openai_api.error_body(status, message)
    return {"error": message}


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The ASGI application (serve it with uvicorn, or use :func:`serve` / :class:`ServerThread`)."""
    config = config or ServerConfig()
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for name in config.preload:
            await asyncio.to_thread(state.embedded.load, registry_model(name))
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
    app.add_middleware(Guard, config=config, error_body=error_body)
    return app


def _error(request: Request, status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every HTTP error as the API of its path shapes it (see :func:`error_body`)."""

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message)

    async def kit_error(request: Request, exc: KitError) -> JSONResponse:
        return _error(request, status_of(exc), str(exc))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, 400, f"invalid request: {exc.errors()[:3]}")

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(request, 500, f"internal error ({type(exc).__name__}); see the server log")

    app.add_exception_handler(ApiError, api_error)
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

def uvicorn_settings(config: ServerConfig) -> dict[str, Any]:
    """The connection limits of ``config`` as uvicorn's settings (:mod:`~llmfirst_kit.serve.http`)."""
    from .http import bounded_http

    return {"ws_max_size": 4 * config.max_message_bytes, "timeout_keep_alive": config.keep_alive_timeout_s,
            "http": bounded_http(config.header_timeout_s, config.max_open_connections)}


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, *,
          config: ServerConfig | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted (``llmfirst serve``). Off loopback a token is required: ``token``
    or the ``LLMFIRST_TOKEN`` environment variable."""
    import uvicorn

    config = config or ServerConfig()  # reads the LLMFIRST_* environment variables
    token = token or config.token or os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    config = config.model_copy(update={"token": token, "check_host": is_loopback(host)})
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                **uvicorn_settings(config))


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
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=2,
                                                    **uvicorn_settings(config)))
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
