"""The WebSocket endpoint ``/ws``: pipeline runs streamed to a client as the messages of
:mod:`llmfirst_kit.serve.ws_protocol`.

Runs of one connection run one after another, in the order they were sent.

Backpressure: each client has a bounded send buffer that never blocks generation. While a client reads
more slowly than the model writes, waiting ``chunk`` messages of the same model call merge into one
(content joined, token counts added), so nothing is lost and the buffer stays as small as the text itself.
A client whose buffer still grows past ``send_buffer_bytes`` (it stopped reading) is dropped: its runs are
cancelled and the socket is closed with code 1008. Model access is fair: the embedded backend's FIFO
lock serves calls in arrival order, and a slow client's generation does not wait for its reader.

A client that disconnects cancels its runs; decoding stops within one token step. A connection with no
message and no run for ``idle_timeout_s`` gets an ``idle_timeout`` error and is closed (code 1000). Past a
model's queue cap (``max_queue``) a run is refused with ``queue_full``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import WebSocket
from fastapi.responses import JSONResponse

from ..errors import KitError
from ..metrics import call_metrics, run_metrics
from ..pipeline import Pipeline, Run
from .security import registry_model
from .state import ServerState
from ..compliance import Transcript, sink_compliance
from .ws_protocol import (CancelRequest, Outgoing, ProtocolError, RunRequest, complete_message, event_message,
                          parse_message)

log = logging.getLogger(__name__)


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


@dataclass
class Job:
    """One accepted run of a connection."""

    run: Run
    ref: str | None
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    open_calls: set[str] = field(default_factory=set)  # stage_start sent, stage_end not yet
    # what this sink sent as the models' words: the content of the shown stages' chunk messages
    transcript: Transcript = field(default_factory=lambda: Transcript("websocket"))

    def sink_fields(self) -> dict[str, Any]:
        """The ``complete`` message's compliance: this WebSocket's own figure, from what it sent."""
        report = sink_compliance(self.run.record, self.transcript)
        return {"compliance": report.compliance, "sink": report.to_dict()}

    @property
    def run_id(self) -> str:
        return self.run.record.run_id


def start_run(state: ServerState, req: RunRequest) -> Run:
    """Build and start a run (in a worker thread: resolving a model reads files)."""
    backend = state.backend(req.backend)
    model = req.model
    if backend.capabilities.local_model_files and model is not None:
        model = registry_model(model)  # registry names only: no file paths from clients
    max_tokens = req.max_tokens or Pipeline.max_tokens
    if state.config.max_predict:
        max_tokens = min(max_tokens, state.config.max_predict)
    pipe = Pipeline.from_preset(req.preset, backend=backend, model=model, rewrite=req.rewrite,
                                review=req.review, max_tokens=max_tokens)
    return pipe.start(req.query, labels={"client": "ws"})


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
        run = await asyncio.to_thread(start_run, self.state, request)
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
            elif message.type == "chunk":
                if message.fields["visible"]:
                    job.transcript.content(message.fields["stage"], message.fields["content"])
                else:
                    job.transcript.chrome(message.fields["content"])
            elif message.type == "complete":
                message.fields["ref"] = job.ref
                message.fields.update(job.sink_fields())
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
                    "metrics": call_metrics(crec, slo).as_dict()}))
        job.open_calls.clear()
        message = complete_message(job.run_id, time.perf_counter_ns(), rec.status, run_metrics(rec, slo), job.ref)
        message.fields.update(job.sink_fields())
        self._put(message)

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
