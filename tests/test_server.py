"""The server's WebSocket API, its security checks and the load benchmark, against a real uvicorn server on
a free loopback port (a background thread of this process, so the test can read the embedded model's
``tokens_decoded`` counter) with real WebSocket clients (``websockets``) and the real SmolLM2-135M model.

Counts are asserted in tokens and messages, never in seconds (the machine is shared and noisy).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import wait_until_idle

from llmfirst_kit.bench.ws_load import bench_serve, bench_serve_async, format_bench
from llmfirst_kit.serve import (
    Outbox,
    Outgoing,
    ServerConfig,
    ServerThread,
    TokenRequired,
    check_bind,
    check_run_messages,
    is_loopback,
    serve,
)

TEST_MODEL = "smollm2-135m"
LONG = "Write a long story about a dragon."  # SmolLM2 does not stop on its own within 200 tokens
SHORT = "What is 2+2?"
TIMEOUT_S = 240  # per wait for a run: the machine is shared, decoding can be slow


@pytest.fixture(scope="module")
def server(loaded):
    """Decodes with the test model instance (same thread count), so ``loaded.tokens_decoded`` counts its work."""
    with ServerThread(config=ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads)) as srv:
        assert srv.app.state.kit.embedded.load(TEST_MODEL) is loaded
        yield srv


@pytest.fixture(scope="module")
def token_server():
    with ServerThread(config=ServerConfig(token="s3cret-token", default_model=TEST_MODEL, n_threads=1)) as srv:
        yield srv


def run_message(query: str = SHORT, **fields: Any) -> str:
    return json.dumps({"query": query, "model": TEST_MODEL, "max_tokens": 8, **fields})


async def receive(ws) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT_S):
        return json.loads(await ws.recv())


async def collect_run(ws) -> list[dict[str, Any]]:
    """The messages of the next run, through its ``complete``."""
    messages = []
    while True:
        message = await receive(ws)
        messages.append(message)
        if message["type"] == "complete":
            return messages


def strings_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(strings_in(v) for v in value)) if value else set()
    return set()


# ------------------------------------------------------------------------------------------ runs

async def test_run_streams_ordered_messages_without_canned_text(server):
    async with connect(server.ws_url) as ws:
        await ws.send(run_message(ref="first"))
        messages = await collect_run(ws)
    assert check_run_messages(messages) == []
    types = [m["type"] for m in messages]
    assert types[:2] == ["start", "stage_start"] and types[-2:] == ["stage_end", "complete"]
    assert set(types[2:-2]) == {"chunk"}
    start, end = messages[0], messages[-1]
    run_id = start["run_id"]
    assert start["ref"] == "first" and start["model"] == TEST_MODEL and start["stages"] == ["answer"]
    assert start["max_tokens"] == 8 and all(isinstance(m["t_ns"], int) for m in messages)
    # control messages carry ids, names and figures only: no sentence written by the server
    assert strings_in(start) <= {"start", run_id, "first", "direct", "embedded", TEST_MODEL, "answer"}
    assert strings_in(end) <= {"complete", run_id, "first", "ok", "websocket"}
    assert end["status"] == "ok"
    assert end["metrics"]["user_ttft_s"] > 0 and end["metrics"]["output_tokens"] > 0
    content = "".join(m["content"] for m in messages if m["type"] == "chunk")
    assert content.strip() and len(content) == messages[-2]["output_chars"]
    # the complete message's compliance is this WebSocket's own: it counted exactly what this client received
    sink = end["sink"]
    assert sink["sink"] == "websocket" and sink["content_chars"] == len("".join(content.split()))
    assert end["compliance"] == sink["model_chars"] / sink["content_chars"] and sink["chrome_chars"] == 0


async def test_queries_on_one_connection_run_in_order(server):
    async with connect(server.ws_url) as ws:
        await ws.send(run_message(ref="a"))
        await ws.send(run_message("Name a colour.", ref="b"))
        first, second = await collect_run(ws), await collect_run(ws)
    for messages, ref in ((first, "a"), (second, "b")):
        assert check_run_messages(messages) == []
        assert messages[0]["ref"] == messages[-1]["ref"] == ref and messages[-1]["status"] == "ok"
    assert first[0]["run_id"] != second[0]["run_id"]
    assert first[-1]["t_ns"] < second[0]["t_ns"]  # the second starts after the first completed


async def test_cancel_by_message_running_and_waiting(server, loaded):
    async with connect(server.ws_url) as ws:
        await ws.send(run_message(LONG, max_tokens=200, ref="long"))
        await ws.send(run_message(ref="queued"))
        messages = [await receive(ws)]
        while messages[-1]["type"] != "chunk":
            messages.append(await receive(ws))
        run_id = messages[0]["run_id"]
        await ws.send(json.dumps({"type": "cancel", "ref": "queued"}))  # waiting: never decodes
        await ws.send(json.dumps({"type": "cancel", "run_id": run_id}))  # running: stops
        at_cancel = loaded.tokens_decoded
        while messages[-1]["type"] != "complete":
            messages.append(await receive(ws))
        queued = await collect_run(ws)
        decoded_after = await wait_until_idle(loaded) - at_cancel
        assert messages[-1]["status"] == "cancelled" and messages[-1]["ref"] == "long"
        assert check_run_messages(messages) == []
        assert [m["type"] for m in queued] == ["start", "complete"]
        assert queued[0]["ref"] == "queued" and queued[-1]["status"] == "cancelled"
        assert at_cancel > 0 and decoded_after <= 10  # stopped within a few token steps (200 were allowed)
        # the connection stays usable; cancelling what already ended does nothing
        await ws.send(json.dumps({"type": "cancel", "run_id": run_id}))
        await ws.send(run_message())
        again = await collect_run(ws)
    assert again[-1]["status"] == "ok" and check_run_messages(again) == []


async def test_disconnect_mid_run_stops_decoding(server, loaded):
    before = await wait_until_idle(loaded)
    async with connect(server.ws_url) as ws:
        await ws.send(run_message(LONG, max_tokens=200))
        chunks = 0
        while chunks < 3:
            chunks += (await receive(ws))["type"] == "chunk"
        at_close = loaded.tokens_decoded
    after = await wait_until_idle(loaded)
    assert at_close - before >= 3  # the counter is the one the server decodes with
    assert after - at_close <= 10, "decoding went on after the client left"
    assert after - before < 100


# ----------------------------------------------------------------------------------- bad input

MALFORMED = [
    ("{not json", "invalid_json", "send one JSON object"),
    ("[1, 2]", "invalid_message", "send one JSON object"),
    (json.dumps({"query": SHORT, "colour": "red"}), "unknown_field", "takes: type, query"),
    (json.dumps({"query": SHORT, "model": "gpt-9"}), "unknown_model", "known: "),
    (json.dumps({"query": SHORT, "model": "/etc/passwd"}), "unknown_model", "known: "),
    (json.dumps({"query": SHORT, "preset": "fancy"}), "invalid_input",
     "known: bare, direct, staged, staged:analysis-first, cascade"),
    (json.dumps({"query": SHORT, "backend": "nope"}), "invalid_input", "known: embedded, ollama"),
    (json.dumps({"query": "x" * 8001}), "query_too_long", "at most 8000"),
    (json.dumps({"query": SHORT, "max_tokens": "many"}), "invalid_field", "max_tokens must be an integer"),
    (json.dumps({"query": SHORT, "max_tokens": 0}), "invalid_field", "between 1 and"),
    (json.dumps({"query": "  "}), "invalid_input", '{"query": "your question"}'),
    (json.dumps({"query": "Hi \ud800 there"}), "invalid_input", "send valid UTF-8 text"),  # a lone surrogate
    (json.dumps({"type": "dance"}), "invalid_field", "'run' (the default) or 'cancel'"),
    (json.dumps({"query": "y" * 70_000}), "message_too_large", "at most 65536 bytes"),
    ("[" * 100_000 + "]" * 100_000, "message_too_large", "bytes per message"),
]


async def test_malformed_messages_get_errors_and_the_connection_survives(server):
    async with connect(server.ws_url, max_size=None) as ws:
        for text, code, fix in MALFORMED:
            await ws.send(text)
            error = await receive(ws)
            assert error["type"] == "error" and error["run_id"] is None, text[:40]
            assert error["code"] == code, (text[:40], error)
            assert fix in error["detail"], (text[:40], error["detail"])
        await ws.send(b"\x00binary")
        assert (await receive(ws))["code"] == "invalid_message"
        deep = "[" * 5000 + "]" * 5000  # under the size limit, deeper than the JSON parser recurses
        await ws.send(deep)
        assert (await receive(ws))["code"] == "invalid_json"
        await ws.send(run_message(max_tokens=4))
        assert (await collect_run(ws))[-1]["status"] == "ok"


# ------------------------------------------------------------------------------- several clients

async def test_concurrent_clients_all_complete_in_order(server):
    result = await bench_serve_async(clients=4, queries=2, url=server.ws_url, max_tokens=8, timeout_s=600)
    assert result["runs_expected"] == result["runs_completed"] == 8, result["runs_with_problems"]
    assert not result["timed_out"] and not result["client_failures"]
    assert result["user_ttft_s_p50"] > 0 and result["e2e_s_p95"] >= result["e2e_s_p50"]
    assert result["runs_per_min"] > 0
    assert "runs completed: 8/8" in format_bench(result)


async def test_a_client_that_stops_reading_does_not_stall_the_others(server):
    async with connect(server.ws_url) as slow, connect(server.ws_url) as fast:
        await slow.send(run_message(LONG, max_tokens=48))  # and read nothing for now
        await asyncio.sleep(0.2)
        await fast.send(run_message())
        fast_run = await collect_run(fast)  # queued behind the slow client's call, which must not wait for it
        slow_run = await collect_run(slow)
    assert fast_run[-1]["status"] == "ok" and check_run_messages(fast_run) == []
    assert slow_run[-1]["status"] == "ok" and check_run_messages(slow_run) == []  # nothing lost meanwhile


def test_outbox_merges_waiting_chunks_and_reports_overflow():
    def chunk(call: str, text: str) -> Outgoing:
        return Outgoing("chunk", "run-1", 1, {"stage": "answer", "call_id": call, "content": text, "tokens": 1,
                                              "visible": True})

    async def scenario() -> None:
        box = Outbox(max_bytes=2000)
        assert box.put(chunk("c1", "Hel")) and box.put(chunk("c1", "lo"))
        box.put(Outgoing("stage_end", "run-1", 2, {"stage": "answer", "call_id": "c1"}))
        box.put(chunk("c2", "a"))
        box.put(chunk("c2", "b"))
        assert len(box) == 3
        merged = await box.get()
        assert merged.fields["content"] == "Hello" and merged.fields["tokens"] == 2 and merged.t_ns == 1
        assert [(await box.get()).type for _ in range(2)] == ["stage_end", "chunk"]
        assert box.waiting_bytes == 0 and not box.overflowed.is_set()
        assert not box.put(chunk("c3", "x" * 3000)) and box.overflowed.is_set()

    asyncio.run(scenario())


class StalledClient:
    """A FAKE WebSocket, to inject a fault a real client cannot produce on demand: it sends one run, then
    stops reading for good, so every send after the first blocks (through real sockets the kernel's
    buffers would swallow megabytes first). The server and the model are real."""

    def __init__(self, first_message: str):
        self.inbox = [first_message]
        self.sent: list[str] = []
        self.closed: tuple[int, str | None] | None = None

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        if self.inbox:
            return {"type": "websocket.receive", "text": self.inbox.pop()}
        await asyncio.Event().wait()  # says nothing more, never leaves
        raise AssertionError("unreachable")

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        if len(self.sent) > 1:
            await asyncio.Event().wait()  # the peer stopped reading

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)


async def test_a_client_that_stops_reading_is_dropped_and_its_run_cancelled(loaded):
    from llmfirst_kit.serve import Connection, ServerState

    state = ServerState(ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads, send_buffer_bytes=600))
    ws = StalledClient(run_message(LONG, max_tokens=200))
    before = await wait_until_idle(loaded)
    async with asyncio.timeout(TIMEOUT_S):
        await Connection(ws, state).serve()  # returns once the buffer overflowed and the client was dropped
    after = await wait_until_idle(loaded)
    assert ws.closed is not None and ws.closed[0] == 1008 and "stopped reading" in ws.closed[1]
    assert json.loads(ws.sent[0])["type"] == "start"
    assert 0 < after - before < 200  # merged chunks filled 600 bytes well before 200 tokens; then it stopped


def test_bench_serve_starts_its_own_server_and_stops():
    result = bench_serve(clients=2, queries=1, max_tokens=4, timeout_s=600, n_threads=1)
    assert result["runs_completed"] == 2 and result["url"].startswith("ws://127.0.0.1:")
    assert result["warmup"]["status"] == "ok"
    with pytest.raises(Exception, match="loopback"):
        bench_serve(clients=1, queries=1, url="ws://192.0.2.1:8765/ws")
    with pytest.raises(Exception, match="clients must be"):
        bench_serve(clients=10_000, queries=1)


# ------------------------------------------------------------------------------------- security

def test_loopback_names():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org", ""))


def test_refuses_to_listen_off_loopback_without_a_token(monkeypatch):
    monkeypatch.delenv("LLMFIRST_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(TokenRequired, match="--token") as info:
            check_bind(host, None)
        assert "LLMFIRST_TOKEN" in str(info.value) and info.value.code == "token_required"
    with pytest.raises(TokenRequired):
        serve("0.0.0.0", 0)  # refused before anything binds
    with pytest.raises(TokenRequired):
        ServerThread(host="0.0.0.0")
    check_bind("0.0.0.0", "a-token")  # with a token it may
    check_bind("127.0.0.1", None)


def test_token_is_checked_on_every_http_request(token_server):
    url = f"{token_server.url}/api/version"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401 and "Authorization: Bearer" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{token_server.url}/api/chat", json={}).status_code == 401
    assert httpx.get(f"{token_server.url}/openapi.json").status_code == 401
    ok = httpx.get(url, headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and ok.json()["version"]


async def test_token_is_checked_on_the_websocket_handshake(token_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as info:
            async with connect(token_server.ws_url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
    async with connect(token_server.ws_url, additional_headers={"Authorization": "Bearer s3cret-token"}) as ws:
        await ws.send("{")
        assert (await receive(ws))["code"] == "invalid_json"


async def test_browser_origins_and_rebound_hosts_are_refused(server):
    evil = {"Origin": "https://evil.example"}
    response = httpx.post(f"{server.url}/api/generate", json={"model": TEST_MODEL, "prompt": "hi"}, headers=evil)
    assert response.status_code == 403 and "allowed_origins" in response.json()["error"]
    assert httpx.get(f"{server.url}/api/version", headers={"Origin": "http://localhost:3000"}).status_code == 200
    rebound = httpx.get(f"{server.url}/api/version", headers={"Host": "attacker.example:8765"})
    assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.ws_url, origin="https://evil.example"):
            pass
    assert info.value.response.status_code == 403
