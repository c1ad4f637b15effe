"""The kit's server (``llmfirst serve``): pipeline runs over a WebSocket and Ollama- and OpenAI-compatible
HTTP APIs over the embedded models.

config (settings, ``LLMFIRST_*``) · security (token, origin, host, allowed backends) · state (what requests
share) · ws_protocol (the WebSocket messages) · ws (the ``/ws`` endpoint) · calls (the HTTP call plumbing,
NDJSON / SSE framing) · ollama_api · openai_api · app (the app factory, :func:`serve`, :class:`ServerThread`).
"""

from .app import ServerThread, create_app, serve
from .config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from .security import Guard, TokenRequired, check_bind, is_loopback
from .state import ServerState
from .ws import Connection, Outbox
from .ws_protocol import (CancelRequest, Outgoing, ProtocolError, RunRequest, check_run_messages, event_message,
                          parse_message)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "CancelRequest", "Connection", "Guard", "Outbox", "Outgoing",
           "ProtocolError", "RunRequest", "ServerConfig", "ServerState", "ServerThread", "TokenRequired",
           "check_bind", "check_run_messages", "create_app", "event_message", "is_loopback", "parse_message",
           "serve"]
