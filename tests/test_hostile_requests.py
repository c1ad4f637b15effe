"""Hostile or careless requests must not reach the engine's failure modes: each is checked against the real
server (``llmfirst serve``: uvicorn on a free loopback port, a background thread of this process) with real
clients (httpx, ``websockets``, the kit's own backends) and the real SmolLM2-135M model.

- a client's JSON schema with a ``$ref`` outside the document (a URL, a ``file:``) is refused and nothing is
  fetched or opened; in-document references still work;
- a tiny schema with huge repetition counts is refused before it is turned into a grammar;
- past the per-model queue cap, calls get 503 (Ollama and OpenAI shapes) or a ``queue_full`` error (WebSocket),
  while the admitted ones complete;
- a WebSocket client cannot pick a backend that spends the operator's credentials unless the operator enabled it;
- a hung peer ends in an error naming the timeout (the ollama and openai backends), and an idle WebSocket is
  closed.

Counts are asserted in requests, messages and tokens, never in seconds.
"""

from __future__ import annotations

import asyncio
import errno
import http.server
import json
import os
import socket
import threading
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import TEST_MODEL

from llmfirst_kit.backends.base import CallRequest
from llmfirst_kit.backends.ollama import OllamaBackend
from llmfirst_kit.backends.openai import OpenAIBackend
from llmfirst_kit.backends.schema_guard import MAX_SCHEMA_REPETITIONS
from llmfirst_kit.errors import BackendError, BackendUnavailable
from llmfirst_kit.serve import ServerConfig, ServerThread

TIMEOUT_S = 240.0
QUESTION = [{"role": "user", "content": "What is 2+2? Reply in JSON."}]
LONG = "Write a long story about a dragon."  # at temperature 0 SmolLM2 writes 1500 tokens without stopping


@pytest.fixture(scope="module")
def server(serial_loaded):
    """The kit's server with one sequence and a queue cap of 1 (one call decoding, one waiting); it decodes with
    the test's serial model instance, so the test can see that model's queue."""
    config = ServerConfig(default_model=TEST_MODEL, n_threads=serial_loaded.n_threads, max_queue=1, parallel=1)
    with ServerThread(config=config) as srv:
        assert srv.app.state.kit.embedded.load(TEST_MODEL) is serial_loaded
        yield srv


def ollama_chat(fmt: Any, **options: Any) -> dict[str, Any]:
    return {"model": TEST_MODEL, "messages": QUESTION, "stream": False, "format": fmt,
            "options": {"num_predict": 24, "temperature": 0, **options}}


def openai_chat(schema: dict[str, Any], style: str = "json_schema") -> dict[str, Any]:
    fmt = ({"type": "json_schema", "json_schema": {"name": "out", "schema": schema}} if style == "json_schema"
           else {"type": "json_object", "schema": schema})
    return {"model": TEST_MODEL, "messages": QUESTION, "max_tokens": 24, "response_format": fmt}


