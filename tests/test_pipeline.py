"""The LLM-first pipeline on the real embedded model: presets, decisions, provenance, compliance, errors."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import replace

import fastjsonschema
import pytest

from llmfirst_kit.backends import CallRequest
from llmfirst_kit.backends.embedded import EmbeddedBackend
from llmfirst_kit.errors import ContextOverflow, InvalidInput, UnknownModel
from llmfirst_kit.events import Decision, Error, RunEnd, StageEnd, StageStart, Token
from llmfirst_kit.compliance import Transcript, decision_compliance, sink_compliance
from llmfirst_kit.metrics import kit_overhead_s, run_metrics, user_ttft_s
from llmfirst_kit.pipeline import (PRESETS, STRATEGIES, STRATEGY_SCHEMA, SYSTEM_PROMPT, Pipeline, Stage, preset,
                                   strategy_stage, structured_retry, with_model)
from llmfirst_kit.pipeline import calibration
from llmfirst_kit.pipeline.calibration import calibration_queries, forget_priors
from llmfirst_kit.sinks.console import ConsoleSink

from conftest import TEST_MODEL

QUERY = "Why do cats purr?"
JUDGE = "qwen2.5-coder-0.5b"  # the reviewer where a review must be valid JSON (the 135M model loops inside strings)


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
async def test_every_preset_shown_on_a_terminal_is_the_models_text(backend, name, options):
    out, err = io.StringIO(), io.StringIO()
    sink = ConsoleSink(out, err, labels=True)
    rec = await make(name, backend, **options).run(QUERY, on_event=sink.handle)
    sink.close()
    assert rec.status == "ok", rec.error
    visible = [s for s in rec.stages if s.visible]
    assert visible and all(s.call.text for s in visible)
    # what reached stdout is each visible stage's text, whole and in order (one stream at a time, even for
    # the cascade's two concurrent streams), with only whitespace between: the sink added no word of its own
    texts = {s.name: s.call.text for s in visible}
    shown = sink.transcript.stages()  # in the order they were shown, each once: never interleaved
    assert sorted(shown) == sorted(texts)
    runs = [seg.stage for seg in sink.transcript.segments if seg.channel == "content"]
    assert [st for i, st in enumerate(runs) if i == 0 or runs[i - 1] != st] == shown  # each stage's text contiguous
    assert out.getvalue().split() == " ".join(texts[st] for st in shown).split()
    assert sink.transcript.content_text() == "".join(texts[st] for st in shown)
    report = sink_compliance(rec, sink.transcript)
    if len(visible) == 1:  # the figure from stdout as captured, apart from the sink's own transcript, is the same
        captured = Transcript("stdout")
        captured.content(visible[0].name, out.getvalue())
        assert sink_compliance(rec, captured).compliance == report.compliance
    assert report.content_chars == len("".join(out.getvalue().split()))
    assert report.compliance == (report.content_chars - report.prompt_echo_chars) / report.content_chars
    assert f"[{visible[0].name}]" in err.getvalue() and f"[{visible[0].name}]" not in out.getvalue()


class ChattySink(ConsoleSink):
    """A sink that writes a status sentence of its own into the content, as the paper's sketch does. This is
    the fault under test: a real sink of the kit never does it."""

    def handle(self, ev):
        if isinstance(ev, StageStart) and ev.visible:
            self._content(ev.stage, "분석 중: ")
        super().handle(ev)


async def test_a_sink_that_adds_its_own_words_scores_below_one(backend):
    sink = ChattySink(io.StringIO(), io.StringIO())
    rec = await make("direct", backend).run(QUERY, on_event=sink.handle)
    report = sink_compliance(rec, sink.transcript)
    written = len("".join(rec.stages[0].call.text.split()))
    assert report.kit_chars >= len("분석중:") and report.compliance < 1.0
    assert report.compliance == pytest.approx((written - report.prompt_echo_chars) / (written + len("분석중:")))
    honest = ConsoleSink(io.StringIO(), io.StringIO())
    for ev in _replay(rec):
        honest.handle(ev)
    assert sink_compliance(rec, honest.transcript).kit_chars == report.kit_chars - len("분석중:")


def _replay(rec):
    """The events of a finished run, rebuilt from its record (to show it through a second sink)."""
    for s in rec.stages:
        yield StageStart(run_id=rec.run_id, t_ns=0, stage=s.name, model=s.call.model, call_id=s.call.call_id,
                         visible=s.visible)
        yield Token(run_id=rec.run_id, t_ns=0, stage=s.name, call_id=s.call.call_id, text=s.call.text, tokens=None,
                    visible=s.visible)
        yield StageEnd(run_id=rec.run_id, t_ns=0, stage=s.name, call_id=s.call.call_id, status=s.call.status,
                       metrics={}, record=s.call)


async def test_a_model_that_echoes_the_kits_prompt_shows_kit_text(backend):
    # A real model asked to repeat its instructions: what it shows is the kit's prompt, not its own words.
    stage = Stage(name="answer", replies=True, instruction=(
        'Reply with exactly this sentence: "You are one stage of a pipeline that answers a user\'s query. '
        'Follow your task."'))
    pipe = Pipeline(stages=[stage], backend=backend, model=TEST_MODEL, max_tokens=60)
    sink = ConsoleSink(io.StringIO(), io.StringIO())
    rec = await pipe.run("Repeat the sentence.", on_event=sink.handle)
    assert rec.kit_prompts and any("pipeline" in p for p in rec.kit_prompts)
    m = run_metrics(rec)
    assert m.prompt_echo_chars > 0 and m.compliance < 1.0, rec.stages[0].call.text
    report = sink_compliance(rec, sink.transcript)
    assert report.prompt_echo_chars == m.prompt_echo_chars and report.compliance == pytest.approx(m.compliance)


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
            assert ev.metrics.output_tokens == ev.record.output_tokens
    assert not open_calls
    stamps = [ev.t_ns for ev in events]
    assert stamps == sorted(stamps)  # one sequential pipeline: monotonic
    plan = rec.decisions["strategy"].plan
    assert [ev.stage for ev in events if isinstance(ev, StageStart)] == ["strategy", *plan["runs"]]


async def test_strategy_is_a_choice_in_one_forward_pass_and_shapes_the_run(backend):
    pipe = make("staged", backend, max_tokens=200)
    rec, events = await collect(pipe)
    decision = rec.decisions["strategy"]
    assert decision.status == "decided" and decision.source == "model" and decision.used == decision.value
    assert decision.method == "next-token choice" and decision_compliance(rec) == 1.0  # 0.0: see below
    probs = decision.probabilities
    assert set(probs) == set(STRATEGIES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    chosen = decision.value["strategy"]
    assert chosen == max(probs, key=probs.get) and 0 < decision.mass <= 1
    fastjsonschema.validate(STRATEGY_SCHEMA, decision.value)
    strategy_call = rec.stages[0].call
    assert strategy_call.output_tokens == 1  # no decoding
    # the call's own probabilities are the model's, before calibration (see the calibration tests)
    assert decision.calibration["raw"] == dict(zip(strategy_call.choice["options"], strategy_call.choice["probabilities"]))
    [ev] = [e for e in events if isinstance(e, Decision)]
    assert ev.name == "strategy" and ev.value == decision.value
    # the plan follows the choice: a stage runs only for the strategies it runs for, with that strategy's budget
    later = {s.name: s for s in pipe.stages[1:]}
    plan = decision.plan
    assert plan["runs"] == [n for n, s in later.items() if not s.runs_for or chosen in s.runs_for]
    assert [s.name for s in rec.stages[1:]] == plan["runs"] and plan["skipped"] == [n for n in later if n not in plan["runs"]]
    for s in rec.stages[1:]:
        budget = min(dict(later[s.name].budgets)[chosen], 200)
        assert s.call.params["max_tokens"] == plan["budgets"][s.name] == budget
        # and the stage was told its budget, in words, in its instruction
        assert any(f"at most about {round(budget * 0.6)} words" in p for p in rec.kit_prompts), s.name


def _strategy_prompt(query: str) -> list[dict[str, str]]:
    """The strategy decision's prompt, written out here as the kit lays it out: the system prompt, then one
    user turn, the query first and the task after it."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{query}\n\nYour task: {strategy_stage().instruction}"}]


