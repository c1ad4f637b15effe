"""OpenAIBackend against a real OpenAI-compatible server: llama-cpp-python's (``python -m llama_cpp.server``)
serving SmolLM2-135M on a free loopback port. No stubs: every request goes through the real
``openai.AsyncOpenAI`` to the real server.

What this server does that the tests rely on (llama-cpp-python 0.3.36, the pinned version):

- it ignores ``stream_options`` and sends no ``usage`` when streaming, so streamed calls take the chunk-count
  fallback; its non-streamed ``usage`` for the same greedy call is compared with that count;
- it rejects ``response_format`` of type ``json_schema`` with HTTP 500 (request validation wrapped as an
  internal error) and accepts ``{"type": "json_object", "schema": ...}``;
- asked for a model it does not serve, it silently answers with its default model (so the backend checks
  the model list itself);
- a prompt longer than its context ends the stream with HTTP 200 and no events at all;
- started with ``--api_key``, it answers 401 to any other key;
- by default a new request interrupts the one in flight (its stream just ends); the servers here are started
  with ``--interrupt_requests False`` so that concurrent requests queue.

The main server is started with an API key; the second one (killed mid-answer) without. The last tests run
against the kit's own server (``llmfirst serve``, its /v1 routes), which does send ``usage`` when streaming,
so the server-count path is checked end to end too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import fastjsonschema
import httpx
import pytest

from llmfirst_kit.backends import BACKENDS, get_backend
from llmfirst_kit.backends.base import CallRequest
from llmfirst_kit.backends.openai import DEFAULT_BASE_URL, NO_KEY, OpenAIBackend, completion_params, fill_stats
from llmfirst_kit.cli import EXIT_OK, main
from llmfirst_kit.errors import BackendError, BackendUnavailable, InvalidInput, UnknownModel
from llmfirst_kit.metrics import call_metrics
from llmfirst_kit.models import resolve
from llmfirst_kit.pipeline import Pipeline

from conftest import TEST_MODEL, TEST_THREADS, stream, wait_until_idle

KEY = "test-key"
N_CTX = 2048
QUESTION = [{"role": "user", "content": "Say hello."}]
LONG_ANSWER = [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]
COLOR_SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
                "required": ["color"]}


class Server:
    """A ``python -m llama_cpp.server`` subprocess on a free loopback port, its output in ``log``."""

    def __init__(self, log: Path, api_key: str | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        # llama-cpp-python's server, loaded in this machine's engine configuration (plain `-m llama_cpp.server`
        # dies by SIGSEGV at its first decode on a CPU with AMX)
        args = [sys.executable, "-m", "llmfirst_kit.llama_cpp_server", "--model", str(resolve(TEST_MODEL).path),
                "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(TEST_THREADS),
                "--n_ctx", str(N_CTX), "--model_alias", TEST_MODEL,
                # by default this server aborts the request in flight when a new one arrives; queue them instead
                # (as vLLM and llama-server do), so that concurrent requests (the load sweep) all get answers
                "--interrupt_requests", "False"]
        if api_key:
            args += ["--api_key", api_key]
        with open(log, "wb") as out:  # unbuffered, so the test can read the server's "disconnected" line
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._wait_ready(api_key, limit_s=60)

    def _wait_ready(self, api_key: str | None, limit_s: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/models", headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server not ready within {limit_s} s:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("openai") / "server.log", api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
async def oai(server):
    """An OpenAIBackend on the main server, json_object style (the one this server accepts)."""
    b = OpenAIBackend(TEST_MODEL, base_url=server.base_url, api_key=KEY, response_format_style="json_object")
    yield b
    await b.aclose()


# ------------------------------------------------------------------------------------------- streaming

async def test_streams_stamped_chunks_up_to_max_tokens(oai, server):
    rec, chunks = await stream(oai, CallRequest(messages=LONG_ANSWER, max_tokens=12))

    assert rec.status == "ok" and rec.backend == "openai" and rec.model == TEST_MODEL
    assert rec.text == "".join(c.text for c in chunks) and rec.text.strip()
    assert rec.chunk_ns == [c.t_ns for c in chunks]
    assert rec.start_ns <= rec.chunk_ns[0]
    assert all(a <= b for a, b in zip(rec.chunk_ns, rec.chunk_ns[1:]))
    assert rec.chunk_ns[-1] <= rec.end_ns
    # max_tokens honoured: the answer is cut, and this server sends one content chunk per token
    assert rec.finish_reason == "length"
    assert rec.output_tokens == len(chunks) == 12
    assert rec.token_count_source == "content chunks (server sent no usage; ~one token per chunk)"
    assert rec.prompt_tokens is None  # no usage, so no prompt count either
    assert rec.model_info == {"base_url": server.base_url, "model_id": TEST_MODEL}
    assert rec.server == {} and rec.load_s is None

    m = call_metrics(rec)
    assert m.ttft_s is not None and m.ttft_s > 0
    assert m.e2e_s is not None and m.e2e_s >= m.ttft_s
    assert m.tpot_s is not None and m.tpot_s > 0
    assert m.tpot_s == pytest.approx((m.e2e_s - m.ttft_s) / 11)
    assert m.output_tokens == 12 and "no usage" in m.token_count_source


async def test_chunk_count_matches_the_servers_own_usage(oai):
    """The fallback count agrees with the server's usage for the same greedy call (the server does report
    usage, just not when streaming); and fill_stats takes usage over chunks when a server sends it, as vLLM,
    SGLang, llama-server and Ollama's /v1 do on the final chunk when asked with stream_options."""
    request = CallRequest(messages=QUESTION, max_tokens=16)
    rec, chunks = await stream(oai, request)
    whole = await oai.client().chat.completions.create(model=TEST_MODEL, messages=QUESTION, stream=False,
                                                       **completion_params(request, "json_object"))

    assert whole.choices[0].message.content == rec.text  # greedy, seed 0: the same answer
    assert whole.usage is not None and whole.usage.completion_tokens == rec.output_tokens == len(chunks)
    assert whole.choices[0].finish_reason == rec.finish_reason

    fill_stats(rec, usage=whole.usage, finish_reason="stop", chunks=len(chunks))
    assert rec.token_count_source == "openai usage (server)"
    assert rec.prompt_tokens == whole.usage.prompt_tokens > 0
    assert rec.output_tokens == whole.usage.completion_tokens


