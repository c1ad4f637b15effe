"""The Ollama-compatible API: the official ``ollama`` client and the kit's own OllamaBackend against a real
uvicorn server on a free loopback port (a background thread of this process, so the test can read the
embedded model's ``tokens_decoded`` counter), with the real SmolLM2-135M model; then schemathesis against
the app's OpenAPI schema (in-process ASGI, with a server-side cap of a few tokens per call so it is quick).

Counts are asserted in tokens, never in seconds (the machine is shared and noisy).
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import jsonschema
import ollama
import pytest

from conftest import wait_until_idle
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from llmfirst_kit import __version__
from llmfirst_kit.backends.base import CallRequest
from llmfirst_kit.backends.ollama import OllamaBackend
from llmfirst_kit.errors import UnknownModel
from llmfirst_kit.pipeline import Pipeline
from llmfirst_kit.serve import ServerConfig, ServerThread, create_app

TEST_MODEL = "smollm2-135m"
LONG = "Write a long story about a dragon."
SHORT = "What is 2+2?"
TIMEOUT_S = 240.0
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


@pytest.fixture(scope="module")
def server(loaded):
    """Decodes with the test model instance (same thread count), so ``loaded.tokens_decoded`` counts its work."""
    with ServerThread(config=ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads)) as srv:
        assert srv.app.state.kit.embedded.load(TEST_MODEL) is loaded
        yield srv


@pytest.fixture
def client(server) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=server.url, timeout=TIMEOUT_S)


def check_final(final, prompt_tokens_at_least: int = 1) -> None:
    """Ollama's final statistics: exact counts and measured nanosecond durations that add up."""
    assert final.done is True and final.done_reason in ("stop", "length")
    assert final.prompt_eval_count >= prompt_tokens_at_least and final.eval_count >= 1
    parts = (final.load_duration, final.prompt_eval_duration, final.eval_duration)
    assert all(isinstance(d, int) and d >= 0 for d in (final.total_duration, *parts))
    assert final.load_duration > 0 and final.prompt_eval_duration > 0
    assert final.eval_count == 1 or final.eval_duration > 0
    assert sum(parts) <= final.total_duration  # the rest is the wait for the model (others' calls)


# ------------------------------------------------------------------------------ the official client

async def test_version_tags_show_ps(client, server):
    assert httpx.get(f"{server.url}/api/version").json() == {"version": __version__}
    names = {m.model: m for m in (await client.list()).models}
    listed = names[f"{TEST_MODEL}:latest"]
    assert listed.size > 0 and listed.digest and listed.details.quantization_level == "Q4_1"
    for name in (TEST_MODEL, f"{TEST_MODEL}:latest"):
        shown = await client.show(name)
        assert shown.details.family == "llama" and shown.modelinfo["general.architecture"] == "llama"
        assert "<|im_start|>" in shown.template and shown.capabilities == ["completion"]
    running = {m.model: m for m in (await client.ps()).models}
    assert running[f"{TEST_MODEL}:latest"].context_length == 4096
    with pytest.raises(ollama.ResponseError) as info:
        await client.show("llama3:8b")
    assert info.value.status_code == 404 and "known: " in info.value.error


async def test_generate_streamed(client):
    parts = [p async for p in await client.generate(TEST_MODEL, SHORT, stream=True,
                                                      options={"num_predict": 16, "temperature": 0})]
    final, chunks = parts[-1], parts[:-1]
    assert all(p.done is False and p.model == TEST_MODEL and p.created_at for p in chunks)
    text = "".join(p.response for p in chunks)
    assert text.strip() and final.response == ""
    check_final(final)
    assert len([p for p in chunks if p.response]) <= final.eval_count <= 16


def test_each_answer_reports_its_own_compliance_from_what_its_bodies_carried(server):
    """The HTTP sink: the last object of an answer carries ``llmfirst`` (an extra key clients ignore), its
    figure from the content it put in its bodies -- counted here from the raw NDJSON lines as received."""
    body = {"model": TEST_MODEL, "messages": [{"role": "user", "content": SHORT}], "options": {"num_predict": 12}}
    with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=TIMEOUT_S) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    content = "".join(o["message"]["content"] for o in lines)
    figures = lines[-1]["llmfirst"]
    assert figures["sink"]["sink"] == "http" and figures["sink"]["content_chars"] == len("".join(content.split()))
    assert figures["compliance"] == figures["sink"]["model_chars"] / figures["sink"]["content_chars"]
    whole = httpx.post(f"{server.url}/api/chat", json={**body, "stream": False}, timeout=TIMEOUT_S).json()
    assert whole["llmfirst"]["sink"]["content_chars"] == len("".join(whole["message"]["content"].split()))
    sse = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT_S, json={
        "model": TEST_MODEL, "messages": body["messages"], "max_tokens": 12, "stream": True}).text
    events = [json.loads(e[len("data: "):]) for e in sse.split("\n\n") if e.startswith("data: {")]
    streamed = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert events[-1]["llmfirst"]["sink"]["content_chars"] == len("".join(streamed.split()))