async def test_calibrated_strategy_divides_the_models_probabilities_by_its_prior(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "priors_dir", lambda: tmp_path)
    forget_priors()
    pipe = Pipeline(stages=[strategy_stage()], backend=backend, model=TEST_MODEL)
    first = (await pipe.run(QUERY)).decisions["strategy"]
    cal = first.calibration
    assert cal["method"] == "batch" and cal["queries"] == len(calibration_queries()) == 12 and cal["computed_s"] > 0
    assert cal["file"] is None and len(list(tmp_path.glob("*.json"))) == 1  # computed, and kept on disk
    # the prior, computed here on its own: the model's probabilities on each calibration query, averaged
    probs = []
    for q in calibration_queries():
        rec = await backend.call(CallRequest(messages=_strategy_prompt(q), model=TEST_MODEL, max_tokens=1,
                                             choices=list(STRATEGIES))).collect()
        probs.append(dict(zip(rec.choice["options"], rec.choice["probabilities"])))
    # (the prior's calls ran as one batch, these one at a time: a batch rounds floats differently, ~1e-3 here)
    for o in STRATEGIES:
        assert cal["prior"][o] == pytest.approx(sum(p[o] for p in probs) / len(probs), abs=5e-3)
    # the decision's probabilities: raw / prior, renormalised; the decision is the largest
    ratios = {o: cal["raw"][o] / cal["prior"][o] for o in STRATEGIES}
    for o in STRATEGIES:
        assert first.probabilities[o] == pytest.approx(ratios[o] / sum(ratios.values()), abs=1e-5)
    assert first.value["strategy"] == max(ratios, key=ratios.get)
    # once per process: the next run finds the prior and says it computed nothing
    again = (await pipe.run("What is the boiling point of water?")).decisions["strategy"]
    assert again.calibration["computed_s"] is None and again.calibration["prior"] == cal["prior"]
    # a new process (memory emptied) reads it from disk; a torn file is computed again and replaced
    [stored] = tmp_path.glob("*.json")
    forget_priors()
    read = (await pipe.run(QUERY)).decisions["strategy"]
    assert read.calibration["file"] == str(stored) and read.calibration["computed_s"] is None
    assert read.calibration["prior"] == cal["prior"] and read.value == first.value  # read back: the same numbers
    stored.write_text('{"key": ', encoding="utf-8")
    forget_priors()
    redone = (await pipe.run(QUERY)).decisions["strategy"]
    # computed again (as one batch: its float rounding may differ from the first time's in the third decimal)
    assert redone.calibration["computed_s"] > 0
    assert redone.calibration["prior"] == pytest.approx(cal["prior"], abs=5e-3)
    assert json.loads(stored.read_text(encoding="utf-8"))["probabilities"] == redone.calibration["prior"]


