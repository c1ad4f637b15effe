"""``llmfirst bench overhead``: the kit's embedded backend against a plain ``Llama.generate`` loop on the same
``Llama``, each side timed where its consumer receives each token.

What makes the comparison fair (each point was a tilt in an earlier version):

- **raw side** = the loop a careful user writes on llama-cpp-python: ``Llama.generate`` with the kit's
  sampling settings, each new token detokenized on its own through an incremental UTF-8 decoder (linear
  time; ``create_chat_completion(stream=True)`` re-detokenizes the whole completion for every token), stamped
  when its text is known -- in that loop the consumer *is* the decoding thread;
- **kit side** = ``EmbeddedBackend.call`` consumed by an ``async for`` in the event loop, stamped when the
  consumer receives each chunk, i.e. after the decode thread's ``call_soon_threadsafe`` hand-off and the
  queue wake-up (the overhead under test) -- not the stamp the decode thread put on the chunk (that one is
  reported beside it, ``kit_thread_*``, to show where the cost goes);
- same work inside the timed region on both sides: KV cache reset (cold), chat template + tokenization of
  the same messages (the token lists are checked equal), greedy sampling (temperature 0, seed 0), same
  ``n_threads`` (the same ``Llama`` object), same max tokens;
- each side counts the tokens it received (the end-of-generation token excluded), nobody assumes
  ``max_tokens``; throughput = counted tokens / (last token - first token), the kit's decode formula;
- pairs interleaved, the order alternating (raw kit, kit raw, ...), after one warm-up of each side; per pair
  the ratio kit/raw, and over pairs the geometric mean with a Student-t 95 % interval (``_ab``).

Timing goals live here, not in the test suite: a ratio measured in one run on one machine is meaningful;
an absolute time asserted in a test is not.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from typing import Any

from ..backends import CallRequest
from ..backends.embedded import EmbeddedBackend, LoadedModel
from ..errors import InvalidInput
from ..metrics import NS, decode_tps, tpot_s, ttft_s
from ..records import CallRecord
from ._ab import mean_interval, median, ratio_interval, run_interleaved, verdict

# A prompt that keeps a model writing until max_tokens, so both sides decode the same number of tokens.
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm. Do not stop early."
SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}  # the embedded backend's
GOALS = {"throughput_ratio": 0.98, "ttft_added_ms": 5.0}


def _timing(t0: int, stamps: list[int], tokens: int) -> dict[str, float | None]:
    """TTFT (s), decode tokens/s and TPOT (s) from a request start and the arrival stamps of the content
    chunks, by the formulas of :mod:`llmfirst_kit.metrics`."""
    rec = CallRecord(call_id="bench", backend="bench", model="", start_ns=t0, chunk_ns=stamps, output_tokens=tokens)
    return {"ttft_s": ttft_s(rec), "tokens_per_s": decode_tps(rec), "tpot_s": tpot_s(rec)}


def raw_once(loaded: LoadedModel, messages: list[dict[str, str]], max_tokens: int, *, seed: int = 0,
             expect_tokens: list[int] | None = None) -> dict[str, Any]:
    """The baseline: a plain ``Llama.generate`` loop, cold cache, incremental detokenization, each token
    stamped as the loop (its own consumer) gets its text. Has the model to itself (no kit call decodes meanwhile)."""
    import llama_cpp

    with loaded.engine.exclusive() as llm:  # no kit call decodes meanwhile; the cache is emptied before and after
        vocab = llm._model.vocab
        t0 = time.perf_counter_ns()
        llm.reset()  # cold: evaluate the whole prompt
        tokens = loaded.format_prompt(messages)  # chat template + tokenize, as the kit does in its call
        llm.set_seed(seed)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stamps: list[int] = []
        parts: list[str] = []
        count, finish = 0, "length"
        gen = llm.generate(tokens, temp=0.0, **SAMPLING)
        try:
            for token in gen:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                count += 1
                piece = utf8.decode(llm.detokenize([token]))  # a multi-byte character waits for its last byte
                if piece:
                    stamps.append(time.perf_counter_ns())
                    parts.append(piece)
                if count >= max_tokens:
                    break
        finally:
            gen.close()
        tail = utf8.decode(b"", final=True)
        if tail:
            stamps.append(time.perf_counter_ns())
            parts.append(tail)
    if expect_tokens is not None and tokens != expect_tokens:
        raise AssertionError("the raw side's prompt tokens differ from the kit's")
    return {**_timing(t0, stamps, count), "text": "".join(parts), "output_tokens": count,
            "prompt_tokens": len(tokens), "finish_reason": finish}


async def kit_once(backend: EmbeddedBackend, model: str, messages: list[dict[str, str]], max_tokens: int, *,
                   seed: int = 0) -> dict[str, Any]:
    """The kit: an embedded call consumed with ``async for``, each chunk stamped on receipt by the consumer
    (after the decode thread's hand-off to the event loop). Tokens are counted from the chunks received."""
    call = backend.call(CallRequest(messages=messages, model=model, max_tokens=max_tokens, temperature=0.0,
                                    seed=seed, cache="cold"))
    stamps: list[int] = []
    thread_stamps: list[int] = []
    parts: list[str] = []
    count = 0
    t0 = time.perf_counter_ns()  # before prompt building, like the raw side
    async for chunk in call:
        stamps.append(time.perf_counter_ns())
        thread_stamps.append(chunk.t_ns)
        parts.append(chunk.text)
        count += chunk.tokens if chunk.tokens is not None else 1
    rec = call.record
    thread = _timing(t0, thread_stamps, count)
    handoff = [(a - b) / NS * 1e3 for a, b in zip(stamps, thread_stamps)]
    return {**_timing(t0, stamps, count), "text": "".join(parts), "output_tokens": count,
            "backend_output_tokens": rec.output_tokens, "prompt_tokens": rec.prompt_tokens,
            "finish_reason": rec.finish_reason,
            "thread_ttft_s": thread["ttft_s"], "thread_tokens_per_s": thread["tokens_per_s"],
            "handoff_ms_median": median(handoff), "handoff_ms_max": max(handoff) if handoff else None}


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


async def overhead(model: str = "qwen2.5-coder-0.5b", pairs: int = 10, max_tokens: int = 128, *,
                   n_threads: int | None = None, prompt: str = LONG_PROMPT, runs: int | None = None) -> dict[str, Any]:
    """The kit's embedded backend against a plain ``Llama.generate`` loop on the same ``Llama`` (see the
    module docstring for what is held equal). ``pairs`` interleaved pairs, the order alternating; ``runs`` is
    the old name of ``pairs``. Returns per-pair figures, the throughput ratio kit/raw with its 95 % interval,
    the TTFT the kit adds with its interval, the TPOT ratio, and a verdict per goal (met / not met /
    undecided, by the whole interval)."""
    pairs = runs if runs is not None else pairs
    if pairs < 2:
        raise InvalidInput(f"an interval needs at least 2 pairs, got {pairs}; pass pairs=2 or more (--pairs)")
    backend = EmbeddedBackend(model, n_threads=n_threads)
    loaded = backend.load()
    messages = [{"role": "user", "content": prompt}]
    tokens = loaded.format_prompt(messages)
    await kit_once(backend, model, messages, 8)  # warm-up of both paths (first touch of the weights), excluded
    await asyncio.to_thread(raw_once, loaded, messages, 8, expect_tokens=tokens)

    async def measure(side: str, _: int) -> dict[str, Any]:
        if side == "raw":
            return await asyncio.to_thread(raw_once, loaded, messages, max_tokens, expect_tokens=tokens)
        return await kit_once(backend, model, messages, max_tokens)

    sides = await run_interleaved(("raw", "kit"), range(pairs), measure, alternate=True)
    both = list(zip(sides["raw"], sides["kit"]))
    ratio, ratio_low, ratio_high = ratio_interval(
        [k["tokens_per_s"] / r["tokens_per_s"] if k["tokens_per_s"] and r["tokens_per_s"] else None for r, k in both])
    tpot, tpot_low, tpot_high = ratio_interval(
        [k["tpot_s"] / r["tpot_s"] if k["tpot_s"] and r["tpot_s"] else None for r, k in both])
    added, added_low, added_high = mean_interval(
        [(k["ttft_s"] - r["ttft_s"]) * 1000 if k["ttft_s"] is not None and r["ttft_s"] is not None else None
         for r, k in both])
    thread_ratio = ratio_interval([k["thread_tokens_per_s"] / r["tokens_per_s"]
                                   if k["thread_tokens_per_s"] and r["tokens_per_s"] else None for r, k in both])[0]
    return {
        "benchmark": "overhead", "model": loaded.resolved.name, "pairs": pairs, "runs": pairs, "max_tokens": max_tokens,
        "n_threads": loaded.n_threads, "prompt_tokens": len(tokens),
        "throughput_ratio": _r(ratio), "throughput_ratio_ci95": [_r(ratio_low), _r(ratio_high)],
        "ttft_added_ms": _r(added, 2), "ttft_added_ms_ci95": [_r(added_low, 2), _r(added_high, 2)],
        "tpot_ratio": _r(tpot), "tpot_ratio_ci95": [_r(tpot_low), _r(tpot_high)],
        "raw_tokens_per_s_median": _r(median([r["tokens_per_s"] for r, _ in both]), 2),
        "kit_tokens_per_s_median": _r(median([k["tokens_per_s"] for _, k in both]), 2),
        "raw_ttft_ms_median": _r(median([_ms(r["ttft_s"]) for r, _ in both]), 2),
        "kit_ttft_ms_median": _r(median([_ms(k["ttft_s"]) for _, k in both]), 2),
        "kit_thread_throughput_ratio": _r(thread_ratio),
        "kit_handoff_ms_median": _r(median([k["handoff_ms_median"] for _, k in both]), 3),
        "kit_handoff_ms_max": _r(max((k["handoff_ms_max"] or 0.0) for _, k in both), 3),
        "raw_output_tokens": [r["output_tokens"] for r, _ in both],
        "kit_output_tokens": [k["output_tokens"] for _, k in both],
        "same_tokens": all(r["output_tokens"] == k["output_tokens"] == k["backend_output_tokens"] for r, k in both),
        "same_text": all(r["text"] == k["text"] for r, k in both),
        "per_pair": [{"raw_tokens_per_s": _r(r["tokens_per_s"], 2), "kit_tokens_per_s": _r(k["tokens_per_s"], 2),
                      "raw_ttft_ms": _r(_ms(r["ttft_s"]), 2), "kit_ttft_ms": _r(_ms(k["ttft_s"]), 2)}
                     for r, k in both],
        "goals": {"throughput_ratio": f">= {GOALS['throughput_ratio']}",
                  "ttft_added_ms": f"<= {GOALS['ttft_added_ms']}"},
        "verdict": {"throughput_ratio": verdict(ratio_low, ratio_high, GOALS["throughput_ratio"]),
                    "ttft_added_ms": verdict(added_low, added_high, GOALS["ttft_added_ms"], at_least=False)},
    }
