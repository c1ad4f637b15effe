"""The benchmarks' fairness, on the real embedded model (SmolLM2-135M, the session's one ``Llama``).

Timing numbers are not asserted (a loaded test machine makes them noise): what is checked is what makes the
comparison fair -- both sides counted their own tokens, decoded the same text from the same prompt tokens,
the kit side was stamped after the hand-off, every preset was warmed, a run's calls share their prefix --
and the interval / verdict arithmetic, on figures that go either way."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from conftest import TEST_MODEL, TEST_THREADS
from llmfirst_kit.bench import _ab
from llmfirst_kit.bench.decisions import decisions
from llmfirst_kit.bench.overhead import kit_once, overhead, raw_once
from llmfirst_kit.bench.pipeline import pipeline
from llmfirst_kit.errors import InvalidInput
from llmfirst_kit.environment import memory_read_bandwidth, usable_cores
from llmfirst_kit.pipeline import Pipeline


# ------------------------------------------------------------------------------------ intervals, verdicts

def test_t_interval_matches_hand_computed():
    # mean 2, sd 1, n 4: half width = t(3) * 1 / 2 = 3.182 / 2
    mean, low, high = _ab.mean_interval([1, 2, 3, 2])
    sd = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2 + 0) / 3)
    assert mean == pytest.approx(2.0)
    assert high - mean == pytest.approx(3.182 * sd / 2)
    assert _ab.mean_interval([5.0]) == (5.0, None, None)
    assert _ab.t975(200) == pytest.approx(1.972, abs=2e-3)  # beyond the table: close to the true quantile


def test_ratio_interval_is_symmetric_in_the_arms():
    ratios = [0.95, 0.97, 1.01, 0.99]
    g, low, high = _ab.ratio_interval(ratios)
    gi, lowi, highi = _ab.ratio_interval([1 / r for r in ratios])
    assert g == pytest.approx(1 / gi) and low == pytest.approx(1 / highi) and high == pytest.approx(1 / lowi)


@pytest.mark.parametrize("ratios, expected", [
    ([0.990, 0.992, 0.991, 0.993, 0.990], "met"),        # the whole interval at or above 0.98
    ([0.940, 0.945, 0.950, 0.942, 0.948], "not met"),    # the whole interval below
    ([0.90, 1.05, 0.95, 1.02, 0.97], "undecided"),       # straddles 0.98: more pairs needed
])
def test_throughput_verdict_goes_either_way(ratios, expected):
    _, low, high = _ab.ratio_interval(ratios)
    assert _ab.verdict(low, high, 0.98) == expected


def test_ttft_verdict_at_most():
    assert _ab.verdict(*_ab.mean_interval([1.0, 2.0, 1.5, 1.2])[1:], 5.0, at_least=False) == "met"
    assert _ab.verdict(*_ab.mean_interval([9.0, 10.0, 11.0, 9.5])[1:], 5.0, at_least=False) == "not met"
    assert _ab.verdict(None, None, 5.0) == "undecided"


def test_across_runs_mean_interval_and_verdict_go_either_way():
    """``--repeats``: each headline figure over whole runs, mean and t interval (hand-computed), nested keys,
    and a verdict by the across-run interval that comes out met, not met or undecided."""
    from llmfirst_kit.bench.repeats import across_runs

    runs = [{"r": 0.990, "s": {"m": 1.0}}, {"r": 0.991, "s": {"m": 3.0}}, {"r": 0.992, "s": {"m": 2.0}}]
    out = across_runs(runs, ["r", "s.m"], {"r": (0.98, True), "s.m": (1.5, False)})
    assert out["s.m"]["values"] == [1.0, 3.0, 2.0] and out["s.m"]["mean"] == pytest.approx(2.0)
    assert out["s.m"]["ci95"][1] - 2.0 == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)  # t(2), sd 1
    assert out["r"]["verdict"] == "met" and out["s.m"]["verdict"] == "undecided"
    worse = across_runs([{"r": 0.94}, {"r": 0.95}, {"r": 0.945}], ["r"], {"r": (0.98, True)})
    assert worse["r"]["verdict"] == "not met"


async def test_repeats_runs_the_whole_benchmark_each_time():
    from llmfirst_kit.bench.repeats import repeat

    calls = []

    async def once():
        calls.append(1)
        return {"x": float(len(calls))}

    assert await repeat(once, 1, ["x"]) == {"x": 1.0}  # one run: its result as it is
    out = await repeat(once, 3, ["x"])
    assert out["repeats"] == 3 and [r["x"] for r in out["runs"]] == [2.0, 3.0, 4.0]
    assert out["across_runs"]["x"]["mean"] == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------- overhead

def test_overhead_both_sides_count_and_decode_the_same(loaded):
    out = asyncio.run(overhead(TEST_MODEL, pairs=2, max_tokens=16, n_threads=TEST_THREADS))
    assert out["n_threads"] == TEST_THREADS and out["pairs"] == 2
    assert out["same_text"] and out["same_tokens"]
    assert all(0 < n <= 16 for n in out["raw_output_tokens"])  # counted, not assumed
    assert out["raw_output_tokens"] == out["kit_output_tokens"]
    assert out["throughput_ratio"] > 0 and None not in out["throughput_ratio_ci95"]
    assert out["throughput_ratio_ci95"][0] <= out["throughput_ratio"] <= out["throughput_ratio_ci95"][1]
    assert out["ttft_added_ms_ci95"][0] <= out["ttft_added_ms"] <= out["ttft_added_ms_ci95"][1]
    assert set(out["verdict"].values()) <= {"met", "not met", "undecided"}
    assert out["kit_handoff_ms_median"] >= 0  # consumer stamps come after the decode thread's


def test_raw_loop_decodes_multibyte_text_like_the_kit(backend, loaded):
    """An emoji is 4 bytes, split over byte tokens (SmolLM2 writes one in 3 tokens): the incremental decoder
    must hold a partial character until its last byte (no U+FFFD), and match the kit's text exactly."""
    messages = [{"role": "user", "content": "Write the word café and the emoji 😀 five times."}]
    raw = raw_once(loaded, messages, 24, expect_tokens=loaded.format_prompt(messages))
    kit = asyncio.run(kit_once(backend, TEST_MODEL, messages, 24))
    assert any(ord(ch) > 0x7F for ch in raw["text"])  # the model did write multi-byte characters
    assert "\ufffd" not in raw["text"][:-1]  # (the very end may be a character cut by the token limit)
    assert raw["text"] == kit["text"] and raw["output_tokens"] == kit["output_tokens"]