@pytest.mark.parametrize("query,raw,decided,analysis", [
    # SmolLM2-135M says "simple" to every query; this one raises "comprehensive" most above the model's habit
    # (its prior), so the analysis runs
    ("What is the capital of Australia?", "simple", "comprehensive", True),
    # here "simple" stays ahead after calibration (0.64 vs 0.25), so the analysis is skipped
    ("HTML은 무엇의 약자인가요?", "simple", "simple", False),
])
async def test_calibration_moves_the_decision_only_where_the_query_does(backend, query, raw, decided, analysis):
    rec = await make("staged", backend).run(query)
    decision = rec.decisions["strategy"]
    cal = decision.calibration
    assert max(cal["raw"], key=cal["raw"].get) == raw and decision.value == {"strategy": decided}
    assert ("analysis" in [s.name for s in rec.stages]) is analysis and decision.source == "model"
    # the answer is told to use earlier stages' notes only when it has some (the simple path runs none)
    assert any("notes from the earlier stages" in p for p in rec.kit_prompts) is analysis


def test_a_calibrated_choice_must_see_only_the_query(backend):
    stages = preset("staged", analysis_first=True)
    assert stages[1].name == "strategy" and not stages[1].calibrate  # its prior would need an analysis per query
    with pytest.raises(InvalidInput, match="must see only the query"):
        Pipeline(stages=[stages[0], replace(stages[1], calibrate=True)], backend=backend, model=TEST_MODEL).validate()