async def test_default_model_is_the_first_served_one(server):
    b = OpenAIBackend(base_url=server.base_url, api_key=KEY)
    assert b.resolve_model(None) == ""  # not listed yet
    rec = await b.call(CallRequest(messages=QUESTION, max_tokens=4, top_k=1, top_p=0.9, stop=["\n"])).collect()
    assert rec.status == "ok" and rec.model == TEST_MODEL
    assert b.resolve_model(None) == TEST_MODEL
    assert await b.served_models() == [TEST_MODEL]
    await b.aclose()
    fresh = OpenAIBackend(base_url=server.base_url, api_key=KEY)  # a pipeline's run is labelled with it too
    run = await Pipeline.from_preset("direct", backend=fresh, max_tokens=4).run("Say hello.")
    assert run.status == "ok" and run.labels["model"] == TEST_MODEL
    await fresh.aclose()


async def test_leaving_early_closes_the_stream_and_the_server_stops(oai, server):
    disconnects = server.output().count("Disconnected from client")
    call = oai.call(CallRequest(messages=LONG_ANSWER, max_tokens=32))

    async for chunk in call:
        assert chunk.text
        break
    for _ in range(10):  # the loop finalises the abandoned generators as tasks: let them run
        await asyncio.sleep(0)

    assert call.record.status == "cancelled" and call.record.finish_reason == "cancelled"
    assert call.record.text == chunk.text and len(call.record.chunk_ns) == 1
    for _ in range(200):  # the server notices the closed connection at its next token
        if server.output().count("Disconnected from client") > disconnects:
            break
        await asyncio.sleep(0.05)
    assert server.output().count("Disconnected from client") == disconnects + 1
    rec = await oai.call(CallRequest(messages=QUESTION, max_tokens=4)).collect()  # and it serves the next call
    assert rec.status == "ok" and rec.text