class Listener:
    """A real HTTP server on loopback that records every request it gets (and would serve a schema)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                body = b'{"type": "integer"}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------ schema references

def test_listener_sees_a_plain_fetch():
    """The listener itself works: a fetch of its URL is recorded (so an empty record below means no fetch)."""
    listener = Listener()
    try:
        assert httpx.get(f"{listener.url}/probe.json").json() == {"type": "integer"}
        assert listener.requests == ["/probe.json"]
    finally:
        listener.close()


def test_schema_refs_outside_the_document_are_refused_and_nothing_is_fetched(server):
    listener = Listener()
    try:
        remote = f"{listener.url}/schema.json"
        refs = [remote, f"{remote}#/definitions/x", "https://json-schema.org/draft/2020-12/schema", "other.json"]
        for ref in refs:
            for fmt in ({"$ref": ref},
                        {"type": "object", "properties": {"answer": {"$ref": ref}}, "required": ["answer"]},
                        {"anyOf": [{"type": "string"}, {"$ref": ref}]}):
                answer = httpx.post(f"{server.url}/api/chat", json=ollama_chat(fmt), timeout=TIMEOUT_S)
                assert answer.status_code == 400, (fmt, answer.text)
                error = answer.json()["error"]
                assert "in-document references only ('#/...'" in error and repr(ref) in error, error
            for style in ("json_schema", "json_object"):
                answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S,
                                    json=openai_chat({"type": "object", "properties": {"a": {"$ref": ref}}}, style))
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert error["type"] == "invalid_request_error" and "in-document references only" in error["message"]
        assert listener.requests == [], "the server fetched what a client's schema named"
    finally:
        listener.close()


def test_a_file_reference_is_refused_without_opening_the_file(server, tmp_path):
    """The referenced file is a FIFO: opening it for writing without blocking succeeds only while someone has
    it open for reading, so ENXIO afterwards shows that the server never opened it."""
    fifo = tmp_path / "schema.json"
    os.mkfifo(fifo)
    for fmt in ({"$ref": fifo.as_uri()}, {"type": "array", "items": {"$ref": f"file://{fifo}#/x"}}):
        answer = httpx.post(f"{server.url}/api/generate", timeout=60, json={
            "model": TEST_MODEL, "prompt": "hi", "stream": False, "format": fmt, "options": {"num_predict": 4}})
        assert answer.status_code == 400 and "is a file reference" in answer.json()["error"], answer.text
    with pytest.raises(OSError) as info:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert info.value.errno == errno.ENXIO


def test_in_document_references_are_resolved(server):
    schema = {"$defs": {"Answer": {"type": "integer"}}, "type": "object",
              "properties": {"answer": {"$ref": "#/$defs/Answer"}}, "required": ["answer"]}
    answer = httpx.post(f"{server.url}/api/chat", json=ollama_chat(schema), timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["done"] and body["eval_count"] >= 1
    if body["done_reason"] == "stop":
        assert isinstance(json.loads(body["message"]["content"])["answer"], int)
    dangling = {**schema, "properties": {"answer": {"$ref": "#/$defs/Missing"}}}
    refused = httpx.post(f"{server.url}/api/chat", json=ollama_chat(dangling), timeout=TIMEOUT_S)
    assert refused.status_code == 400 and "points at nothing in this schema" in refused.json()["error"]


# ---------------------------------------------------------------------------------- repetition counts

HUGE = [
    {"type": "array", "items": {"type": "integer"}, "minItems": 100_000},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10, "maxItems": 1_000_000_000},
    {"type": "string", "maxLength": 100_000},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a{100000}$"}}},
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3000},
                                      "b": {"type": "array", "items": {"type": "string"}, "maxItems": 3000}}},
]


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """Every schema handed to llama.cpp's converter (recorded, then converted as usual)."""
    from llama_cpp import llama_grammar

    seen: list[str] = []
    real = llama_grammar.json_schema_to_gbnf

    def recording(schema: str, *args: Any, **kwargs: Any) -> str:
        seen.append(schema)
        return real(schema, *args, **kwargs)

    monkeypatch.setattr(llama_grammar, "json_schema_to_gbnf", recording)
    return seen


@pytest.mark.parametrize("schema", HUGE, ids=[json.dumps(s)[:60] for s in HUGE])
def test_huge_repetition_counts_are_refused_before_grammar_conversion(server, conversions, schema):
    answer = httpx.post(f"{server.url}/api/chat", json=ollama_chat(schema), timeout=TIMEOUT_S)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "too large" in error and f"{MAX_SCHEMA_REPETITIONS} (MAX_SCHEMA_REPETITIONS)" in error, error
    v1 = httpx.post(f"{server.url}/v1/chat/completions", json=openai_chat(schema), timeout=TIMEOUT_S)
    assert v1.status_code == 400 and "MAX_SCHEMA_REPETITIONS" in v1.json()["error"]["message"]
    assert conversions == [], "the schema reached the grammar converter"


def test_long_names_times_counts_are_bounded_too(server, conversions):
    """Few repetitions, but of a rule named after a 20,000-character property: the estimate catches it."""
    schema = {"type": "object", "properties": {"x" * 20_000: {"type": "array", "items": {"type": "integer"},
                                                             "maxItems": 100}}}
    answer = httpx.post(f"{server.url}/api/chat", json=ollama_chat(schema), timeout=TIMEOUT_S)
    assert answer.status_code == 400 and "(MAX_GRAMMAR_CHARS)" in answer.json()["error"], answer.text
    assert conversions == []


