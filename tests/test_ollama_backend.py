"""OllamaBackend against a real HTTP server on loopback that speaks Ollama's wire protocol.

No Ollama server runs in the test environment, so -- as ollama-python tests itself -- pytest-httpserver
answers ``POST /api/chat`` with NDJSON exactly as Ollama's docs/api.md documents it (one JSON object per
line, a final object with ``done: true`` and the statistics). Everything from the real ``ollama.AsyncClient``
down to the socket is real; the scripted server also lets us inject the faults a real server cannot be
made to produce on demand (a 404, an ``{"error": ...}`` line mid-stream, a stream cut before ``done``).
The last test runs against a real Ollama server when one is reachable, and is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from werkzeug import Request, Response

from llmfirst_kit.backends import get_backend
from llmfirst_kit.backends.base import CallRequest
from llmfirst_kit.backends.ollama import COLD_LOAD_THRESHOLD_S, DEFAULT_OLLAMA_MODEL, OllamaBackend
from llmfirst_kit.errors import BackendError, BackendUnavailable, InvalidInput, UnknownModel
from llmfirst_kit.metrics import call_metrics

from conftest import stream

MODEL = "qwen2.5:0.5b"
QUESTION = [{"role": "user", "content": "Say hello."}]


def part(content: str) -> dict[str, Any]:
    return {"model": MODEL, "created_at": "2025-01-01T00:00:00.000000Z",
            "message": {"role": "assistant", "content": content}, "done": False}


def final(**stats: Any) -> dict[str, Any]:
    body = {"model": MODEL, "created_at": "2025-01-01T00:00:01.000000Z",
            "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
            "total_duration": 1_234_567_890, "load_duration": 12_345_678, "prompt_eval_count": 26,
            "prompt_eval_duration": 98_765_432, "eval_count": 4, "eval_duration": 456_789_012}
    body.update(stats)
    return {k: v for k, v in body.items() if v is not None}


def ndjson(lines: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def serve_chat(httpserver, lines: list[dict[str, Any]], seen: list[dict[str, Any]] | None = None,
               status: int = 200) -> None:
    """Answer POST /api/chat with these NDJSON lines; append each request body to ``seen``."""

    def handler(request: Request) -> Response:
        if seen is not None:
            seen.append(request.get_json())
        return Response(ndjson(lines), status=status, content_type="application/x-ndjson")

    httpserver.expect_request("/api/chat", method="POST").respond_with_handler(handler)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def ollama(httpserver):
    """An OllamaBackend pointed at the loopback server (named apart from conftest's embedded ``backend``)."""
    b = OllamaBackend(MODEL, host=httpserver.url_for("/"))
    yield b
    await b.aclose()


# ------------------------------------------------------------------------------------------- streaming

async def test_streams_text_and_maps_server_stats(httpserver, ollama):
    seen: list[dict[str, Any]] = []
    serve_chat(httpserver, [part("Hel"), part("lo"), part(" world"), final()], seen)

    rec, chunks = await stream(ollama, CallRequest(messages=QUESTION, max_tokens=5))

    assert [c.text for c in chunks] == ["Hel", "lo", " world"]
    assert all(c.tokens == 1 for c in chunks)
    assert rec.text == "Hello world"
    assert rec.status == "ok" and rec.backend == "ollama" and rec.model == MODEL
    assert rec.start_ns <= rec.chunk_ns[0] <= rec.chunk_ns[1] <= rec.chunk_ns[2] <= rec.end_ns
    assert rec.chunk_ns == [c.t_ns for c in chunks]
    # the server's counts, not the chunk count (eval_count 4 != 3 chunks on purpose)
    assert rec.prompt_tokens == 26
    assert rec.output_tokens == 4
    assert rec.token_count_source == "ollama eval_count (server)"
    assert rec.finish_reason == "stop"
    assert rec.server == {"load_duration": 12_345_678, "prompt_eval_duration": 98_765_432,
                          "eval_duration": 456_789_012, "total_duration": 1_234_567_890,
                          "prompt_eval_count": 26, "eval_count": 4}
    assert rec.load_s == pytest.approx(0.012345678)
    assert rec.cold_load is False
    assert rec.model_info["host"] == httpserver.url_for("/").rstrip("/")

    m = call_metrics(rec)
    assert m.ttft_s is not None and m.ttft_s >= 0
    assert m.e2e_s is not None and m.e2e_s >= m.ttft_s
    assert m.tpot_s is not None and m.itl_mean_s is not None
    assert m.output_tokens == 4 and m.prompt_tokens == 26
    assert "eval_count" in m.token_count_source

    body = seen[0]
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["messages"] == QUESTION
    assert body["options"] == {"num_predict": 5, "temperature": 0.0, "seed": 0}  # unset options left out
    assert "format" not in body


async def test_sampling_options_forwarded(httpserver, ollama):
    seen: list[dict[str, Any]] = []
    serve_chat(httpserver, [part("ok"), final(eval_count=1)], seen)
    req = CallRequest(messages=QUESTION, model="llama3.2:1b", max_tokens=32, temperature=0.7, seed=42,
                      top_k=20, top_p=0.9, stop=["\n\n"], num_ctx=8192)

    rec, _ = await stream(ollama, req)

    assert rec.model == "llama3.2:1b"
    assert seen[0]["model"] == "llama3.2:1b"
    assert seen[0]["options"] == {"num_predict": 32, "temperature": 0.7, "seed": 42, "top_k": 20,
                                  "top_p": 0.9, "stop": ["\n\n"], "num_ctx": 8192}


async def test_structured_output_forwards_the_schema(httpserver, ollama):
    schema = {"type": "object", "properties": {"route": {"type": "string", "enum": ["search", "answer"]}},
              "required": ["route"]}
    seen: list[dict[str, Any]] = []
    serve_chat(httpserver, [part('{"route"'), part(': "search"}'), final(eval_count=6)], seen)

    rec, _ = await stream(ollama, CallRequest(messages=QUESTION, json_schema=schema))

    assert seen[0]["format"] == schema
    assert json.loads(rec.text) == {"route": "search"}
    assert rec.params["structured"] is True


@pytest.mark.parametrize("load_ns, cold", [(2_500_000_000, True), (4_000_000, False)])
async def test_cold_load_flag_follows_load_duration(httpserver, ollama, load_ns, cold):
    serve_chat(httpserver, [part("Hi"), final(load_duration=load_ns)])

    rec, _ = await stream(ollama, CallRequest(messages=QUESTION))

    assert rec.cold_load is cold
    assert rec.load_s == pytest.approx(load_ns / 1e9)
    assert (rec.load_s > COLD_LOAD_THRESHOLD_S) is cold
    assert call_metrics(rec).cold_load is cold


async def test_without_eval_count_falls_back_to_chunks(httpserver, ollama):
    serve_chat(httpserver, [part("a"), part("b"), part("c"), final(eval_count=None, prompt_eval_count=None)])

    rec, _ = await stream(ollama, CallRequest(messages=QUESTION))

    assert rec.output_tokens == 3
    assert "no eval_count" in rec.token_count_source
    assert rec.prompt_tokens is None
    assert rec.server["eval_count"] is None


async def test_leaving_early_cancels_and_closes_the_connection(httpserver, ollama):
    """Ollama stops generating when its client disconnects: leaving the loop must close the stream."""
    server_saw: list[str] = []

    def slow_handler(request: Request) -> Response:
        def lines():
            try:
                for i in range(40):
                    yield json.dumps(part(f"t{i} ")) + "\n"
                    time.sleep(0.05)
                yield json.dumps(final()) + "\n"
                server_saw.append("sent everything")
            except GeneratorExit:
                server_saw.append("client disconnected")
                raise
        return Response(lines(), content_type="application/x-ndjson")

    httpserver.expect_request("/api/chat", method="POST").respond_with_handler(slow_handler)
    call = ollama.call(CallRequest(messages=QUESTION))

    async for chunk in call:
        assert chunk.text == "t0 "
        break
    for _ in range(10):  # the loop finalises the abandoned generators as tasks: let them run
        await asyncio.sleep(0)

    assert call.record.status == "cancelled"
    assert call.record.text == "t0 "
    for _ in range(100):
        if server_saw:
            break
        await asyncio.sleep(0.05)
    assert server_saw == ["client disconnected"]


# ---------------------------------------------------------------------------------------------- errors

async def test_unknown_model_names_the_pull_command(httpserver, ollama):
    httpserver.expect_request("/api/chat", method="POST").respond_with_json(
        {"error": "model 'nosuch:1b' not found"}, status=404)
    call = ollama.call(CallRequest(messages=QUESTION, model="nosuch:1b"))

    with pytest.raises(UnknownModel) as info:
        await call.collect()

    assert "ollama pull nosuch:1b" in str(info.value)
    assert "'nosuch:1b'" in str(info.value)
    assert call.record.status == "error" and call.record.text == ""
    assert call.record.error.startswith("UnknownModel: ")


async def test_unreachable_server_names_ollama_serve_and_ollama_host():
    port = closed_port()
    b = OllamaBackend(MODEL, host=f"http://127.0.0.1:{port}")
    call = b.call(CallRequest(messages=QUESTION))

    with pytest.raises(BackendUnavailable) as info:
        await call.collect()

    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message
    assert "ollama serve" in message and "OLLAMA_HOST" in message
    assert call.record.status == "error"
    await b.aclose()


async def test_unreachable_server_for_list_models_too():
    b = OllamaBackend(host=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BackendUnavailable, match="OLLAMA_HOST"):
        await b.list_models()
    await b.aclose()


async def test_error_line_mid_stream_keeps_the_text_so_far(httpserver, ollama):
    serve_chat(httpserver, [part("Hello"), part(", wor"), {"error": "an error was encountered while running the model"}])
    call = ollama.call(CallRequest(messages=QUESTION))
    received: list[str] = []

    with pytest.raises(BackendError) as info:
        async for chunk in call:
            received.append(chunk.text)

    assert not isinstance(info.value, (UnknownModel, BackendUnavailable))
    assert "an error was encountered while running the model" in str(info.value)
    assert received == ["Hello", ", wor"]
    assert call.record.text == "Hello, wor"
    assert call.record.status == "error" and call.record.finish_reason == "error"
    assert len(call.record.chunk_ns) == 2


async def test_other_http_error_reports_status_and_message(httpserver, ollama):
    httpserver.expect_request("/api/chat", method="POST").respond_with_json(
        {"error": "model requires more system memory (5.5 GiB) than is available (1.2 GiB)"}, status=500)

    with pytest.raises(BackendError) as info:
        await ollama.call(CallRequest(messages=QUESTION)).collect()

    assert not isinstance(info.value, UnknownModel)
    assert "HTTP 500" in str(info.value) and "more system memory" in str(info.value)


async def test_stream_cut_before_done_is_an_error(httpserver, ollama):
    serve_chat(httpserver, [part("partial"), part(" answer")])
    call = ollama.call(CallRequest(messages=QUESTION))

    with pytest.raises(BackendError, match="final statistics"):
        await call.collect()

    assert call.record.text == "partial answer"
    assert call.record.status == "error"


async def test_cold_cache_request_is_refused_before_any_call(httpserver, ollama):
    with pytest.raises(InvalidInput, match="cache='reuse'"):
        await ollama.call(CallRequest(messages=QUESTION, cache="cold")).collect()
    assert httpserver.log == []


# ------------------------------------------------------------------------------------ host and helpers

def test_host_from_argument_env_or_default(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert OllamaBackend().host == "http://127.0.0.1:11434"
    assert OllamaBackend().resolve_model(None) == DEFAULT_OLLAMA_MODEL
    assert OllamaBackend("llama3.2:1b").resolve_model(None) == "llama3.2:1b"
    monkeypatch.setenv("OLLAMA_HOST", "10.1.2.3:5000")
    assert OllamaBackend().host == "http://10.1.2.3:5000"
    assert OllamaBackend(host="http://127.0.0.1:9").host == "http://127.0.0.1:9"
    assert isinstance(get_backend("ollama", model="x:1b"), OllamaBackend)


async def test_env_host_is_used_for_the_call(httpserver, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", httpserver.url_for("/"))
    serve_chat(httpserver, [part("via env"), final()])
    b = OllamaBackend()

    rec = await b.call(CallRequest(messages=QUESTION)).collect()

    assert rec.text == "via env" and rec.model == DEFAULT_OLLAMA_MODEL
    await b.aclose()


async def test_list_models_and_version(httpserver, ollama):
    httpserver.expect_request("/api/tags", method="GET").respond_with_json({"models": [
        {"model": "qwen2.5:0.5b", "modified_at": "2025-01-01T00:00:00Z", "digest": "abc", "size": 397821319,
         "details": {"family": "qwen2", "parameter_size": "494.03M", "quantization_level": "Q4_K_M"}}]})
    httpserver.expect_request("/api/version", method="GET").respond_with_json({"version": "0.9.6"})

    models = await ollama.list_models()

    assert [m["model"] for m in models] == ["qwen2.5:0.5b"]
    assert models[0]["size"] == 397821319
    assert models[0]["details"]["quantization_level"] == "Q4_K_M"
    assert await ollama.version() == "0.9.6"


# ------------------------------------------------------------------------------ a real server, if any

def _real_ollama_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 11434), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _real_ollama_up(), reason="no Ollama server on 127.0.0.1:11434")
async def test_real_ollama_server(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    b = OllamaBackend(host="http://127.0.0.1:11434")
    try:
        rec = await b.call(CallRequest(messages=QUESTION, max_tokens=8)).collect()
    except UnknownModel as exc:
        pytest.skip(str(exc))
    finally:
        await b.aclose()
    assert rec.status == "ok" and rec.text
    assert rec.output_tokens and rec.output_tokens <= 8
    assert rec.server["eval_count"] == rec.output_tokens