# ------------------------------------------------------------------------------------------- pipeline

def test_pipeline_warms_every_preset_and_reports_first_runs_apart(backend):
    out = asyncio.run(pipeline(TEST_MODEL, presets=("direct", "staged"), queries=("Why is the sky blue?",),
                               max_tokens=12, backend=backend))
    assert out["cache"].startswith("cold per run")
    for p in ("direct", "staged"):
        assert out[p]["first_run"]["status"] == "ok" and out[p]["runs"] == 1 and not out[p]["errors"]
        assert out[p]["user_ttft_s"]["median"] > 0
    assert "decision_s" in out["staged"] and out["staged"]["decision_s"]["median"] > 0
    assert "decision_s" not in out["direct"]
    assert out["staged"]["user_ttft_ratio_vs_direct"] > 0
    # the staged first token waits for the decision's prompt and then the first visible stage's new part
    assert out["staged"]["prefill_tokens_to_first_visible_median"] > out["direct"]["prefill_tokens_to_first_visible_median"] > 0


def test_cold_per_run_empties_the_cache_once_and_a_run_shares_its_prefix(backend, loaded):
    """The first call of a run evaluates its whole prompt (the cache was emptied), a later call of the same
    run evaluates only what it does not share with the earlier one."""
    pipe = Pipeline.from_preset("staged", backend=backend, model=TEST_MODEL, max_tokens=12, cache="reuse")
    asyncio.run(pipe.run("Why is the sky blue?"))  # leaves this query's prefix in the cache
    assert backend.empty_caches() is True
    assert loaded.llm.n_tokens == 0
    rec = asyncio.run(pipe.run("Why is the sky blue?"))
    first, last = rec.stages[0].call, rec.stages[-1].call
    assert first.server["prompt_eval_tokens"] == first.prompt_tokens  # cold at the run's start
    assert last.server["prompt_eval_tokens"] < last.prompt_tokens  # the answer reused the decision's prefix


# ------------------------------------------------------------------------------------------ decisions