def test_modest_counts_still_constrain_the_answer(server, conversions):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 8}},
              "required": ["answer"]}
    answer = httpx.post(f"{server.url}/api/chat", json=ollama_chat(schema, num_predict=32), timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    assert conversions, "an acceptable schema is turned into a grammar"  # (the check above is not vacuous)
    body = answer.json()
    if body["done_reason"] == "stop":
        assert 1 <= len(json.loads(body["message"]["content"])["answer"]) <= 8


# ------------------------------------------------------------------------------------------ queue cap

async def _ollama_stream(http: httpx.AsyncClient, prompt: str, num_predict: int) -> tuple[int, list[dict]]:
    body = {"model": TEST_MODEL, "prompt": prompt, "options": {"num_predict": num_predict, "temperature": 0}}
    async with http.stream("POST", "/api/generate", json=body) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line.strip()]
        return response.status_code, lines


async def _wait_for(condition) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        while not condition():
            await asyncio.sleep(0.02)


async def test_past_the_queue_cap_requests_get_503_and_the_admitted_ones_complete(server, serial_loaded):
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
        body = {"model": TEST_MODEL, "prompt": LONG, "options": {"num_predict": 1500, "temperature": 0}}
        async with http.stream("POST", "/api/generate", json=body) as long_call:  # decodes: holds the model
            assert long_call.status_code == 200
            lines = long_call.aiter_lines()
            assert json.loads(await anext(lines))["done"] is False
            # four streamed requests at once: one may wait (cap 1), three are refused before taking a thread
            burst = [asyncio.create_task(_ollama_stream(http, "What is 2+2?", 6)) for _ in range(4)]
            await _wait_for(lambda: sum(t.done() for t in burst) >= 3)
            admitted = [t for t in burst if not t.done()]
            refused = [t.result() for t in burst if t.done()]
            assert [status for status, _ in refused] == [503, 503, 503] and len(admitted) == 1
            for _, answer in refused:
                assert answer[0]["error"].startswith("server busy, ") and "--max-queue" in answer[0]["error"]
                assert "LLMFIRST_MAX_QUEUE" in answer[0]["error"]
            assert serial_loaded.engine.waiting == 1
            # the queue is still full: the OpenAI API and the WebSocket refuse too, each in its own shape
            async with http.stream("POST", "/v1/chat/completions", json={
                    "model": TEST_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                    "stream": True}) as v1:
                assert v1.status_code == 503
                error = json.loads(await v1.aread())["error"]
                assert error["type"] == "server_error" and error["message"].startswith("server busy, ")
            async with connect(server.ws_url) as ws:
                await ws.send(json.dumps({"query": "Hi", "model": TEST_MODEL, "max_tokens": 4}))
                messages = []
                async with asyncio.timeout(TIMEOUT_S):
                    while not messages or messages[-1]["type"] != "complete":
                        messages.append(json.loads(await ws.recv()))
                errors = [m for m in messages if m["type"] == "error"]
                assert len(errors) == 1 and errors[0]["code"] == "queue_full", messages
                assert "--max-queue" in errors[0]["detail"] and messages[-1]["status"] == "error"
            # leaving the long answer cancels it; the one admitted to the queue then runs to its end
        status, answer = await admitted[0]
        assert status == 200 and answer[-1]["done"] is True and answer[-1]["eval_count"] >= 1
        assert answer[-1]["done_reason"] in ("stop", "length")
        # nothing waits any more: the next call is served
        again = await http.post("/api/generate", json={"model": TEST_MODEL, "prompt": "Hi", "stream": False,
                                                       "options": {"num_predict": 3}})
        assert again.status_code == 200 and again.json()["done"] is True
    assert serial_loaded.engine.waiting == 0


# ----------------------------------------------------------------------------- WebSocket backend choice

async def test_websocket_cannot_pick_a_credentialed_backend_by_default(server):
    async with connect(server.ws_url) as ws:
        for backend in ("openai", "ollama"):
            await ws.send(json.dumps({"query": "Hi", "backend": backend, "max_tokens": 4}))
            error = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
            assert error["type"] == "error" and error["run_id"] is None and error["code"] == "backend_not_allowed"
            assert f"--allow-backend {backend}" in error["detail"] and "enabled: embedded" in error["detail"]
        await ws.send(json.dumps({"query": "Hi", "model": TEST_MODEL, "max_tokens": 3}))  # the connection stays
        while (message := json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S)))["type"] != "complete":
            pass
        assert message["status"] == "ok"