async def test_cancelling_the_task_marks_the_record_cancelled(oai):
    call = oai.call(CallRequest(messages=LONG_ANSWER, max_tokens=32))
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in call:
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert call.record.status == "cancelled"
    assert call.record.text and call.record.output_tokens == len(call.record.chunk_ns) < 32


# ------------------------------------------------------------------------------------- structured output

async def test_json_object_style_follows_the_schema(oai):
    rec = await oai.call(CallRequest(messages=[{"role": "user", "content": "Name a color of the sky as JSON."}],
                                     max_tokens=32, json_schema=COLOR_SCHEMA)).collect()

    assert rec.status == "ok" and rec.finish_reason == "stop"
    value = json.loads(rec.text)
    fastjsonschema.compile(COLOR_SCHEMA)(value)  # raises if it does not match
    assert value["color"] in ("red", "green", "blue")


async def test_json_schema_style_is_refused_with_the_option_to_switch(server):
    b = OpenAIBackend(TEST_MODEL, base_url=server.base_url, api_key=KEY)  # default style: json_schema
    call = b.call(CallRequest(messages=QUESTION, max_tokens=8, json_schema=COLOR_SCHEMA))

    with pytest.raises(InvalidInput) as info:
        await call.collect()

    message = str(info.value)
    assert "does not support" in message and "'json_schema'" in message
    assert "response_format_style='json_object'" in message and "--response-format json_object" in message
    assert "HTTP 500" in message  # this server wraps its request validation error as an internal error
    assert "Input should be 'text' or 'json_object'" in message  # the server's own words...
    assert "app.py" not in message  # ...without the traceback it appends
    assert call.record.status == "error" and call.record.text == ""
    await b.aclose()


def test_request_parameters_map_to_the_openai_api():
    request = CallRequest(messages=QUESTION, max_tokens=7, temperature=0.5, seed=None, top_k=20, top_p=0.9,
                          stop=["\n\n"], json_schema=COLOR_SCHEMA)
    assert completion_params(request, "json_schema") == {
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"], "extra_body": {"top_k": 20},
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "output", "schema": COLOR_SCHEMA, "strict": True}}}
    assert completion_params(request, "json_object")["response_format"] == {"type": "json_object",
                                                                             "schema": COLOR_SCHEMA}
    assert completion_params(CallRequest(messages=QUESTION), "json_schema") == {
        "max_tokens": 256, "temperature": 0.0, "seed": 0}  # unset ones left to the server


async def test_staged_pipeline_decides_and_answers(server):
    be = OpenAIBackend(base_url=server.base_url, api_key=KEY, response_format_style="json_object")
    pipe = Pipeline.from_preset("staged", backend=be, model=TEST_MODEL, max_tokens=16)

    rec = await pipe.run("What is rain?")

    assert rec.status == "ok", rec.error
    strategy = rec.decisions["strategy"]
    assert [s.name for s in rec.stages if not s.name.endswith(".retry")] == ["strategy", *strategy.plan["runs"]]
    assert all(s.call.backend == "openai" and s.call.model == TEST_MODEL for s in rec.stages)
    # no next-token choice over this API: the strategy is asked for as grammar-constrained JSON
    assert strategy.status == "decided" and strategy.method == "structured output", strategy
    assert strategy.value["strategy"] in ("simple", "analytical", "comprehensive")
    assert rec.stages[-1].call.text.strip() and rec.stages[-1].call.output_tokens <= 16
    await be.aclose()


# ---------------------------------------------------------------------------------------------- errors

async def test_unknown_model_names_the_served_ones(oai, server):
    call = oai.call(CallRequest(messages=QUESTION, model="nosuch-7b"))

    with pytest.raises(UnknownModel) as info:
        await call.collect()

    assert str(info.value) == f"model 'nosuch-7b' is not served at {server.base_url}; served: {TEST_MODEL}"
    assert call.record.start_ns == 0  # refused before any chat request (the server would have answered)
    assert call.record.status == "error" and call.record.error.startswith("UnknownModel: ")


