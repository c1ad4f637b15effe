"""What the ``ollama`` and ``openai`` backends share: :class:`RemoteBackend` (one client per event loop, the
stream-translate-close skeleton of a call, no cold cache) and how long they wait for a peer.

Without limits, a server that accepts the connection and never answers (hung, overloaded, a wrong port
that happens to accept) blocks the call forever. Both clients get:

- a connect timeout (10 s by default): how long to wait for the TCP connection;
- a read timeout (300 s: a cold load of a large model on a CPU, plus a long prompt, stays under it): the longest
  wait for the server's next bytes -- before the first token (the server may be loading a large model and
  evaluating a long prompt) and between tokens; it is not a limit on the whole answer, which may stream for as
  long as tokens keep coming.

Each is set per backend (``timeout=`` / ``connect_timeout=``) or for every backend in the process by
``LLMFIRST_READ_TIMEOUT`` / ``LLMFIRST_CONNECT_TIMEOUT`` (seconds; 0: no limit;
:class:`~llmfirst_kit.settings.Settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import httpx

from ..errors import InvalidInput, KitError
from ..records import CallRecord
from ..settings import settings
from .base import Backend, CallRequest, Chunk

READ_TIMEOUT_ENV = "LLMFIRST_READ_TIMEOUT"
CONNECT_TIMEOUT_ENV = "LLMFIRST_CONNECT_TIMEOUT"


def _seconds(given: float | None, from_env: float) -> float | None:
    """``given``, else the environment's value (``Settings``); 0 means no limit (None)."""
    if given is None:
        given = from_env
    if given < 0:
        raise InvalidInput(f"a timeout cannot be negative ({given}); give seconds, or 0 for no limit")
    return given or None


def timeouts(read: float | None, connect: float | None) -> tuple[float | None, float | None]:
    """The (read, connect) timeouts in seconds for a backend's arguments; None: no limit."""
    env = settings()
    return _seconds(read, env.read_timeout), _seconds(connect, env.connect_timeout)


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


@dataclass
class StreamTally:
    """What a remote stream has shown so far: content chunks, and its final statistics when they came."""

    chunks: int = 0
    final: Any = None  # the part (or usage) that carried the final statistics
    finish_reason: str | None = None
    server_parts: list[Any] = field(default_factory=list)  # the server's own timing objects seen in the stream


class RemoteBackend(Backend):
    """A model behind a server, reached through its official async client.

    Subclasses say how to build the client (:meth:`new_client`), open a stream (:meth:`open_stream`), read
    one streamed part (:meth:`read_part`), finish the record (:meth:`finish`) and translate a client error
    into the kit's (:meth:`translate`); this class holds the skeleton they share: one client per event loop,
    each part stamped with ``time.perf_counter_ns()`` as the first thing on arrival, the stream closed on an
    early exit or a cancel (closing the connection stops the server's generation), errors translated."""

    cold_cache_refusal: str = ""  # why cache="cold" cannot be honoured, and what to use instead

    def __init__(self, *, timeout: float | None, connect_timeout: float | None):
        self.timeout, self.connect_timeout = timeouts(timeout, connect_timeout)
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @abstractmethod
    def new_client(self) -> Any:
        """A new client (for the running event loop)."""

    def client_reset(self) -> None:
        """Forget what was learnt through the previous client (e.g. the server's model list)."""

    def client(self) -> Any:
        """One client per event loop: httpx's pooled connections belong to the loop that opened them, and
        sync helpers (``asyncio.run`` per call) run every call on a new loop."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = self.new_client()
            self._client_loop = loop
            self.client_reset()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = self._client_loop = None
        self.client_reset()

    def check_request(self, request: CallRequest) -> None:
        if request.cache == "cold":
            raise InvalidInput(self.cold_cache_refusal)
        if request.choices:
            raise InvalidInput(f"the {self.name} backend cannot read a choice from next-token probabilities; ask "
                               f"for the choice as structured output instead (json_schema with an enum)")
        if request.reply_prefix:
            raise InvalidInput(f"the {self.name} backend cannot continue a reply from a given prefix (reply_prefix); "
                               f"send the text as an assistant message and ask again in a user message instead")

    @abstractmethod
    async def open_stream(self, prepared: Any, record: CallRecord) -> Any:
        """Issue the call; returns the client's async stream."""

    @abstractmethod
    def read_part(self, part: Any, t_ns: int, tally: StreamTally, record: CallRecord) -> Iterator[Chunk]:
        """The content chunks of one streamed part (stamped ``t_ns``); note final statistics in ``tally``."""

    @abstractmethod
    def finish(self, prepared: Any, tally: StreamTally, record: CallRecord) -> None:
        """Fill the record's statistics from ``tally``; raise if the stream ended without them."""

    @abstractmethod
    def translate(self, exc: BaseException, prepared: Any, *, streaming: bool) -> KitError:
        """A client exception -> the kit's error, naming the fix."""

    async def close_stream(self, stream: Any) -> None:
        await stream.close()

    async def generate(self, prepared: Any, record: CallRecord) -> AsyncIterator[Chunk]:
        stream: Any = None
        tally = StreamTally()
        try:
            stream = await self.open_stream(prepared, record)
            async for part in stream:
                t_ns = time.perf_counter_ns()  # first thing on arrival
                for chunk in self.read_part(part, t_ns, tally, record):
                    yield chunk
        except KitError:
            raise
        except Exception as exc:
            raise self.translate(exc, prepared, streaming=stream is not None) from exc
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await self.close_stream(stream)  # early exit or cancel: closing the connection stops it
        self.finish(prepared, tally, record)
