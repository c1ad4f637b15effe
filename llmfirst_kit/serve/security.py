"""Who may talk to the server and what they may spend.

Loopback by default. Listening on any other address requires a token (``token=`` or ``LLMFIRST_TOKEN``),
checked on every HTTP request and WebSocket handshake (``Authorization: Bearer <token>``). Browsers are
held back too: a request with an ``Origin`` header must come from a loopback page (or an origin in
``allowed_origins``), and a loopback server without a token answers only to loopback ``Host`` names (DNS
rebinding).

A WebSocket run may use only the backends in ``allowed_backends`` (default: embedded; ``ollama`` and
``openai`` would spend the operator's own server and key); others get ``backend_not_allowed``. The size
limits (message, query, body, context, tokens, queue, connections) are settings of
:class:`~llmfirst_kit.serve.config.ServerConfig`, checked where each request is read.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from ..backends import BACKENDS
from ..errors import InvalidInput, UnknownModel
from ..models import REGISTRY, known_names
from .config import DEFAULT_HOST, TOKEN_ENV, ServerConfig

ErrorBody = Callable[[str, int, str], dict[str, Any]]  # (path, status, message) -> the JSON body of an error


class TokenRequired(InvalidInput):
    code = "token_required"


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


def host_name(value: str) -> str | None:
    """The host of a URL or of a ``Host`` header value (``None`` when it does not parse)."""
    try:
        return urlsplit(value if "//" in value else f"//{value}").hostname
    except ValueError:
        return None


def backend_refusal(backend: str, config: ServerConfig) -> str | None:
    """Why a WebSocket run may not use ``backend`` (it is not enabled on this server), or None. Names the
    kit does not know are left to the backend registry, whose error lists the known ones."""
    if backend in BACKENDS and backend not in config.allowed_backends:
        return (f"backend {backend!r} is not enabled on this server: it would run on the operator's own {backend} "
                f"server and credentials; enabled: {', '.join(config.allowed_backends) or 'none'}. The operator can "
                f"enable it with `llmfirst serve --allow-backend {backend}` (ServerConfig(allowed_backends=...))")
    return None


def plain_error_body(path: str, status: int, message: str) -> dict[str, Any]:
    return {"error": message}


class Guard:
    """Checks every HTTP request and WebSocket handshake before the app sees it: the bearer token (when the
    server has one), the ``Origin`` (a browser page that is not loopback or allowed), and the ``Host``.
    ``error_body`` shapes a refusal as the API of its path."""

    def __init__(self, app: Callable, config: ServerConfig, error_body: ErrorBody = plain_error_body):
        self.app = app
        self.token = config.token.encode() if config.token else None
        self.allowed_origins = frozenset(o.rstrip("/") for o in config.allowed_origins)
        self.check_host = config.check_host
        self.error_body = error_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            problem = self.problem(Headers(scope=scope))
            if problem is not None:
                await self._refuse(scope, receive, send, *problem)
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
        if self.check_host and host is not None and not is_loopback(host_name(host) or ""):
            return 403, (f"host {host!r} is not a loopback name; connect to {DEFAULT_HOST} or localhost (to serve "
                         f"other names, listen on that address with a token)")
        return None

    def _origin_allowed(self, origin: str) -> bool:
        return origin.rstrip("/") in self.allowed_origins or is_loopback(host_name(origin) or "")

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, status: int, message: str) -> None:
        """Answer the error body with ``status``; for a WebSocket, refuse the handshake."""
        body = json.dumps(self.error_body(scope.get("path", ""), status, message)).encode()
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


TAG = ":latest"  # Ollama's default tag; a client may name a model with or without it


def registry_model(name: str) -> str:
    """A registry name from a client's model name (``smollm2-135m`` or ``smollm2-135m:latest``). Anything
    else, paths to local files included, is UnknownModel: a remote client must not make the server open
    files by name."""
    base = name[: -len(TAG)] if name.endswith(TAG) else name
    if base in REGISTRY:
        return base
    raise UnknownModel(f"model {name!r} not found; known: {', '.join(known_names())}")