async def test_nothing_listening_names_the_url_and_how_to_start_a_server():
    url = f"http://127.0.0.1:{free_port()}/v1"
    b = OpenAIBackend(TEST_MODEL, base_url=url)
    call = b.call(CallRequest(messages=QUESTION))

    with pytest.raises(BackendUnavailable) as info:
        await call.collect()

    message = str(info.value)
    assert url in message and "OPENAI_BASE_URL" in message
    assert "vllm serve" in message and "python -m llmfirst_kit.llama_cpp_server --model" in message
    assert call.record.status == "error"
    await b.aclose()


async def test_wrong_api_key_names_openai_api_key(server):
    b = OpenAIBackend(TEST_MODEL, base_url=server.base_url, api_key="wrong")
    with pytest.raises(BackendUnavailable) as info:
        await b.call(CallRequest(messages=QUESTION)).collect()
    assert "HTTP 401: Invalid API key" in str(info.value) and "OPENAI_API_KEY" in str(info.value)
    await b.aclose()


async def test_base_url_without_v1_is_named(server):
    b = OpenAIBackend(TEST_MODEL, base_url=server.base_url.removesuffix("/v1"), api_key=KEY)
    with pytest.raises(BackendUnavailable, match="usually ends in /v1"):
        await b.call(CallRequest(messages=QUESTION)).collect()
    await b.aclose()


async def test_timeout_names_the_option(server):
    b = OpenAIBackend(TEST_MODEL, base_url=server.base_url, api_key=KEY, timeout=0.001)
    with pytest.raises(BackendError, match=r"within 0\.001 s; raise OpenAIBackend\(timeout=\.\.\.\)"):
        await b.call(CallRequest(messages=QUESTION, max_tokens=4)).collect()
    await b.aclose()


async def test_stream_without_finish_reason_is_an_error(oai):
    """A prompt longer than the server's context: this server answers 200 and closes the empty stream."""
    call = oai.call(CallRequest(messages=[{"role": "user", "content": "word " * (N_CTX + 500)}], max_tokens=8))

    with pytest.raises(BackendError, match="without a finish_reason") as info:
        await call.collect()

    assert not isinstance(info.value, (UnknownModel, BackendUnavailable))
    assert call.record.status == "error" and call.record.text == ""


async def test_cold_cache_and_num_ctx_are_refused_before_any_call(oai):
    with pytest.raises(InvalidInput, match="cache='reuse'"):
        await oai.call(CallRequest(messages=QUESTION, cache="cold")).collect()
    with pytest.raises(InvalidInput, match="--n_ctx"):
        await oai.call(CallRequest(messages=QUESTION, num_ctx=8192)).collect()
    with pytest.raises(InvalidInput, match="json_schema, json_object"):
        OpenAIBackend(response_format_style="grammar")  # type: ignore[arg-type]


