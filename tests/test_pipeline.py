"""The LLM-first pipeline on the real embedded model: presets, decisions, provenance, compliance, errors."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import replace

import fastjsonschema
import pytest

from llmfirst_kit.backends.embedded import EmbeddedBackend
from llmfirst_kit.errors import ContextOverflow, InvalidInput, UnknownModel
from llmfirst_kit.events import Decision, Error, RunEnd, StageEnd, StageStart, Token
from llmfirst_kit.metrics import compliance, kit_overhead_s, run_metrics, user_ttft_s
from llmfirst_kit.pipeline import PRESETS, STRATEGY_SCHEMA, Pipeline, Stage, preset, with_model
from llmfirst_kit.records import Visible

from conftest import TEST_MODEL

QUERY = "Why do cats purr?"


def make(name: str, backend, **kw) -> Pipeline:
    kw.setdefault("max_tokens", 24)
    return Pipeline.from_preset(name, backend=backend, model=TEST_MODEL, fast_model=TEST_MODEL, **kw)


async def collect(pipe: Pipeline, query: str = QUERY):
    run = pipe.start(query)
    events = [ev async for ev in run]
    return run.record, events


@pytest.mark.parametrize("name,options", [
    ("direct", {}),
    ("staged", {}),
    ("staged", {"rewrite": True, "review": True}),
    ("cascade", {}),
])
async def test_every_preset_is_fully_model_written(backend, name, options):
    rec, events = await collect(make(name, backend, **options))
    assert rec.status == "ok", rec.error
    assert compliance(rec) == 1.0
    visible = [s for s in rec.stages if s.visible]
    assert visible and all(s.call.text for s in visible)
    # every shown string is exactly what its call streamed
    calls = {s.call.call_id: s.call for s in rec.stages}
    for shown in rec.shown:
        assert shown.text == calls[shown.call_id].text
    assert isinstance(events[-1], RunEnd) and events[-1].record is rec
    assert events[-1].metrics["compliance"] == 1.0


async def test_compliance_catches_kit_written_text(backend):
    rec, _ = await collect(make("direct", backend))
    canned = copy.deepcopy(rec)
    canned.shown.insert(0, Visible(stage="answer", text="분석을 시작합니다...", call_id=None))
    assert compliance(canned) < 1.0
    forged = copy.deepcopy(rec)  # a string claiming to come from a call that never produced it
    forged.shown.append(Visible(stage="answer", text=" Analysis complete.", call_id=rec.stages[0].call.call_id))
    assert compliance(forged) < 1.0
    expected = len(rec.shown[0].text) / (len(rec.shown[0].text) + len(" Analysis complete."))
    assert compliance(forged) == pytest.approx(expected)


async def test_events_are_ordered_and_carry_call_ids(backend):
    rec, events = await collect(make("staged", backend))
    call_ids = {s.call.call_id for s in rec.stages}
    open_calls: set[str] = set()
    for ev in events:
        if isinstance(ev, StageStart):
            open_calls.add(ev.call_id)
        elif isinstance(ev, Token):
            assert ev.call_id in open_calls and ev.call_id in call_ids
        elif isinstance(ev, StageEnd):
            open_calls.remove(ev.call_id)
            assert ev.metrics["output_tokens"] == ev.record.output_tokens
    assert not open_calls
    stamps = [ev.t_ns for ev in events]
    assert stamps == sorted(stamps)  # one sequential pipeline: monotonic
    assert [ev.stage for ev in events if isinstance(ev, StageStart)] == ["strategy", "analysis", "reasoning", "answer"]


async def test_strategy_decision_sets_later_budgets(backend):
    pipe = make("staged", backend, max_tokens=200)
    rec, events = await collect(pipe)
    decision = rec.decisions["strategy"]
    assert decision["status"] == "decided"
    fastjsonschema.validate(STRATEGY_SCHEMA, decision["value"])
    [ev] = [e for e in events if isinstance(e, Decision)]
    assert ev.name == "strategy" and ev.value == decision["value"]
    budget = decision["value"]["token_budget"]
    by_name = {s.name: s.call for s in rec.stages}
    assert by_name["answer"].params["max_tokens"] == max(16, min(200, round(budget * 1.0)))
    assert by_name["analysis"].params["max_tokens"] == max(16, min(200, round(budget * 0.5)))


async def test_invalid_structured_output_is_retried_once_then_undecided(backend):
    # An 8-token cap cuts the strategy JSON short: real, invalid model output, twice.
    pipe = make("staged", backend)
    pipe.stages[0] = replace(pipe.stages[0], max_tokens=8)
    rec, events = await collect(pipe)
    names = [s.name for s in rec.stages]
    assert names[:2] == ["strategy", "strategy.retry"]
    decision = rec.decisions["strategy"]
    assert decision["status"] == "undecided"
    assert decision["value"] == pipe.default_strategy and decision["problem"]
    assert [e.status for e in events if isinstance(e, Decision)] == ["undecided"]
    assert rec.status == "ok" and compliance(rec) == 1.0


async def test_rewrite_keeps_both_queries(backend):
    rec, _ = await collect(make("direct", backend, rewrite=True))
    assert rec.query == QUERY
    rewritten = rec.decisions["rewritten_query"]["value"]
    assert rewritten and rewritten == rec.stages[0].call.text
    answer_prompt = rec.stages[1].call  # the answer saw the rewritten query
    assert rec.stages[1].name == "answer" and answer_prompt.status == "ok"


async def test_review_by_a_different_judge_model(backend):
    pipe = make("direct", backend, review=True, judge_model="qwen2.5-coder-0.5b")
    rec, _ = await collect(pipe)
    assert rec.quality is not None and rec.quality["judge_model"] == "qwen2.5-coder-0.5b"
    assert rec.quality["status"] == "decided" and 0 <= rec.quality["score"] <= 100
    assert run_metrics(rec)["quality"] == rec.quality["score"]
    review = [s for s in rec.stages if s.name == "review"][0]
    assert not review.visible and review.call.model == "qwen2.5-coder-0.5b"


async def test_custom_pipeline_as_data(backend):
    stages = [
        Stage(name="facts", instruction="List two facts relevant to the query.", visible=False, max_tokens=24),
        Stage(name="reply", instruction="Answer using the facts.", sees=("query", "facts")),
    ]
    pipe = Pipeline(stages=stages, backend=backend, model=TEST_MODEL, max_tokens=24)
    rec, _ = await collect(pipe)
    assert [s.name for s in rec.stages] == ["facts", "reply"]
    assert [v.stage for v in rec.shown] == ["reply"]
    assert kit_overhead_s(rec) >= 0 and user_ttft_s(rec) > 0


async def test_cancel_keeps_partial_record(backend, loaded):
    pipe = make("direct", backend, max_tokens=400)
    pipe.stages = [Stage(name="answer", instruction="Write a very long essay about the sea.")]
    run = pipe.start(QUERY)
    seen = 0

    async def consume():
        nonlocal seen
        async for ev in run:
            if isinstance(ev, Token):
                seen += 1

    task = asyncio.create_task(consume())
    while seen < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    before = loaded.tokens_decoded
    await asyncio.sleep(0.3)
    assert loaded.tokens_decoded - before <= 1  # decoding stopped
    rec = run.record
    assert rec.status == "cancelled" and rec.stages[0].call.status == "cancelled"
    assert rec.stages[0].call.text and rec.shown[0].text == rec.stages[0].call.text


async def test_error_in_a_later_stage_keeps_earlier_text(loaded):
    small = EmbeddedBackend(TEST_MODEL, n_ctx=256)
    stages = [
        Stage(name="first", instruction="Say one sentence about rivers.", max_tokens=24),
        Stage(name="second", instruction="Continue.", sees=("query", "first"), max_tokens=250),
    ]
    pipe = Pipeline(stages=stages, backend=small, model=TEST_MODEL, max_tokens=250)
    rec, events = await collect(pipe)
    errors = [e for e in events if isinstance(e, Error)]
    assert len(errors) == 1 and errors[0].code == ContextOverflow.code and errors[0].stage == "second"
    assert "256" in errors[0].message
    assert rec.status == "error" and rec.shown[0].text == rec.stages[0].call.text != ""
    assert isinstance(events[-1], RunEnd) and events[-1].status == "error"


def _calls(loaded) -> int:
    return loaded.calls


@pytest.mark.parametrize("build,match", [
    (lambda b: Pipeline.from_preset("turbo", backend=b, model=TEST_MODEL), "unknown preset 'turbo'"),
    (lambda b: Pipeline(stages=[], backend=b, model=TEST_MODEL), "no stages"),
    (lambda b: Pipeline(stages=[Stage(name="a", instruction="x", sees=("query", "nothing"))], backend=b,
                        model=TEST_MODEL), "'nothing', which no earlier stage makes"),
    (lambda b: Pipeline(stages=[Stage(name="a", instruction="x", sees=("b",)), Stage(name="b", instruction="y",
                                                                                     sees=("a",))],
                        backend=b, model=TEST_MODEL), "cycle"),
    (lambda b: Pipeline(stages=[Stage(name="a", instruction="x", sees=("a",))], backend=b, model=TEST_MODEL),
     "cycle"),
    (lambda b: Pipeline.from_preset("direct", backend=b, model=TEST_MODEL, review=True, judge_model="gemma3-270m"),
     "base model"),
    (lambda b: Pipeline.from_preset("direct", backend=b, model="no-such-model"), "known:"),
])
async def test_bad_pipelines_fail_before_any_model_call(backend, loaded, build, match):
    before = _calls(loaded)
    with pytest.raises(InvalidInput, match=match):
        pipe = build(backend)
        pipe.start(QUERY)
    assert _calls(loaded) == before


async def test_empty_query_fails_before_any_model_call(backend, loaded):
    before = _calls(loaded)
    with pytest.raises(InvalidInput, match="empty"):
        make("staged", backend).start("   ")
    assert _calls(loaded) == before


def test_unknown_stage_name_is_an_error():
    with pytest.raises(InvalidInput, match="no stage named 'judge'; stages: answer, review"):
        with_model(preset("direct", review=True), "judge", TEST_MODEL)
    assert with_model(preset("direct", review=True), "review", TEST_MODEL)[1].model == TEST_MODEL


def test_presets_are_data():
    assert PRESETS == ("direct", "staged", "cascade")
    assert [s.name for s in preset("staged")] == ["strategy", "analysis", "reasoning", "answer"]
    assert [s.name for s in preset("staged", rewrite=True, review=True)] == [
        "rewrite", "strategy", "analysis", "reasoning", "answer", "review"]
    first = preset("staged", analysis_first=True)
    assert [s.name for s in first] == ["analysis", "strategy", "reasoning", "answer"]
    assert first[1].sees == ("query", "analysis")
    assert [s.name for s in preset("cascade", rewrite=True)] == ["opening", "rewrite", "answer"]
    cascade = preset("cascade")
    assert cascade[0].overlap and cascade[0].visible and cascade[1].name == "answer"
    with pytest.raises(UnknownModel):
        Pipeline.from_preset("direct", model="nope")


def test_preset_names_are_parsed_in_one_place_and_a_wrong_variant_is_refused():
    from llmfirst_kit.pipeline import PRESET_NAMES, parse_preset

    assert parse_preset("staged:analysis-first").label == "staged:analysis-first"
    assert parse_preset("staged:analysis-first").analysis_first and not parse_preset("staged").analysis_first
    assert [parse_preset(n).label for n in PRESET_NAMES] == list(PRESET_NAMES)
    for wrong in ("direct:analysis-first", "staged:fast", "Staged", "cascade:", ""):
        with pytest.raises(InvalidInput, match="known: direct, staged, staged:analysis-first, cascade"):
            parse_preset(wrong)