async def test_generate_not_streamed_stops_at_num_predict(client):
    result = await client.generate(TEST_MODEL, LONG, options={"num_predict": 5, "temperature": 0})
    assert result.response.strip() and result.done_reason == "length" and result.eval_count == 5
    check_final(result)


async def test_chat_streamed_equals_not_streamed_and_options_apply(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}]
    options = {"num_predict": 12, "temperature": 0.9, "seed": 7, "top_k": 20, "top_p": 0.8}
    streamed = [p async for p in await client.chat(TEST_MODEL, messages, stream=True, options=options)]
    whole = await client.chat(f"{TEST_MODEL}:latest", messages, options=options)
    assert "".join(p.message.content for p in streamed) == whole.message.content  # same seed, same text
    assert whole.message.role == "assistant" and whole.model == f"{TEST_MODEL}:latest"
    check_final(streamed[-1])
    check_final(whole)
    free = await client.chat(TEST_MODEL, [{"role": "user", "content": SHORT}], options={"temperature": 0,
                                                                                       "num_predict": 16})
    assert "4" in free.message.content
    stopped = await client.chat(TEST_MODEL, [{"role": "user", "content": SHORT}],
                                options={"temperature": 0, "num_predict": 16, "stop": ["4"]})
    assert "4" not in stopped.message.content and stopped.done_reason == "stop"


async def test_structured_output(client):
    messages = [{"role": "user", "content": "What is 2+2? Reply in JSON with the field answer."}]
    shaped = await client.chat(TEST_MODEL, messages, format=ANSWER_SCHEMA, options={"num_predict": 48, "temperature": 0})
    jsonschema.validate(json.loads(shaped.message.content), ANSWER_SCHEMA)
    anything = await client.generate(TEST_MODEL, "Describe a cat in JSON.", format="json",
                                     options={"num_predict": 48, "temperature": 0})
    assert anything.response.lstrip().startswith("{")
    if anything.done_reason == "stop":
        assert isinstance(json.loads(anything.response), dict)


async def test_empty_prompt_loads_the_model(client):
    loaded = await client.generate(TEST_MODEL, "")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    chat_loaded = await client.chat(TEST_MODEL, [])
    assert chat_loaded.done_reason == "load"


BAD_BODIES = [
    ("/api/generate", b"{nope", "not valid JSON"),
    ("/api/generate", {"prompt": "hi"}, "model: Field required"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "options": {"temperature": -1}}, "options.temperature"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "options": {"num_predict": "5"}}, "options.num_predict"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "options": {"num_predict": 0}}, "num_predict 0"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "options": {"repeat_penalty": 1.1}}, "supported: num_predict"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "options": {"num_ctx": 1_000_000}}, "lower num_ctx"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "think": True}, "does not support thinking"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "raw": True}, "raw"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "format": "xml"}, "format"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "format": {"enum": []}}, "does not parse"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "format": {"type": "string", "maxLength": 100000}},
     "too large"),
    ("/api/generate", {"model": TEST_MODEL, "prompt": "hi", "format": {"type": 5}}, "not a valid JSON schema"),
    ("/api/chat", {"model": TEST_MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, "end the conversation"),
    ("/api/chat", {"model": TEST_MODEL, "messages": [{"role": "tool", "content": "1"}]}, "role 'tool'"),
    ("/api/chat", {"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function"}]}, "does not support tools"),
    ("/api/chat", {"model": TEST_MODEL, "messages": [{"role": "user", "content": " "}]}, "empty"),
    ("/api/show", {}, "no 'model'"),
]


@pytest.mark.parametrize("path,body,fix", BAD_BODIES, ids=[f"{p}:{f}" for p, _, f in BAD_BODIES])
def test_bad_bodies_are_400_naming_the_problem(server, path, body, fix):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content, timeout=TIMEOUT_S)
    assert response.status_code == 400, response.text
    assert fix in response.json()["error"], response.json()