async def test_server_killed_mid_answer_keeps_the_text(tmp_path, monkeypatch):
    """A second server (no API key: the placeholder key is sent), SIGKILLed after the first chunk."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    srv = Server(tmp_path / "killed.log")
    b = OpenAIBackend(TEST_MODEL, base_url=srv.base_url)
    assert b.api_key == NO_KEY
    # a long answer is asked for, but the server dies a few tokens in
    call = b.call(CallRequest(messages=LONG_ANSWER, max_tokens=256))
    received: list[str] = []
    try:
        with pytest.raises(BackendError) as info:
            async for chunk in call:
                received.append(chunk.text)
                if len(received) == 1:
                    os.kill(srv.proc.pid, signal.SIGKILL)
    finally:
        srv.stop()
        await b.aclose()

    assert not isinstance(info.value, (UnknownModel, BackendUnavailable))
    assert "broke mid-answer" in str(info.value) or "without a finish_reason" in str(info.value)
    assert received and call.record.text == "".join(received)
    assert call.record.status == "error" and call.record.finish_reason == "error"
    assert len(call.record.chunk_ns) == len(received)


# ------------------------------------------------------------------------------ configuration and CLI

def test_base_url_and_key_from_argument_env_or_default(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert OpenAIBackend().base_url == DEFAULT_BASE_URL == "http://127.0.0.1:8000/v1"
    assert OpenAIBackend().api_key == NO_KEY
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.1.2.3:30000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert OpenAIBackend().base_url == "http://10.1.2.3:30000/v1"
    assert OpenAIBackend().api_key == "sk-env"
    assert OpenAIBackend(base_url="http://127.0.0.1:9/v1", api_key="k").base_url == "http://127.0.0.1:9/v1"
    assert "openai" in BACKENDS and isinstance(get_backend("openai", model="m"), OpenAIBackend)
    assert get_backend("openai", model="m").resolve_model(None) == "m"


def test_cli_ask_with_base_url(server, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the key from the environment
    code = main(["ask", "Say hello.", "--backend", "openai", "--base-url", server.base_url, "--model", TEST_MODEL,
                 "--max-tokens", "8", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK, data
    assert data["backend"] == "openai" and data["model"] == TEST_MODEL and data["status"] == "ok"
    assert 0 < data["output_tokens"] <= 8 and data["text"].strip()
    assert data["token_count_source"].startswith("content chunks")


async def test_load_sweep_against_the_openai_server(server):
    """``llmfirst bench load --backend openai``: every request answered, the server's model found by itself."""
    from llmfirst_kit.bench.load_sweep import sweep

    target = OpenAIBackend(base_url=server.base_url, api_key=KEY)  # no model: the server's first one
    result = await sweep(target, concurrency=[1, 2], requests=2, max_tokens=4, queries=["Say hello."])
    await target.aclose()
    assert result["model"] == TEST_MODEL and result["target"] == server.base_url and result["warmup"]["status"] == "ok"
    assert [(lv["concurrency"], lv["ok"], lv["errors"]) for lv in result["levels"]] == [(1, 2, 0), (2, 2, 0)]
    assert all(1 <= lv["output_tokens"] <= 2 * 4 for lv in result["levels"])


def test_a_study_cell_runs_against_the_openai_server(server, monkeypatch, tmp_path):
    """A study grid with ``backend: openai``: papermill executes the study notebook, whose pipeline streams
    from the server; the judge's structured output goes through json_object; the environment lists the
    server's models."""
    from llmfirst_kit import study
    from llmfirst_kit.data import QUERIES
    from llmfirst_kit.records import RunRecord
    from llmfirst_kit.sinks.jsonl import read_log

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # inherited by the notebook's kernel
    grid = {"name": "openai", "backend": "openai", "openai_base_url": server.base_url,
            "openai_response_format": "json_object", "models": [TEST_MODEL], "quantizations": ["default"],
            "presets": ["direct"], "queries_file": str(QUERIES),
            "query_ids": ["en-s01"], "warmup_runs": 0, "max_tokens": 8, "judge_model": TEST_MODEL,
            "perplexity_text": "", "baseline_model": ""}
    result = study.run_study(grid, output_dir=tmp_path / "openai", progress=False, report=False, echo=lambda _: None)
    assert [(c.id, c.state) for c in result.cells] == [("smollm2-135m@default--direct", "done")], result.describe()
    [run] = [r for r in read_log(tmp_path / "openai" / "cells" / "smollm2-135m@default--direct" / study.RECORDS)
             if isinstance(r, RunRecord)]
    answer = run.stages[0].call
    assert run.status == "ok" and answer.backend == "openai" and answer.model == TEST_MODEL
    assert answer.model_info["base_url"] == server.base_url and answer.token_count_source.startswith("content chunks")
    assert run.quality is not None and 0 <= run.quality["score"] <= 100  # judged through the server
    env = json.loads((tmp_path / "openai" / study.ENVIRONMENT).read_text())
    assert env["model_files"] == [{"base_url": server.base_url, "served": [TEST_MODEL]}]


# ----------------------------------------------------- the kit's own server: an OpenAI API that sends usage

@pytest.fixture(scope="module")
def kit_server(loaded):
    """The kit's server (``llmfirst serve``) on a free loopback port; its /v1 routes decode with the test
    model instance, so ``loaded.tokens_decoded`` counts its work."""
    from llmfirst_kit.serve import ServerConfig, ServerThread

    with ServerThread(config=ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads)) as srv:
        yield srv


