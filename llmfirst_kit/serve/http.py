"""HTTP connections that end: uvicorn's h11 protocol with a header timeout and a cap on open connections.

uvicorn has neither: its ``timeout_keep_alive`` covers only the idle time between two requests, so a client that
connects and sends nothing, or sends a header byte a second (slow loris), holds its connection -- and a file
descriptor -- forever. :func:`bounded_http` returns the protocol class the server runs instead (uvicorn's
``http=`` setting): a client must complete a request's headers within ``header_timeout_s`` of connecting or of
the request's first byte, else the connection is closed; a connection beyond ``max_open_connections`` (HTTP and
WebSocket together) is answered 503 and closed at once. Why not another server: hypercorn and granian would
replace the whole serving stack (and its WebSocket handling) for two timers; these are ~40 lines on uvicorn's
own protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
         b"content-length: 61\r\n\r\ntoo many open connections; retry later (--max-open-connections)")


class BoundedH11Protocol(H11Protocol):
    header_timeout_s: float = 20.0
    max_open_connections: int = 256
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_open_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's headers still incomplete (or none yet)
            if self._header_timer is None and not self.transport.is_closing():
                self._arm()
        else:  # headers complete: the request is the application's now
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def bounded_http(header_timeout_s: float, max_open_connections: int) -> type[BoundedH11Protocol]:
    """The protocol class for uvicorn's ``http=`` with these limits."""
    attrs: dict[str, Any] = {"header_timeout_s": header_timeout_s, "max_open_connections": max_open_connections}
    return type("ConfiguredH11Protocol", (BoundedH11Protocol,), attrs)