async def test_an_operator_enabled_backend_is_used(loaded, monkeypatch):
    """With ``--allow-backend openai`` the run goes to the operator's OPENAI_BASE_URL (here a closed loopback
    port, so the run ends with that backend's own error)."""
    closed = _free_port()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{closed}/v1")
    config = ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads,
                          allowed_backends=("embedded", "openai"))
    with ServerThread(config=config) as srv:
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"query": "Hi", "backend": "openai", "max_tokens": 4}))
            messages = []
            while not messages or messages[-1]["type"] != "complete":
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S)))
    assert messages[0]["type"] == "start" and messages[0]["backend"] == "openai"
    errors = [m for m in messages if m["type"] == "error"]
    assert errors and errors[0]["code"] == "backend_unavailable" and f":{closed}/v1" in errors[0]["detail"]


# ------------------------------------------------------------------------------------------- timeouts

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HangingPeer:
    """A FAKE server, to inject a fault that no real backend produces on demand: a loopback socket that
    accepts every connection and then never reads or answers (a hung or wedged server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class FullBacklog:
    """A FAKE server for a connect timeout: a listener whose accept queue is full and is never drained, so
    the kernel drops new connection attempts and the client's connect hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fill = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fill.append(s)

    def close(self) -> None:
        for s in (*self.fill, self.sock):
            s.close()


@pytest.fixture
def hanging():
    peer = HangingPeer()
    yield peer
    peer.close()


async def test_ollama_backend_gives_up_on_a_silent_server_naming_the_timeout(hanging):
    backend = OllamaBackend("m", host=f"http://127.0.0.1:{hanging.port}", timeout=0.5)
    with pytest.raises(BackendError, match=r"within 0\.5 s; raise OllamaBackend\(timeout=\.\.\.\) or "
                                           r"LLMFIRST_READ_TIMEOUT=SECONDS"):
        await backend.call(CallRequest(messages=QUESTION, max_tokens=4)).collect()
    assert hanging.accepted, "the backend never connected"
    await backend.aclose()


async def test_openai_backend_gives_up_on_a_silent_server_naming_the_timeout(hanging, monkeypatch):
    monkeypatch.setenv("LLMFIRST_READ_TIMEOUT", "0.5")  # the process-wide setting
    backend = OpenAIBackend("m", base_url=f"http://127.0.0.1:{hanging.port}/v1")
    assert backend.timeout == 0.5
    with pytest.raises(BackendError, match=r"within 0\.5 s; raise OpenAIBackend\(timeout=\.\.\.\) or "
                                           r"LLMFIRST_READ_TIMEOUT=SECONDS"):
        await backend.call(CallRequest(messages=QUESTION, max_tokens=4)).collect()
    assert hanging.accepted
    await backend.aclose()


async def test_a_connection_that_never_completes_names_the_connect_timeout():
    peer = FullBacklog()
    try:
        for backend, name in ((OllamaBackend("m", host=f"http://127.0.0.1:{peer.port}", connect_timeout=0.3),
                               "OllamaBackend"),
                              (OpenAIBackend("m", base_url=f"http://127.0.0.1:{peer.port}/v1", connect_timeout=0.3),
                               "OpenAIBackend")):
            with pytest.raises(BackendUnavailable, match=rf"within 0\.3 s; .*raise {name}\(connect_timeout=\.\.\.\) "
                                                         r"or LLMFIRST_CONNECT_TIMEOUT=SECONDS"):
                await backend.call(CallRequest(messages=QUESTION, max_tokens=4)).collect()
            await backend.aclose()
    finally:
        peer.close()


async def test_remote_backends_have_finite_default_timeouts(monkeypatch):
    for env in ("LLMFIRST_READ_TIMEOUT", "LLMFIRST_CONNECT_TIMEOUT"):
        monkeypatch.delenv(env, raising=False)
    for backend in (OllamaBackend(), OpenAIBackend()):
        assert (backend.timeout, backend.connect_timeout) == (300.0, 10.0)
        client = backend.client()
        timeout = client._client.timeout if isinstance(backend, OllamaBackend) else client.timeout
        assert (timeout.read, timeout.connect) == (300.0, 10.0)
        await backend.aclose()
    monkeypatch.setenv("LLMFIRST_CONNECT_TIMEOUT", "soon")
    with pytest.raises(Exception, match="LLMFIRST_CONNECT_TIMEOUT='soon' is not a number of seconds"):
        OllamaBackend()