def test_decisions_reads_raw_and_calibrated_choices_from_one_call_and_scores_both(backend, tmp_path):
    rows = [  # SmolLM2-135M says "simple" to all three; calibrated, it moves to comprehensive for two of them
        {"id": "ko-c08", "category": "comprehensive", "lang": "ko",
         "query": "URL을 입력한 순간부터 첫 화면이 그려질 때까지 웹 브라우저가 페이지를 불러와 렌더링하는 과정을 빠짐없이 설명해 주세요."},
        {"id": "en-s06", "category": "simple", "lang": "en", "query": "What is the chemical symbol for gold?"},
        {"id": "ko-s06", "category": "simple", "lang": "ko", "query": "HTML은 무엇의 약자인가요?"},
        {"id": "nolabel", "query": "Why is the sky blue?"},  # no category: not scored, not run
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = asyncio.run(decisions(TEST_MODEL, path, backend=backend))
    got = {r["id"]: (r["raw"], r["calibrated"]) for r in out["rows"]}
    assert got == {"ko-c08": ("simple", "comprehensive"), "en-s06": ("simple", "comprehensive"),
                   "ko-s06": ("simple", "simple")}
    # calibration helped one query and hurt another: the same agreement (2 of 3), a gain of 0 either way
    assert out["raw"]["agreement"] == out["calibrated"]["agreement"] == round(2 / 3, 4) and out["agreement_gain"] == 0
    assert out["raw"]["distribution"] == {"simple": 3, "analytical": 0, "comprehensive": 0}
    assert out["calibrated"]["by_label"] == {"simple": {"comprehensive": 1, "simple": 1}, "comprehensive": {"comprehensive": 1}}
    assert out["by_language"] == {"en": {"raw": 1.0, "calibrated": 0.0}, "ko": {"raw": 0.5, "calibrated": 1.0}}
    assert out["calibration_queries"] == 12 and set(out["prior"]) == {"simple", "analytical", "comprehensive"}
    assert out["decision_s"]["median"] > 0
    path.write_text(json.dumps(rows[-1]), encoding="utf-8")
    with pytest.raises(InvalidInput, match="category label"):
        asyncio.run(decisions(TEST_MODEL, path, backend=backend))


# ---------------------------------------------------------------------------------------------- bandwidth

def test_read_bandwidth_uses_every_usable_core():
    out = memory_read_bandwidth(size_mb=64, repeats=1)
    assert out["threads"] == usable_cores() and out["gb_per_s"] > 0 and "read" in out["method"]


# ------------------------------------------------------------------------------------------- language

def test_bare_preset_is_a_plain_chat(backend):
    from llmfirst_kit.pipeline.presets import ANSWER_INSTRUCTION, BARE_SYSTEM_PROMPT

    rec = asyncio.run(Pipeline.from_preset("bare", backend=backend, model=TEST_MODEL, max_tokens=8).run("Hi?"))
    assert rec.status == "ok" and [s.name for s in rec.stages] == ["answer"]
    assert rec.kit_prompts == [BARE_SYSTEM_PROMPT]  # no task, no budget note: only the minimal system prompt
    assert not any(ANSWER_INSTRUCTION in p for p in rec.kit_prompts)


def test_language_bench_tells_languages_apart(backend, tmp_path):
    """SmolLM2 (English only) answers English queries in English and Korean ones mostly not in Korean: the
    figure comes out high for one language and low for the other."""
    from llmfirst_kit.bench.language import language
    from llmfirst_kit.quality.language import language_match, script_of

    assert script_of("호주의 수도는 캔버라입니다.") == "ko" and script_of("Canberra.") == "en" and script_of("42") is None
    assert script_of("HTTP는 HyperText Transfer Protocol입니다.") == "ko"  # a Korean sentence with an English term
    assert language_match([("서울입니다.", "ko"), ("Seoul.", "ko"), ("Seoul.", "en"), ("x", "fr")]) == 2 / 3
    assert language_match([("Seoul.", "ko")]) == 0.0 and language_match([]) is None
    rows = [{"id": "en-1", "lang": "en", "query": "What is the capital of France?",
             "facts": [{"en": "Paris", "any": ["Paris"]}]},
            {"id": "en-2", "lang": "en", "query": "Name a primary colour.", "facts": []},
            {"id": "ko-1", "lang": "ko", "query": "프랑스의 수도는 어디인가요?", "facts": [{"ko": "파리", "any": ["파리", "Paris"]}]},
            {"id": "ko-2", "lang": "ko", "query": "하늘은 왜 파란가요?", "facts": []}]  # answered in English
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    # one at a time from an empty cache: each answer is the one the model gives alone (no batch rounding)
    out = asyncio.run(language(TEST_MODEL, ("bare", "direct"), queries=path, max_tokens=16, concurrency=1,
                               cache="cold", backend=backend))
    for name in ("bare", "direct"):
        row = out["presets"][name]
        assert row["en_answered_in_en"] == 1.0 and row["ko_answered_in_ko"] == 0.5, row
        assert row["ko_queries"] == 2 and 0 <= row["key_fact_recall"] <= 1
