"""The embedded backend against the real SmolLM2-135M model (llama-cpp-python in this process).

The model is loaded once per test run (``backend`` / ``loaded`` fixtures in conftest.py). Counts are
asserted in tokens, never in seconds, except for the event-loop heartbeat, whose bound (100 ms against a
10 ms tick) is a generous "never blocked" check, not a speed goal.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from llmfirst_kit.backends import CallRequest, get_backend
from llmfirst_kit.backends.embedded import DEFAULT_N_CTX, fold_system_message
from llmfirst_kit.errors import BackendError, ContextOverflow, InvalidInput, UnknownModel
from llmfirst_kit.models import REGISTRY

from conftest import TEST_MODEL

LONG = "Write a long story about a dragon."  # SmolLM2 does not stop on its own within 200 tokens
SHORT = "What is 2+2?"  # SmolLM2 answers in 11 tokens and stops


def ask(question: str, **options) -> CallRequest:
    options.setdefault("max_tokens", 16)
    return CallRequest(messages=[{"role": "user", "content": question}], **options)


async def wait_until_idle(loaded, settle_s: float = 0.3, limit_s: float = 10.0) -> int:
    """Wait until the model's decode counter stops moving and no worker holds the model (at most
    ``limit_s``: a worker that never stops must fail the test, not hang it); returns the counter."""
    before = loaded.tokens_decoded
    for _ in range(max(1, int(limit_s / settle_s))):
        await asyncio.sleep(settle_s)
        now = loaded.tokens_decoded
        if now == before and not loaded.busy:
            break
        before = now
    return loaded.tokens_decoded


# ------------------------------------------------------------------------------------ streaming


async def test_call_streams_stamped_chunks(backend):
    call = backend.call(ask(SHORT, max_tokens=64))
    chunks = [c async for c in call]
    rec = call.record
    assert rec.status == "ok" and rec.error is None
    assert rec.finish_reason == "stop"
    assert rec.backend == "embedded" and rec.model == "smollm2-135m"
    # what the consumer got is what the record holds
    assert "".join(c.text for c in chunks) == rec.text and rec.text.strip()
    assert [c.t_ns for c in chunks] == rec.chunk_ns
    assert [c.tokens for c in chunks] == rec.chunk_tokens
    # every chunk stamped at arrival, after the request start, in order
    assert rec.start_ns < rec.chunk_ns[0]
    assert all(a < b for a, b in zip(rec.chunk_ns, rec.chunk_ns[1:]))
    assert rec.chunk_ns[-1] <= rec.end_ns
    # exact counts from the tokenizer
    assert rec.output_tokens == sum(rec.chunk_tokens) > 0
    assert rec.output_tokens < 64
    assert rec.prompt_tokens > 0
    assert rec.token_count_source == "llama.cpp tokenizer (exact)"
    assert rec.params["max_tokens"] == 64 and rec.params["temperature"] == 0.0
    assert rec.model_info["name"] == "smollm2-135m" and rec.model_info["quantization"] == "Q4_1"


async def test_max_tokens_gives_length(backend):
    rec = await backend.call(ask(LONG, max_tokens=8)).collect()
    assert rec.status == "ok"
    assert rec.finish_reason == "length"
    assert rec.output_tokens == 8 == sum(rec.chunk_tokens)


async def test_stop_string_ends_the_answer(backend):
    free = await backend.call(ask(SHORT, max_tokens=64)).collect()
    assert " " in free.text
    head = free.text[: free.text.index(" ")]
    rec = await backend.call(ask(SHORT, max_tokens=64, stop=[" "])).collect()
    assert rec.finish_reason == "stop"
    assert rec.text == head  # everything before the stop string, nothing after, the stop itself dropped


async def test_greedy_is_deterministic(backend):
    a = await backend.call(ask(LONG, max_tokens=32, cache="cold")).collect()
    b = await backend.call(ask(LONG, max_tokens=32, cache="cold")).collect()
    assert a.text == b.text and a.text
    assert a.chunk_tokens == b.chunk_tokens
    assert a.output_tokens == b.output_tokens == 32


def decode_spy(monkeypatch) -> list[int]:
    """A spy (not a fake) on ``llama_decode``: how many tokens each step really evaluated."""
    import llama_cpp

    steps: list[int] = []
    real = llama_cpp.llama_decode

    def spy(ctx, batch):
        steps.append(batch.n_tokens)
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", spy)
    return steps


async def test_cache_reuse_evaluates_less_of_the_prompt(backend, loaded, monkeypatch):
    # a call alone: its first step evaluates the prompt (one chunk, it is short), each later step one token
    await wait_until_idle(loaded, 0.05)
    steps = decode_spy(monkeypatch)
    cold = await backend.call(ask(SHORT, max_tokens=4, cache="cold")).collect()
    assert cold.server["prompt_eval_tokens"] == cold.prompt_tokens == steps[0] and steps[1:] == [1, 1, 1]

    steps.clear()
    warm = await backend.call(ask(SHORT, max_tokens=4, cache="reuse")).collect()
    assert warm.prompt_tokens == cold.prompt_tokens
    assert warm.server["prompt_eval_tokens"] < cold.server["prompt_eval_tokens"]
    assert warm.server["prompt_eval_tokens"] == steps[0]  # reported = evaluated
    assert warm.text == cold.text

    # a prompt sharing only the chat template's opening is evaluated from the first difference on
    steps.clear()
    other = await backend.call(ask("What is 3+3?", max_tokens=4, cache="reuse")).collect()
    assert 0 < other.server["prompt_eval_tokens"] < other.prompt_tokens
    assert other.server["prompt_eval_tokens"] == steps[0]


async def test_structured_output(backend):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    rec = await backend.call(ask("What color is the sky? Reply with a JSON object with an 'answer' field.",
                                   max_tokens=64, json_schema=schema, cache="cold")).collect()
    assert rec.status == "ok" and rec.finish_reason == "stop"
    data = json.loads(rec.text)
    assert isinstance(data, dict) and isinstance(data["answer"], str)
    assert rec.params["structured"] is True


# ------------------------------------------------------------------------------------ the event loop


async def test_loop_never_blocks_while_decoding(backend):
    ticks: list[float] = []
    stop = asyncio.Event()

    async def heartbeat():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.010)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    rec = await backend.call(ask(LONG, max_tokens=200)).collect()
    elapsed = time.perf_counter() - t0
    stop.set()
    await beat
    assert rec.status == "ok" and rec.output_tokens == 200
    during = [t for t in ticks if t0 <= t <= t0 + elapsed]
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.100, f"the loop was blocked for {max(gaps) * 1000:.0f} ms"
    # a 10 ms tick: at most one per 10 ms, and (generously) at least one per 30 ms
    assert elapsed / 0.030 <= len(during) <= elapsed / 0.010 + 1


# ------------------------------------------------------------------------------------ cancellation


async def test_cancelling_the_consumer_stops_decoding(backend, loaded):
    base = await wait_until_idle(loaded, 0.05)
    call = backend.call(ask(LONG, max_tokens=200))
    five = asyncio.Event()

    async def consume():
        async for _ in call:
            if sum(call.record.chunk_tokens) >= 5:
                five.set()

    task = asyncio.create_task(consume())
    await five.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    stopped = await wait_until_idle(loaded)
    rec = call.record
    assert rec.status == "cancelled" and rec.finish_reason == "cancelled"
    delivered = sum(rec.chunk_tokens)
    assert rec.output_tokens == delivered >= 5
    decoded = stopped - base
    # stopped within one token step of the last delivered token (not at max_tokens=200)
    assert delivered <= decoded <= delivered + 2, (decoded, delivered)
    assert not loaded.busy and loaded.engine.waiting == 0
    # the model is free for the next call
    assert (await backend.call(ask(SHORT, max_tokens=4)).collect()).status == "ok"


async def test_cancelling_during_prefill_stops_within_one_batch(backend, loaded, monkeypatch):
    import threading

    import llama_cpp

    evaluated: list[int] = []
    started = threading.Event()
    real = llama_cpp.llama_decode

    def spy(ctx, batch):  # a spy on llama.cpp's decode (not a fake): which prompt chunks were really evaluated
        evaluated.append(batch.n_tokens)
        started.set()
        return real(ctx, batch)

    await wait_until_idle(loaded, 0.05)
    monkeypatch.setattr(llama_cpp, "llama_decode", spy)
    call = backend.call(ask("apple " * 2800, max_tokens=4, cache="cold"))
    task = asyncio.create_task(call.collect())
    while not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while loaded.busy:
        await asyncio.sleep(0.01)
    prompt = len(loaded.format_prompt([{"role": "user", "content": "apple " * 2800}]))
    n_batch = loaded.llm.n_batch
    assert prompt > 4 * n_batch  # several chunks to evaluate
    # stopped at the next chunk boundary: the chunk in flight when cancelled, at most one more
    assert sum(evaluated) <= 2 * n_batch < prompt, (evaluated, prompt)
    assert call.record.status == "cancelled" and call.record.chunk_ns == []
    assert (await backend.call(ask(SHORT, max_tokens=4)).collect()).status == "ok"


async def test_another_num_ctx_shares_the_model_files_step_lock(backend):
    # policy: a second copy for another context size never decodes at the same time as the first
    from llmfirst_kit.backends import embedded

    copy = backend.load(TEST_MODEL, n_ctx=1024)
    try:
        assert copy.n_ctx == 1024 and copy.engine.step_lock is backend.load(TEST_MODEL).engine.step_lock
    finally:  # unload the copy: later tests (the Ollama API's /api/ps) expect the one shared model
        embedded._LOADED.pop((str(copy.resolved.path), copy.n_ctx, copy.n_threads, copy.parallel), None)
        copy.engine.close()
        copy.llm.close()


async def test_break_stops_decoding(backend, loaded):
    base = await wait_until_idle(loaded, 0.05)
    call = backend.call(ask(LONG, max_tokens=200))
    async for _ in call:
        if sum(call.record.chunk_tokens) >= 5:
            break
    await asyncio.sleep(0.1)  # the loop finalises the abandoned async generator
    stopped = await wait_until_idle(loaded)
    rec = call.record
    assert rec.status == "cancelled"
    delivered = sum(rec.chunk_tokens)
    assert delivered >= 5
    assert delivered <= stopped - base <= delivered + 2, (stopped - base, delivered)
    assert not loaded.busy


async def test_one_call_at_a_time_queues_without_interleaving(serial_backend):
    calls = [serial_backend.call(ask(q, max_tokens=16)) for q in (LONG, SHORT, "Name three colors.")]
    recs = await asyncio.gather(*(c.collect() for c in calls))
    assert [r.status for r in recs] == ["ok", "ok", "ok"]
    assert all(r.output_tokens and r.chunk_ns for r in recs)
    assert all(r.server["batch"]["max"] == 1 and r.server["batch"]["parallel"] == 1 for r in recs)
    spans = sorted((r.chunk_ns[0], r.chunk_ns[-1], r.server["queue_ns"]) for r in recs)
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        assert end < start, "token streams of one-at-a-time calls interleaved"
    # the later a call ran, the longer it queued for the model
    queued = [q for _, _, q in spans]
    assert queued == sorted(queued)


async def test_cancelled_while_queued(serial_backend, serial_loaded):
    loaded = serial_loaded
    calls = loaded.calls
    first = serial_backend.call(ask(LONG, max_tokens=32))
    t1 = asyncio.create_task(first.collect())
    while not first.record.chunk_ns:  # the first call holds the only sequence
        await asyncio.sleep(0.005)
    second = serial_backend.call(ask(LONG, max_tokens=32))
    t2 = asyncio.create_task(second.collect())
    while loaded.engine.waiting == 0:  # the second call waits for it
        assert not t1.done(), "the first call ended before the second one queued"
        await asyncio.sleep(0.001)
    t2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t2
    assert loaded.engine.waiting == 0  # it left the queue at once
    assert (await t1).status == "ok"
    await wait_until_idle(loaded)
    assert second.record.status == "cancelled" and second.record.chunk_ns == []
    assert loaded.calls == calls + 1  # the cancelled call gave up its place: it never got the model
    assert loaded.engine.waiting == 0 and not loaded.busy


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("request_", [
    ask(""),
    ask("   \n\t "),
    ask(SHORT, max_tokens=0),
    ask(SHORT, max_tokens=-5),
    ask(SHORT, cache="warm"),
    CallRequest(messages=[]),
], ids=["empty", "whitespace", "max_tokens=0", "max_tokens<0", "bad-cache", "no-messages"])
async def test_bad_input_costs_no_model_call(backend, loaded, request_):
    calls, decoded = loaded.calls, loaded.tokens_decoded
    call = backend.call(request_)
    with pytest.raises(InvalidInput):
        await call.collect()
    assert (loaded.calls, loaded.tokens_decoded) == (calls, decoded)
    assert call.record.status == "error" and call.record.chunk_ns == []


async def test_context_overflow(backend, loaded):
    question = "word " * 5000
    n = len(loaded.format_prompt([{"role": "user", "content": question}]))
    assert n > DEFAULT_N_CTX
    calls, decoded = loaded.calls, loaded.tokens_decoded
    with pytest.raises(ContextOverflow) as exc:
        await backend.call(ask(question, max_tokens=16)).collect()
    msg = str(exc.value)
    assert f"the prompt is {n} tokens" in msg
    assert f"is {DEFAULT_N_CTX}" in msg and "nothing was truncated" in msg
    assert (loaded.calls, loaded.tokens_decoded) == (calls, decoded)


async def test_prompt_plus_max_tokens_over_context(backend, loaded):
    # the prompt fits, but not with room for the answer
    question = "word " * 2000
    n = len(loaded.format_prompt([{"role": "user", "content": question}]))
    assert n < DEFAULT_N_CTX < n + 4000
    with pytest.raises(ContextOverflow) as exc:
        await backend.call(ask(question, max_tokens=4000)).collect()
    assert f"{n + 4000} tokens" in str(exc.value)


async def test_unknown_model(backend, loaded):
    calls = loaded.calls
    with pytest.raises(UnknownModel) as exc:
        await backend.call(ask(SHORT, model="no-such-model")).collect()
    msg = str(exc.value)
    assert "'no-such-model' not found" in msg
    assert all(name in msg for name in REGISTRY)
    assert loaded.calls == calls


def test_unknown_backend():
    with pytest.raises(InvalidInput) as exc:
        get_backend("vllm")
    assert "unknown backend 'vllm'" in str(exc.value)
    assert "embedded" in str(exc.value) and "ollama" in str(exc.value)


# ------------------------------------------------------------------------------------ errors


async def test_error_mid_decoding_keeps_the_text(backend, loaded, monkeypatch):
    reference = backend.call(ask(LONG, max_tokens=8))
    ref_chunks = [c async for c in reference]
    assert [c.tokens for c in ref_chunks[:3]] == [1, 1, 1]
    expected = "".join(c.text for c in ref_chunks[:3])

    # FAULT INJECTION: a real llama.cpp cannot be made to fail mid-decode on demand, so detokenize
    # raises on the 4th token.
    real = loaded.llm.detokenize
    seen = []

    def failing_detokenize(tokens, *args, **kwargs):
        seen.append(tokens)
        if len(seen) > 3:
            raise RuntimeError("injected detokenize failure")
        return real(tokens, *args, **kwargs)

    monkeypatch.setattr(loaded.llm, "detokenize", failing_detokenize)
    call = backend.call(ask(LONG, max_tokens=8))
    with pytest.raises(BackendError) as exc:
        await call.collect()
    monkeypatch.undo()
    assert "injected detokenize failure" in str(exc.value)
    rec = call.record
    assert rec.status == "error" and rec.finish_reason == "error"
    assert "injected detokenize failure" in rec.error
    assert rec.text == expected != ""  # nothing already produced is thrown away
    assert rec.chunk_tokens == [1, 1, 1]
    # the worker hands over the error, then releases the model: give it a moment to get there
    await wait_until_idle(loaded, 0.05)
    assert not loaded.busy and loaded.engine.waiting == 0
    after = await backend.call(ask(LONG, max_tokens=8)).collect()
    assert after.status == "ok" and after.text == reference.record.text


# ------------------------------------------------------------------------------------ gemma (base model)


def test_fold_system_message():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye?"},
    ]
    folded = fold_system_message(messages)
    assert folded == [
        {"role": "user", "content": "You are terse.\n\nHello?"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye?"},
    ]
    assert messages[1]["content"] == "Hello?"  # the caller's messages are not changed
    no_system = [{"role": "user", "content": "Hello?"}]
    assert fold_system_message(no_system) == no_system


async def test_gemma_base_model_streams(backend):
    gemma = get_backend("embedded", model="gemma3-270m", n_threads=backend.n_threads)
    loaded = await asyncio.to_thread(gemma.load)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "The capital of France is"}]
    prompt = loaded.llm.detokenize(loaded.format_prompt(messages), special=True).decode()
    assert prompt.endswith("<start_of_turn>user\nYou are terse.\n\nThe capital of France is<end_of_turn>\n"
                           "<start_of_turn>model\n")
    assert "system" not in prompt
    rec = await gemma.call(CallRequest(messages=messages, max_tokens=8)).collect()
    assert rec.status == "ok" and rec.model == "gemma3-270m"
    assert rec.finish_reason in ("stop", "length")
    assert 0 < rec.output_tokens <= 8 and rec.text
    assert rec.model_info["quantization"] == "Q4_K_M"