def test_cli_ask_against_a_silent_ollama_names_the_timeout(hanging, monkeypatch, capsys):
    from llmfirst_kit.cli import main

    monkeypatch.setenv("LLMFIRST_READ_TIMEOUT", "0.5")
    code = main(["ask", "Hi", "--backend", "ollama", "--host", f"http://127.0.0.1:{hanging.port}", "--model", "m"])
    assert code == 1
    assert "within 0.5 s; raise OllamaBackend(timeout=...) or LLMFIRST_READ_TIMEOUT" in capsys.readouterr().err


async def test_an_idle_websocket_is_closed_after_its_run(loaded):
    config = ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads, idle_timeout_s=0.5)
    with ServerThread(config=config) as srv:
        async with connect(srv.ws_url) as ws:
            # a run longer than the idle time is not cut: only silence without a run counts
            await ws.send(json.dumps({"query": LONG, "model": TEST_MODEL, "max_tokens": 48}))
            messages = []
            while not messages or messages[-1]["type"] != "complete":
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S)))
            assert messages[-1]["status"] == "ok" and messages[-1]["metrics"]["output_tokens"] == 48
            error = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
            assert error["type"] == "error" and error["code"] == "idle_timeout" and error["run_id"] is None
            assert "--ws-idle-timeout" in error["detail"]
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), TIMEOUT_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000


# ----------------------------------------------------------------------------- malformed and oversized schemas

NESTED_ARRAYS: dict[str, Any] = {"type": "array"}
for _ in range(150):
    NESTED_ARRAYS = {"type": "array", "items": NESTED_ARRAYS}

MALFORMED = {
    "ref-object": {"$ref": {}}, "ref-int": {"$ref": 5}, "ref-list": {"$ref": []},
    "pattern-unclosed": {"type": "string", "pattern": "("},
    "properties-list": {"type": "object", "properties": []}, "items-int": {"type": "array", "items": 5},
    "additional-int": {"type": "object", "additionalProperties": 5}, "dependencies-int": {"dependencies": {"a": 5}},
    "nested-arrays": NESTED_ARRAYS, "nested-groups": {"type": "string", "pattern": "(" * 3000 + ")" * 3000},
    "properties-40k": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40_000)}},
}


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def test_malformed_and_oversized_schemas_are_400_and_cost_no_memory(server):
    """Each hostile schema gets a 400 naming what is wrong (never a 500), on the same keep-alive connection,
    and the server's memory does not grow with them (the checks run before any library compiles the schema)."""
    import os

    before = _rss_mb(os.getpid())
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http:  # one connection for all of them
        for name, schema in MALFORMED.items():
            answer = http.post("/api/chat", json=ollama_chat(schema))
            assert answer.status_code == 400, (name, answer.status_code, answer.text[:300])
            error = answer.json()["error"]
            assert "schema" in error and len(error) < 600, (name, error)
        v1 = http.post("/v1/chat/completions", json={
            "model": TEST_MODEL, "messages": QUESTION, "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": MALFORMED["items-int"]}}})
        assert v1.status_code == 400 and "items" in v1.json()["error"]["message"]
        assert http.get("/api/version").status_code == 200  # the connection and the server are fine
    assert _rss_mb(os.getpid()) - before < 50  # the server runs in this process (ServerThread)


def _connect(srv: ServerThread) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    return sock


def _closed_by_server(sock: socket.socket, trickle: bytes = b"", wait_s: float = 10.0) -> bool:
    """Whether the server closes ``sock`` within ``wait_s`` (a bound, not a measurement), sending one byte of
    ``trickle`` every 0.2 s meanwhile (a slow-loris client)."""
    sock.settimeout(0.2)
    for i in range(int(wait_s / 0.2)):
        try:
            if trickle:
                sock.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            if sock.recv(1024) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset or broken pipe: closed
            return True
    return False


def test_slow_headers_and_idle_connections_end_while_requests_are_served(loaded):
    """Header and keep-alive timeouts (1 s here): a connection that sends nothing, one that trickles a header byte
    at a time and one idle after its request are all closed by the server, while a normal request on another
    connection is answered meanwhile."""
    config = ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads, header_timeout_s=1.0,
                          keep_alive_timeout_s=1.0)
    with ServerThread(config=config) as srv:
        silent, loris, idle = _connect(srv), _connect(srv), _connect(srv)
        loris.sendall(b"GET /api/version HTTP/1.1\r\n")
        idle.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        assert httpx.get(f"{srv.url}/api/version", timeout=10).status_code == 200  # served meanwhile
        assert _closed_by_server(loris, trickle=b"X-Slow: 1\r\n")
        assert _closed_by_server(silent) and _closed_by_server(idle)
        for s in (silent, loris, idle):
            s.close()
    # and with the default limits the same slow client is still connected after those seconds
    with ServerThread(config=ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads)) as srv:
        loris = _connect(srv)
        loris.sendall(b"GET /api/version HTTP/1.1\r\n")
        assert not _closed_by_server(loris, trickle=b"X-Slow: 1\r\n", wait_s=3.0)
        loris.close()