async def test_usage_from_a_server_that_sends_it(kit_server, loaded):
    """End to end with stream_options.include_usage honoured: the counts are the server's, and exact."""
    b = OpenAIBackend(TEST_MODEL, base_url=kit_server.url + "/v1")
    before = await wait_until_idle(loaded)
    rec, chunks = await stream(b, CallRequest(messages=LONG_ANSWER, max_tokens=12))
    assert rec.status == "ok" and rec.finish_reason == "length"
    assert rec.token_count_source == "openai usage (server)" and rec.output_tokens == 12 and rec.prompt_tokens > 0
    assert await wait_until_idle(loaded) - before == 12  # the model decoded exactly what usage says
    assert "".join(c.text for c in chunks) == rec.text and rec.model_info["model_id"] == TEST_MODEL
    m = call_metrics(rec)
    assert m.tpot_s == pytest.approx((m.e2e_s - m.ttft_s) / 11)
    await b.aclose()


async def test_json_schema_and_a_staged_pipeline_through_the_kit_server(kit_server):
    b = OpenAIBackend(TEST_MODEL, base_url=kit_server.url + "/v1")  # the OpenAI json_schema form
    rec, _ = await stream(b, CallRequest(messages=[{"role": "user", "content": "Pick a color."}], max_tokens=24,
                                         json_schema=COLOR_SCHEMA))
    fastjsonschema.compile(COLOR_SCHEMA)(json.loads(rec.text))
    run = await Pipeline.from_preset("staged", backend=b, model=TEST_MODEL, max_tokens=16).run("Why is the sky blue?")
    assert run.status == "ok" and run.decisions["strategy"].status == "decided"
    await b.aclose()


async def test_pairwise_judge_takes_its_verdict_as_structured_output_where_no_choice_can_be_read(kit_server):
    """An OpenAI-compatible server gives no next-token probabilities: the judge's whole reply (its reasons,
    then the verdict as an enum) comes back as structured output, read from that JSON."""
    from llmfirst_kit.quality.judge import VERDICTS, PairwiseJudge

    b = OpenAIBackend(TEST_MODEL, base_url=kit_server.url + "/v1")
    assert not b.capabilities.next_token_choice
    js = await PairwiseJudge(b, TEST_MODEL, max_tokens=48).compare("What is 2 + 2?", "4", "")
    assert [j.method for j in js] == ["structured output"] * 2 and all(j.probabilities is None for j in js)
    assert all(j.status == "decided" and j.verdict in VERDICTS and j.reasons for j in js), js
    assert all(1 <= len(j.call_ids) <= 2 for j in js)  # one reply; sent back once if it was invalid
    await b.aclose()