async def test_invalid_structured_output_is_retried_once_then_undecided(backend):
    # The strategy asked for as structured output (as on a backend without next-token choices), with a 2-token
    # cap that cuts the JSON short: real, invalid model output, twice.
    pipe = make("staged", backend)
    pipe.stages[0] = replace(pipe.stages[0], choices=(), max_tokens=2)
    rec, events = await collect(pipe)
    names = [s.name for s in rec.stages]
    assert names[:2] == ["strategy", "strategy.retry"]
    # the retry is the one structured-output retry: the invalid reply sent back as the model's turn, then what was
    # wrong (a kit prompt: a model that echoes it shows kit text)
    retry = structured_retry([{"role": "user", "content": "q"}], rec.stages[0].call.text, "x")
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == rec.stages[0].call.text
    assert any(p.startswith("Your reply was not valid (not JSON") for p in rec.kit_prompts)
    decision = rec.decisions["strategy"]
    assert decision.status == "undecided" and decision.source == "kit default" and decision.cut_by_limit
    assert decision.value is None and decision.used == pipe.default_strategy and decision.problem
    assert decision.method == "structured output"
    [ev] = [e for e in events if isinstance(e, Decision)]
    assert ev.status == "undecided" and ev.value is None and ev.used == pipe.default_strategy
    assert rec.status == "ok" and decision_compliance(rec) == 0.0 and run_metrics(rec).decision_compliance == 0.0
    # the run goes on with the kit's default strategy, and its plan: analytical = analysis, then the answer
    assert decision.plan["runs"] == ["analysis", "answer"] == names[2:]
    err = io.StringIO()
    sink = ConsoleSink(io.StringIO(), err)
    sink.handle(ev)
    assert "undecided" in err.getvalue() and "the kit's default is used" in err.getvalue()


async def test_rewrite_keeps_both_queries(backend):
    rec, _ = await collect(make("direct", backend, rewrite=True))
    assert rec.query == QUERY
    rewritten = rec.decisions["rewritten_query"].value
    assert rewritten and rewritten == rec.stages[0].call.text
    answer_prompt = rec.stages[1].call  # the answer saw the rewritten query
    assert rec.stages[1].name == "answer" and answer_prompt.status == "ok"


async def test_review_by_a_different_judge_model(backend):
    pipe = make("direct", backend, review=True, judge_model="qwen2.5-coder-0.5b")
    rec, _ = await collect(pipe)
    assert rec.quality is not None and rec.quality["judge_model"] == "qwen2.5-coder-0.5b"
    assert rec.quality["status"] == "decided" and 0 <= rec.quality["score"] <= 100
    assert run_metrics(rec).quality == rec.quality["score"]
    review = [s for s in rec.stages if s.name == "review"][0]
    assert not review.visible and review.call.model == "qwen2.5-coder-0.5b"


def _forced_review(pipe: Pipeline, revise: bool) -> Pipeline:
    """The judge's review with its ``revise`` field constrained by the grammar to one value: the model still
    writes the review (real output), only that decision is pinned, so each branch can be tested on demand."""
    i = next(i for i, s in enumerate(pipe.stages) if s.name == "review")
    schema = {**pipe.stages[i].schema, "properties": {**pipe.stages[i].schema["properties"],
                                                      "revise": {"enum": [revise]}}}
    pipe.stages[i] = replace(pipe.stages[i], schema=schema)
    return pipe