def test_past_the_connection_cap_a_connection_gets_503_and_is_closed(loaded):
    config = ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads, max_open_connections=3)
    with ServerThread(config=config) as srv:
        held = [_connect(srv) for _ in range(3)]
        extra = _connect(srv)
        extra.settimeout(10)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"--max-open-connections" in reply
        extra.close()
        held.pop().close()
        deadline = 50
        while deadline:  # the freed slot serves a new client
            deadline -= 1
            response = httpx.get(f"{srv.url}/api/version", timeout=10)
            if response.status_code == 200:
                break
        assert response.status_code == 200
        for s in held:
            s.close()


def test_a_client_asking_for_no_limit_is_held_to_the_servers_token_cap(loaded):
    """``max_predict`` (``llmfirst serve --max-tokens-cap``) bounds a call that asked for no limit: Ollama's
    ``num_predict: -1`` and ``/v1`` without ``max_tokens``; below it a client's own budget still applies."""
    config = ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads, max_predict=6)
    with ServerThread(config=config) as srv:
        story = [{"role": "user", "content": LONG}]
        body = {"model": TEST_MODEL, "messages": story, "stream": False, "options": {"num_predict": -1, "temperature": 0}}
        ollama = httpx.post(f"{srv.url}/api/chat", json=body, timeout=TIMEOUT_S).json()
        assert (ollama["eval_count"], ollama["done_reason"]) == (6, "length")
        v1 = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": TEST_MODEL, "messages": story,
                                                                "temperature": 0}, timeout=TIMEOUT_S).json()
        assert (v1["usage"]["completion_tokens"], v1["choices"][0]["finish_reason"]) == (6, "length")
        body["options"]["num_predict"] = 3
        assert httpx.post(f"{srv.url}/api/chat", json=body, timeout=TIMEOUT_S).json()["eval_count"] == 3


# JSON Schema's own keywords, so that generated shapes reach the checks and the grammar converter, not only the
# "unknown keyword" path; values of every JSON type, nested
_KEYWORDS = ["type", "properties", "items", "$ref", "pattern", "enum", "required", "additionalProperties", "minItems",
             "maxItems", "minLength", "maxLength", "anyOf", "oneOf", "allOf", "format", "const", "$defs",
             "definitions", "dependencies", "patternProperties", "prefixItems", "minimum", "maximum"]


def _hostile_schemas():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
               | st.sampled_from(["object", "array", "string", "integer", "#/$defs/a", "#", "(", "[a-z]{2,3}", "\ud800",
                                  "file:///etc/passwd"]) | st.text(max_size=12))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(_KEYWORDS) | st.text(max_size=6), inner, max_size=5),
                          max_leaves=24)
    return st.dictionaries(st.sampled_from(_KEYWORDS), values, min_size=1, max_size=6)


def test_fuzzed_format_and_response_format_shapes_never_give_a_500(server):
    """A fuzzer (hypothesis) over the schema fields of both APIs -- Ollama's ``format`` and OpenAI's
    ``response_format.json_schema.schema`` -- with hostile shapes: every answer is a 200 or a 4xx naming the
    problem, never a 500, and the server keeps answering on the same connection."""
    from hypothesis import HealthCheck, given, settings

    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http:
        @settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(schema=_hostile_schemas())
        def check(schema: dict[str, Any]) -> None:
            def post(path: str, body: dict[str, Any]) -> httpx.Response:  # escaped JSON: lone surrogates travel too
                return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

            ollama = post("/api/chat", ollama_chat(schema, num_predict=1))
            v1 = post("/v1/chat/completions", {
                "model": TEST_MODEL, "messages": QUESTION, "max_tokens": 1, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
            for answer in (ollama, v1):
                assert answer.status_code < 500, (schema, answer.status_code, answer.text[:300])
                assert answer.status_code in (200, 400, 422), (schema, answer.status_code, answer.text[:300])

        check()
        assert http.get("/api/version").status_code == 200