async def test_kit_server_openai_errors_are_shaped_as_openai_does(kit_server):
    async with httpx.AsyncClient(base_url=kit_server.url) as http:
        listed = (await http.get("/v1/models")).json()
        assert listed["object"] == "list" and TEST_MODEL in [m["id"] for m in listed["data"]]
        for body, status, fix in (
                ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "known: "),
                ({"model": TEST_MODEL, "messages": []}, 400, "messages"),
                ({"model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "send n=1"),
                ({"model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1.0},
                 400, "not supported"),
                ({"model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}],
                  "response_format": {"type": "json_schema"}}, 400, "needs a 'json_schema'")):
            answer = await http.post("/v1/chat/completions", json=body)
            error = answer.json()["error"]
            assert answer.status_code == status and fix in error["message"] and error["type"].endswith("error")


async def test_leaving_a_kit_server_stream_early_stops_decoding(kit_server, loaded):
    b = OpenAIBackend(TEST_MODEL, base_url=kit_server.url + "/v1")
    call = b.call(CallRequest(messages=LONG_ANSWER, max_tokens=400))
    before = loaded.tokens_decoded
    async for _ in call:
        if len(call.record.chunk_ns) >= 3:
            break
    after = await wait_until_idle(loaded)  # meanwhile the loop finalises the abandoned stream
    assert call.record.status == "cancelled"
    assert after - before < 100  # far from the 400 asked for: the server stopped when the client left
    await b.aclose()


# ---------------------------------------------------------------------------------- server-side timings

async def test_llama_cpp_python_server_sends_no_timings(oai):
    """llama-cpp-python's server sends neither a ``timings`` object nor cached-token usage: nothing is made up."""
    rec, _ = await stream(oai, CallRequest(messages=QUESTION, max_tokens=4))
    assert rec.status == "ok" and rec.server_timings is None


# llama-server (llama.cpp's own server) is not installable here, so this is a FAKE: a small real HTTP server
# on loopback that replays a streamed chat completion in llama-server's shape -- a ``timings`` object on the
# chunk with the finish_reason and again on the usage chunk (field names from llama.cpp's tools/server source;
# the stream was written in that shape, not captured from a running llama-server) -- and a vLLM-shaped one
# whose usage carries ``prompt_tokens_details.cached_tokens`` (``vllm serve --enable-prompt-tokens-details``).
LLAMA_TIMINGS = {"cache_n": 12, "prompt_n": 3, "prompt_ms": 20.5, "prompt_per_token_ms": 6.833,
                 "prompt_per_second": 146.3, "predicted_n": 2, "predicted_ms": 30.0, "predicted_per_token_ms": 15.0,
                 "predicted_per_second": 66.7}


def _sse(events: list[dict | str]) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def _chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1733000000, "model": TEST_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def _usage_chunk(usage: dict, **extra) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1733000000, "model": TEST_MODEL,
            "choices": [], "usage": usage, **extra}


LLAMA_SERVER_STREAM = _sse([
    _chunk({"role": "assistant", "content": None}), _chunk({"content": "Hello"}), _chunk({"content": "!"}),
    _chunk({}, "stop", timings=LLAMA_TIMINGS),
    _usage_chunk({"completion_tokens": 2, "prompt_tokens": 15, "total_tokens": 17}, timings=LLAMA_TIMINGS),
    "[DONE]"])
VLLM_STREAM = _sse([
    _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hi"}), _chunk({}, "stop"),
    _usage_chunk({"completion_tokens": 1, "prompt_tokens": 15, "total_tokens": 16,
                  "prompt_tokens_details": {"cached_tokens": 8}}),
    "[DONE]"])


@pytest.fixture
def replay_server():
    """A loopback HTTP server answering /v1/models and replaying ``replay_server.body`` to every chat
    completion (see the note above: a fake, because llama-server itself is not installable here)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"body": b""}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(json.dumps({"object": "list", "data": [{"id": TEST_MODEL, "object": "model", "created": 0,
                                                               "owned_by": "llamacpp"}]}).encode(), "application/json")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(state["body"], "text/event-stream")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


async def test_llama_server_timings_and_vllm_cached_tokens_are_recorded_with_their_source(replay_server):
    state, base_url = replay_server
    backend = OpenAIBackend(TEST_MODEL, base_url=base_url)
    state["body"] = LLAMA_SERVER_STREAM
    rec, chunks = await stream(backend, CallRequest(messages=QUESTION, max_tokens=4))
    assert rec.status == "ok" and rec.text == "Hello!" and len(chunks) == 2 and rec.output_tokens == 2
    t = rec.server_timings
    assert t["source"] == "llama-server timings (server)" and t["raw"]["timings"] == LLAMA_TIMINGS
    assert (t["prompt_tokens_evaluated"], t["cached_prompt_tokens"], t["decode_tokens"]) == (3, 12, 2)
    assert t["prompt_eval_s"] == pytest.approx(0.0205) and t["decode_s"] == pytest.approx(0.030)
    assert rec.chunk_ns and rec.start_ns < rec.chunk_ns[0]  # the client's own clock, beside the server's

    state["body"] = VLLM_STREAM
    rec, _ = await stream(backend, CallRequest(messages=QUESTION, max_tokens=4))
    assert rec.server_timings == {"source": "openai usage.prompt_tokens_details (server)", "cached_prompt_tokens": 8,
                                  "raw": {"prompt_tokens_details": {"cached_tokens": 8}}}
    assert json.loads(json.dumps(rec.to_dict()))["server_timings"]["cached_prompt_tokens"] == 8
    await backend.aclose()