@pytest.mark.parametrize("revise", [True, False])
async def test_the_judge_decides_whether_the_answer_is_revised(backend, revise):
    pipe = _forced_review(make("direct+revise", backend, max_tokens=24, judge_model=JUDGE), revise)
    assert pipe.name == "direct+revise"
    rec, events = await collect(pipe)
    names = [s.name for s in rec.stages]
    quality = rec.decisions["quality"]
    assert quality.source == "model" and quality.value["revise"] is revise and rec.quality["revise"] is revise
    if revise:  # the revision streams, visible, and is the run's answer; it saw the answer and the review
        assert names == ["answer", "review", "revision"]
        revision = rec.stages[-1]
        assert revision.visible and revision.call.status == "ok" and revision.call.text
        assert any(isinstance(e, Token) and e.stage == "revision" and e.visible for e in events)
        assert run_metrics(rec).answer_tpot_s is None or revision.call.output_tokens
    else:
        assert names == ["answer", "review"]
    assert rec.status == "ok"


async def test_an_undecided_review_revises_nothing(backend):
    # the review cut to 2 tokens: invalid JSON twice, so no decision of the model's; code never revises on its own
    pipe = make("direct+revise", backend)
    i = next(i for i, s in enumerate(pipe.stages) if s.name == "review")
    pipe.stages[i] = replace(pipe.stages[i], max_tokens=2)
    rec, _ = await collect(pipe)
    assert rec.decisions["quality"].status == "undecided"
    assert [s.name for s in rec.stages] == ["answer", "review", "review.retry"]


def test_preset_modifiers_build_the_stages():
    from llmfirst_kit.pipeline import parse_preset

    assert [s.name for s in preset("staged", revise=True)] == [
        "strategy", "analysis", "reasoning", "answer", "review", "revision"]
    revision = preset("staged", revise=True)[-1]
    assert revision.when == ("quality", "revise") and dict(revision.budgets)["simple"] == 128
    parsed = parse_preset("staged:analysis-first+rewrite+revise")
    assert parsed.analysis_first and parsed.rewrite and parsed.revise
    assert parsed.label == "staged:analysis-first+rewrite+revise"
    assert parse_preset("direct+revise").label == "direct+revise"
    for wrong in ("direct+revise+revise", "direct+fast", "direct+"):
        with pytest.raises(InvalidInput, match=r"optional modifiers \+rewrite, \+revise"):
            parse_preset(wrong)
    assert Pipeline.from_preset("direct", rewrite=True).name == "direct+rewrite"


async def test_custom_pipeline_as_data(backend):
    stages = [
        Stage(name="facts", instruction="List two facts relevant to the query.", visible=False, max_tokens=24),
        Stage(name="reply", instruction="Answer using the facts.", sees=("query", "facts")),
    ]
    pipe = Pipeline(stages=stages, backend=backend, model=TEST_MODEL, max_tokens=24)
    rec, _ = await collect(pipe)
    assert [s.name for s in rec.stages] == ["facts", "reply"]
    assert [s.name for s in rec.stages if s.visible] == ["reply"]
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
    assert rec.stages[0].call.text


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
    assert rec.status == "error" and rec.stages[0].call.text != ""
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
    assert PRESETS == ("bare", "direct", "staged", "cascade")
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
        with pytest.raises(InvalidInput, match="known: bare, direct, staged, staged:analysis-first, cascade"):
            parse_preset(wrong)


def test_the_public_api_is_importable_from_the_package():
    import llmfirst_kit
    from llmfirst_kit import CallRequest, Pipeline, RunRecord, Stage, events, get_backend, run_sync
    from llmfirst_kit.backends import CallRequest as CR, get_backend as gb
    from llmfirst_kit.records import RunRecord as RR
    from llmfirst_kit.sync import run_sync as rs

    assert (Pipeline, Stage, CallRequest, get_backend, RunRecord, run_sync) == (
        llmfirst_kit.pipeline.Pipeline, llmfirst_kit.pipeline.Stage, CR, gb, RR, rs)
    assert events.Token is llmfirst_kit.events.Token and set(llmfirst_kit.__all__) >= {"Pipeline", "events"}
    with pytest.raises(AttributeError, match="no attribute 'Pipleine'"):
        llmfirst_kit.Pipleine