async def test_unknown_model_is_404_and_curl_style_bodies_work(client, server):
    for call in (client.generate("llama3", "hi"), client.chat("nope:7b", [{"role": "user", "content": "hi"}])):
        with pytest.raises(ollama.ResponseError) as info:
            await call
        assert info.value.status_code == 404 and TEST_MODEL in info.value.error
    with pytest.raises(ollama.ResponseError) as info:  # a path is not a model name here
        await client.generate("/etc/passwd", "hi")
    assert info.value.status_code == 404
    # curl -d sends application/x-www-form-urlencoded; Ollama reads JSON anyway, and so do we
    body = json.dumps({"model": TEST_MODEL, "prompt": SHORT, "stream": False, "options": {"num_predict": 3}})
    response = httpx.post(f"{server.url}/api/generate", content=body, timeout=TIMEOUT_S,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["eval_count"] <= 3
    too_big = httpx.post(f"{server.url}/api/generate", content=b" " * (5 << 20), timeout=TIMEOUT_S)
    assert too_big.status_code == 413


# --------------------------------------------------------------------------- leaving mid-answer

async def test_client_leaving_a_streamed_answer_stops_decoding(server, loaded):
    before = await wait_until_idle(loaded)
    body = {"model": TEST_MODEL, "prompt": LONG, "options": {"num_predict": 200}}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
        async with http.stream("POST", "/api/generate", json=body) as response:
            lines = 0
            async for _ in response.aiter_lines():
                lines += 1
                if lines == 3:
                    break
            at_close = loaded.tokens_decoded
    after = await wait_until_idle(loaded)
    assert at_close - before >= 3 and after - at_close <= 10 and after - before < 100


async def test_client_leaving_a_whole_answer_stops_decoding(server, loaded):
    before = await wait_until_idle(loaded)
    body = {"model": TEST_MODEL, "prompt": LONG, "stream": False, "options": {"num_predict": 200}}
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as http:
        request = asyncio.create_task(http.post("/api/generate", json=body))
        async with asyncio.timeout(TIMEOUT_S):
            while loaded.tokens_decoded < before + 3:
                await asyncio.sleep(0.005)
        at_cancel = loaded.tokens_decoded
        request.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await request
    after = await wait_until_idle(loaded)
    assert after - at_cancel <= 10 and after - before < 100


# --------------------------------------------------------------------------- prefix reuse (KV cache)

async def test_prompt_eval_cached_count_reports_the_reused_prefix(server, loaded):
    """``prompt_eval_cached_count``: prompt tokens the model found in its KV cache. With the cache empty (as a
    fresh load leaves it): 0. The same conversation again: all but the last prompt token (replayed for its
    logits). Another question after it: only the chat template's opening is shared, so more than 0 and fewer
    than the repeat's."""
    def chat(question: str) -> dict:
        body = {"model": TEST_MODEL, "messages": [{"role": "user", "content": question}], "stream": False,
                "options": {"num_predict": 2, "temperature": 0, "seed": 1}}
        response = httpx.post(f"{server.url}/api/chat", json=body, timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        return response.json()

    await wait_until_idle(loaded)
    assert not loaded.busy
    with loaded.engine.exclusive():  # an empty KV cache, as after a fresh load (nothing else decodes in this test)
        pass
    fresh = await asyncio.to_thread(chat, SHORT)
    again = await asyncio.to_thread(chat, SHORT)
    other = await asyncio.to_thread(chat, "Name three rivers in Africa.")
    assert fresh["prompt_eval_cached_count"] == 0
    assert again["prompt_eval_count"] == fresh["prompt_eval_count"]
    assert again["prompt_eval_cached_count"] == again["prompt_eval_count"] - 1
    assert 0 < other["prompt_eval_cached_count"] < other["prompt_eval_count"] - 1


# ------------------------------------------------------------------------------ the kit's backend

async def test_kit_ollama_backend_end_to_end(server):
    backend = OllamaBackend(model=TEST_MODEL, host=server.url, timeout=TIMEOUT_S)
    try:
        assert await backend.version() == __version__
        assert f"{TEST_MODEL}:latest" in {m["model"] for m in await backend.list_models()}
        rec = await backend.call(CallRequest(messages=[{"role": "user", "content": SHORT}], max_tokens=8)).collect()
        assert rec.status == "ok" and rec.text.strip() and rec.finish_reason in ("stop", "length")
        assert rec.output_tokens == rec.server["eval_count"] == sum(rec.chunk_tokens) <= 8
        assert rec.prompt_tokens > 0 and rec.server["eval_duration"] >= 0 and rec.cold_load is False
        pipe = Pipeline.from_preset("direct", backend=backend, model=TEST_MODEL, max_tokens=8)
        run = await pipe.run(SHORT)
        assert run.status == "ok" and [s.call.text for s in run.stages if s.visible][0].strip()
        with pytest.raises(UnknownModel, match="ollama pull"):
            await backend.call(CallRequest(messages=[{"role": "user", "content": SHORT}], model="nope")).collect()
    finally:
        await backend.aclose()


# ---------------------------------------------------------------------------------- schemathesis

# in-process (never on a socket), where requests name the host "testserver": the Host check is off
fuzzed_app = create_app(ServerConfig(default_model=TEST_MODEL, max_predict=4, check_host=False,
                                     n_threads=int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))))
api_schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)


@api_schema.parametrize()
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_no_server_errors(case, loaded):
    """Bodies generated from the OpenAPI schema (and its examples): never a 5xx, never a crash, and every
    answer matches the documented status codes, content types and shapes."""
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])
