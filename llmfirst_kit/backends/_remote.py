"""What the ``ollama`` and ``openai`` backends share: how long they wait for a peer.

Without limits, a server that accepts the connection and never answers (hung, overloaded, a wrong port
that happens to accept) blocks the call forever. Both clients get:

- a connect timeout (:data:`DEFAULT_CONNECT_TIMEOUT_S`): how long to wait for the TCP connection;
- a read timeout (:data:`DEFAULT_READ_TIMEOUT_S`): the longest wait for the server's next bytes -- before the
  first token (the server may be loading a large model and evaluating a long prompt) and between tokens;
  it is not a limit on the whole answer, which may stream for as long as tokens keep coming.

Each is set per backend (``timeout=`` / ``connect_timeout=``) or for every backend in the process by
``LLMFIRST_READ_TIMEOUT`` / ``LLMFIRST_CONNECT_TIMEOUT`` (seconds; 0: no limit).
"""

from __future__ import annotations

import os

import httpx

from ..errors import InvalidInput

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 300.0  # a cold load of a large model on a CPU, plus a long prompt, stays under this
READ_TIMEOUT_ENV = "LLMFIRST_READ_TIMEOUT"
CONNECT_TIMEOUT_ENV = "LLMFIRST_CONNECT_TIMEOUT"


def _seconds(given: float | None, env: str, default: float) -> float | None:
    """``given``, else the environment variable, else the default; 0 means no limit (None)."""
    if given is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            given = default
        else:
            try:
                given = float(raw)
            except ValueError:
                raise InvalidInput(f"{env}={raw!r} is not a number of seconds; set it to e.g. {default:g} "
                                   f"(0: no limit), or unset it") from None
    if given < 0:
        raise InvalidInput(f"a timeout cannot be negative ({given}); give seconds, or 0 for no limit")
    return given or None


def timeouts(read: float | None, connect: float | None) -> tuple[float | None, float | None]:
    """The (read, connect) timeouts in seconds for a backend's arguments; None: no limit."""
    return (_seconds(read, READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT_S),
            _seconds(connect, CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S))


def httpx_timeout(read: float | None, connect: float | None) -> httpx.Timeout:
    """An httpx timeout: ``connect`` for the connection, ``read`` for reads, writes and the pool."""
    return httpx.Timeout(read, connect=connect)


def timeout_kind(exc: BaseException) -> str | None:
    """``"connect"`` or ``"read"`` when ``exc`` (or its cause) is a client timeout, else None. By class name,
    because the openai client raises httpx's or httpx2's exceptions depending on its version."""
    names = {cls.__name__ for err in (exc, exc.__cause__) if err is not None for cls in type(err).__mro__}
    if "ConnectTimeout" in names:
        return "connect"
    if names & {"TimeoutException", "APITimeoutError"}:
        return "read"
    return None


def read_timeout_fix(backend: str) -> str:
    return f"raise {backend}(timeout=...) or {READ_TIMEOUT_ENV}=SECONDS (the read timeout), or use a smaller model"


def connect_timeout_fix(backend: str) -> str:
    return f"raise {backend}(connect_timeout=...) or {CONNECT_TIMEOUT_ENV}=SECONDS"
