"""The metric formulas, checked against hand-computed values on records built with a scripted clock
(every stamp chosen by hand, as vLLM's benchmark tests do), and the JSONL run log."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmfirst_kit import metrics as m
from llmfirst_kit.compliance import Transcript, decision_compliance, prompt_echo_chars, sink_compliance
from llmfirst_kit.records import CallRecord, DecisionRecord, RunRecord, StageRecord
from llmfirst_kit.sinks.jsonl import RunLog, read_log, write_log

S = 1_000_000_000  # ns per second
MS = 1_000_000
T0 = 5_000 * S  # an arbitrary perf_counter origin: only differences matter


def call(start_ns: int = T0, chunks_ms: tuple[int, ...] = (), tokens: tuple[int, ...] | None = None,
         output_tokens: int | None = None, end_ms: int | None = None, text: str = "", call_id: str = "c1",
         warmup: bool = False, **kw) -> CallRecord:
    """A call whose chunks arrive ``chunks_ms`` milliseconds after ``start_ns``."""
    tokens = tuple(tokens) if tokens is not None else (1,) * len(chunks_ms)
    return CallRecord(
        call_id=call_id, backend="embedded", model="test", start_ns=start_ns,
        end_ns=start_ns + end_ms * MS if end_ms is not None else 0,
        chunk_ns=[start_ns + c * MS for c in chunks_ms], chunk_tokens=list(tokens),
        output_tokens=sum(tokens) if output_tokens is None else output_tokens,
        text=text, status="ok", warmup=warmup, **kw,
    )


# A 6-token answer in 5 chunks (the third chunk carries 2 tokens):
# first chunk at 400 ms, last at 650 ms.
STREAM = dict(chunks_ms=(400, 450, 500, 600, 650), tokens=(1, 1, 2, 1, 1))


# ------------------------------------------------------------------------------------ one call


def test_ttft_and_e2e():
    rec = call(**STREAM)
    assert m.ttft_s(rec) == pytest.approx(0.400)
    assert m.e2e_s(rec) == pytest.approx(0.650)


def test_tpot_excludes_first_token():
    rec = call(**STREAM)
    # (E2E - TTFT) / (n - 1) = (0.650 - 0.400) / 5
    assert m.tpot_s(rec) == pytest.approx(0.050)


def test_tpot_guidellm_variant_includes_first_token():
    rec = call(**STREAM)
    # E2E / n = 0.650 / 6
    assert m.tpot_incl_first_s(rec) == pytest.approx(0.650 / 6)


def test_tpot_undefined_for_one_token():
    rec = call(chunks_ms=(300,))
    assert rec.output_tokens == 1
    assert m.ttft_s(rec) == pytest.approx(0.300)
    assert m.e2e_s(rec) == pytest.approx(0.300)
    assert m.tpot_s(rec) is None
    assert m.decode_tps(rec) is None
    assert m.tpot_incl_first_s(rec) == pytest.approx(0.300)


def test_no_tokens_means_everything_undefined():
    rec = call(chunks_ms=(), output_tokens=0)
    for f in (m.ttft_s, m.e2e_s, m.tpot_s, m.tpot_incl_first_s, m.decode_tps, m.overall_tps):
        assert f(rec) is None, f.__name__
    assert m.itl_s(rec) == []


def test_one_chunk_holding_two_tokens_has_a_tpot():
    # two tokens arriving together (e.g. one Korean syllable split over two byte-level tokens)
    rec = call(chunks_ms=(200,), tokens=(2,))
    assert rec.output_tokens == 2
    assert m.tpot_s(rec) == pytest.approx(0.0)
    assert m.decode_tps(rec) is None  # E2E == TTFT: no decode interval to divide by
    assert m.itl_s(rec) == []


def test_itl_is_per_chunk():
    rec = call(**STREAM)
    # 5 chunks -> 4 gaps, although 6 tokens
    assert m.itl_s(rec) == pytest.approx([0.050, 0.050, 0.100, 0.050])


def test_decode_and_overall_tokens_per_second():
    rec = call(**STREAM)
    assert m.decode_tps(rec) == pytest.approx(6 / 0.250)  # 24 tok/s
    assert m.overall_tps(rec) == pytest.approx(6 / 0.650)


def test_output_tokens_from_backend_win_over_chunk_count():
    # the backend's exact count (e.g. the server's eval_count) is what the formulas use
    rec = call(chunks_ms=(100, 200, 300), tokens=(1, 1, 1), output_tokens=9)
    assert m.tpot_s(rec) == pytest.approx(0.200 / 8)
    assert m.decode_tps(rec) == pytest.approx(9 / 0.200)


def test_call_metrics_flat_row():
    rec = call(**STREAM, prompt_tokens=37, token_count_source="exact")
    row = m.call_metrics(rec)
    assert row.ttft_s == pytest.approx(0.400)
    assert row.e2e_s == pytest.approx(0.650)
    assert row.tpot_s == pytest.approx(0.050)
    assert row.itl_mean_s == pytest.approx(0.0625)
    assert row.itl_max_s == pytest.approx(0.100)
    assert row.output_tokens == 6
    assert row.prompt_tokens == 37
    assert row.tokens_per_s == pytest.approx(24.0)
    assert row.token_count_source == "exact"
    assert row.slo == m.SLOVerdict(ttft=True, tpot=True, e2e=True)


# ------------------------------------------------------------------------------------ SLO verdicts


def test_slo_default_targets():
    assert m.DEFAULT_SLO == m.SLO(ttft_s=3.0, tpot_s=0.100, e2e_s=120.0)
    assert m.slo_verdict(2.9, 0.099, 119.0) == m.SLOVerdict(ttft=True, tpot=True, e2e=True)
    assert m.slo_verdict(3.5, 0.150, 130.0) == m.SLOVerdict(ttft=False, tpot=False, e2e=False)
    assert m.slo_verdict(1.0, 0.150, 10.0) == m.SLOVerdict(ttft=True, tpot=False, e2e=True)


def test_slo_undefined_is_none():
    assert m.slo_verdict(None, None, None) == m.SLOVerdict(ttft=None, tpot=None, e2e=None)
    one_token = call(chunks_ms=(300,))
    assert m.call_metrics(one_token).slo == m.SLOVerdict(ttft=True, tpot=None, e2e=True)


def test_slo_custom():
    strict = m.SLO(ttft_s=0.300, tpot_s=0.040, e2e_s=0.600)
    rec = call(**STREAM)  # ttft 0.400, tpot 0.050, e2e 0.650
    assert m.call_metrics(rec, strict).slo == m.SLOVerdict(ttft=False, tpot=False, e2e=False)
    loose = m.SLO(ttft_s=0.500, tpot_s=0.060, e2e_s=0.700)
    assert m.call_metrics(rec, loose).slo == m.SLOVerdict(ttft=True, tpot=True, e2e=True)
    assert m.slo_dict(strict) == {"ttft_s": 0.300, "tpot_s": 0.040, "e2e_s": 0.600}


# ------------------------------------------------------------------------------------ runs


def two_stage_run() -> RunRecord:
    """route (invisible) 10..310 ms, 40 ms of kit time, then answer (visible) 350..1200 ms."""
    route = call(start_ns=T0 + 10 * MS, chunks_ms=(190, 290), end_ms=300, text='{"route": "chat"}',
                 call_id="route-1")
    answer = call(start_ns=T0 + 350 * MS, chunks_ms=(250, 450, 650, 850), end_ms=860,
                  text="Paris is the capital of France.", call_id="answer-1")
    return RunRecord(
        run_id="run-1", preset="route+answer", query="capital of France?", start_ns=T0,
        end_ns=T0 + 1300 * MS, status="ok",
        stages=[StageRecord(name="route", visible=False, call=route, wait_ns=10 * MS),
                StageRecord(name="answer", visible=True, call=answer, wait_ns=350 * MS)],
    )


def test_user_ttft_ignores_invisible_stages():
    run = two_stage_run()
    # the route stage's first chunk (200 ms) is not shown; the answer's first chunk is at 350 + 250 ms
    assert m.user_ttft_s(run) == pytest.approx(0.600)


def test_user_ttft_none_without_visible_chunks():
    run = two_stage_run()
    run.stages[1].visible = False
    assert m.user_ttft_s(run) is None


def test_run_e2e_is_last_chunk_of_any_stage():
    run = two_stage_run()
    assert m.run_e2e_s(run) == pytest.approx(1.200)  # 350 + 850 ms


def test_kit_overhead_is_the_gap_between_sequential_stages():
    run = two_stage_run()
    # route ends at 10 + 300 = 310 ms, answer starts at 350 ms
    assert m.kit_overhead_s(run) == pytest.approx(0.040)


def test_kit_overhead_of_overlapping_stages_is_zero():
    a = call(start_ns=T0 + 100 * MS, chunks_ms=(100, 300), end_ms=400, call_id="a")  # 100..500 ms
    b = call(start_ns=T0 + 200 * MS, chunks_ms=(100, 600), end_ms=700, call_id="b")  # 200..900 ms
    c = call(start_ns=T0 + 1000 * MS, chunks_ms=(50,), end_ms=60, call_id="c")  # 1000..1060 ms
    cascade = RunRecord(run_id="r", preset="cascade", query="q", start_ns=T0,
                        stages=[StageRecord(name="a", visible=True, call=a),
                                StageRecord(name="b", visible=True, call=b)])
    assert m.kit_overhead_s(cascade) == 0.0
    # c follows both: only the gap after the later end (900 ms) counts
    cascade.stages.append(StageRecord(name="c", visible=True, call=c))
    assert m.kit_overhead_s(cascade) == pytest.approx(0.100)


def test_kit_overhead_falls_back_to_last_chunk_without_end_ns():
    a = call(start_ns=T0, chunks_ms=(100, 200), call_id="a")  # end_ns unknown (0)
    b = call(start_ns=T0 + 230 * MS, chunks_ms=(100,), call_id="b")
    run = RunRecord(run_id="r", preset="p", query="q", start_ns=T0,
                    stages=[StageRecord(name="a", visible=False, call=a),
                            StageRecord(name="b", visible=True, call=b)])
    assert m.kit_overhead_s(run) == pytest.approx(0.030)


def _shown(*segments: tuple[str | None, str], chrome: str = "") -> Transcript:
    t = Transcript("test")
    for stage, text in segments:
        t.content(stage, text)
    t.chrome(chrome)
    return t


def test_sink_compliance_everything_from_the_model():
    run = two_stage_run()
    report = sink_compliance(run, _shown(("answer", "Paris is"), ("answer", " the capital"), chrome="[answer] 0.3 s"))
    # whitespace is layout; chrome is counted apart, never as content
    assert report.content_chars == 17 and report.model_chars == 17 and report.compliance == 1.0
    assert report.chrome_chars == len("[answer]0.3s")


def test_sink_compliance_canned_sentence_before_the_answer():
    run = two_stage_run()
    report = sink_compliance(run, _shown(("answer", "Analysis is starting... "), ("answer", "Paris is the capital of France.")))
    # 21 non-space characters written by the sink, 26 by the model: aligned in order, the sink's cannot match
    assert (report.content_chars, report.model_chars, report.kit_chars) == (47, 26, 21)
    assert report.compliance == pytest.approx(26 / 47)


def test_sink_compliance_text_the_call_never_wrote_or_a_stage_that_never_ran():
    run = two_stage_run()
    report = sink_compliance(run, _shown(("answer", "Paris is the capital of France."), ("answer", " Berlin!")))
    assert report.compliance == pytest.approx(26 / 33)
    assert sink_compliance(run, _shown(("status", "Paris"))).compliance == 0.0  # no stage "status" ran
    # the route stage's text shown as the answer's: by position, not "a substring somewhere"
    assert sink_compliance(run, _shown(("answer", "chat"))).compliance == 0.0


def test_sink_compliance_none_when_nothing_shown_and_layout_is_whitespace_only():
    run = two_stage_run()
    assert sink_compliance(run, Transcript("empty")).compliance is None
    t = Transcript("t")
    t.layout("\n\n")
    with pytest.raises(ValueError, match="whitespace only"):
        t.layout("-- analysis --")


def test_prompt_echo_counts_as_kit_text():
    run = two_stage_run()
    kit = "You are one stage of a pipeline that answers a user's query. Follow your task."
    run.kit_prompts = [kit]
    echo = "I am one stage of a pipeline that answers a user's query, so:"
    run.stages[1].call.text = echo + " Paris."
    # "one stage of a pipeline that answers a user's query" (10 words >= ECHO_WORDS) is the kit's
    echoed = len("".join("one stage of a pipeline that answers a user's query".split()))
    assert m.run_metrics(run).prompt_echo_chars == prompt_echo_chars(run) == echoed
    total = len("".join((echo + " Paris.").split()))
    assert m.run_metrics(run).compliance == pytest.approx((total - echoed) / total)
    report = sink_compliance(run, _shown(("answer", run.stages[1].call.text)))
    assert report.prompt_echo_chars == echoed and report.compliance == pytest.approx((total - echoed) / total)
    run.stages[1].call.text = "A pipeline answers a query in stages."  # shares words, not a run of 8
    assert prompt_echo_chars(run) == 0


def test_decision_compliance():
    run = two_stage_run()
    assert decision_compliance(run) is None  # no decisions
    run.decisions = {"strategy": DecisionRecord(value={"strategy": "simple"}, used={"strategy": "simple"}),
                     "quality": DecisionRecord(status="undecided", source="kit default"),
                     "rewritten_query": DecisionRecord(value="q", used="q", method="free text", structured=False)}
    assert decision_compliance(run) == 0.5  # the rewrite is free text, not a decision among options
    assert m.run_metrics(run).decision_compliance == 0.5


def test_run_metrics():
    run = two_stage_run()
    run.quality = {"score": 0.85}
    row = m.run_metrics(run)
    assert row.user_ttft_s == pytest.approx(0.600)
    assert row.e2e_s == pytest.approx(1.200)
    # the answer (last visible stage): (850 - 250) ms / (4 - 1)
    assert row.answer_tpot_s == pytest.approx(0.200)
    assert row.model_calls == 2
    assert row.output_tokens == 6
    assert row.kit_overhead_s == pytest.approx(0.040)
    assert row.compliance == 1.0 and row.prompt_echo_chars == 0  # no kit prompts: nothing to echo
    assert row.quality == 0.85
    assert row.slo == m.SLOVerdict(ttft=True, tpot=False, e2e=True)


def test_metrics_are_frozen_typed_and_flatten_for_frames():
    rec = call(**STREAM, prompt_tokens=37, token_count_source="exact")
    cm = m.call_metrics(rec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cm.ttft_s = 0.0  # type: ignore[misc]
    flat = cm.as_dict()
    assert flat["slo"] == {"ttft": True, "tpot": True, "e2e": True} and flat["ttft_s"] == cm.ttft_s
    assert list(flat) == [f.name for f in dataclasses.fields(m.CallMetrics)]
    json.dumps(flat)  # JSON-ready: what the server sends in stage_end
    with pytest.raises(TypeError):  # typed: attributes, not string keys
        cm["tpot_s"]
    rm = m.run_metrics(two_stage_run())
    assert rm.as_dict()["slo"] == rm.slo.as_dict() and set(rm.as_dict()) == {
        f.name for f in dataclasses.fields(m.RunMetrics)}
    assert m.SLOVerdict(ttft=True, tpot=False).missed and not m.SLOVerdict(ttft=True, tpot=None, e2e=True).missed


# ------------------------------------------------------------------------------------ frames


CALL_COLUMNS = [
    "call_id", "backend", "model", "status", "warmup", "param_max_tokens", "param_temperature",
    "ttft_s", "e2e_s", "tpot_s", "tpot_incl_first_s", "itl_mean_s", "itl_max_s", "output_tokens",
    "prompt_tokens", "tokens_per_s", "overall_tokens_per_s", "token_count_source", "load_s", "cold_load",
    "slo_ttft", "slo_tpot", "slo_e2e",
]


def test_calls_frame_columns():
    rec = call(**STREAM, params={"max_tokens": 64, "temperature": 0.0, "stop": ["\n"]})
    df = m.calls_frame([rec])
    assert list(df.columns) == CALL_COLUMNS  # list/dict parameters (stop) are left out
    assert df.loc[0, "ttft_s"] == pytest.approx(0.400)
    assert df.loc[0, "param_max_tokens"] == 64


def test_runs_frame_columns():
    run = two_stage_run()
    run.labels = {"model": "smollm2-135m", "repeat": 3}
    df = m.runs_frame([run])
    assert list(df.columns) == [
        "run_id", "preset", "query", "status", "warmup", "model", "repeat",
        "user_ttft_s", "e2e_s", "answer_tpot_s", "model_calls", "output_tokens", "kit_overhead_s",
        "compliance", "prompt_echo_chars", "decision_compliance", "quality", "slo_ttft", "slo_tpot", "slo_e2e",
    ]
    assert df.loc[0, "user_ttft_s"] == pytest.approx(0.600)
    assert df.loc[0, "repeat"] == 3


def test_percentiles_exact_and_warmup_excluded():
    # TTFTs 100..500 ms; a slow warm-up call (9 s) must not count
    recs = [call(chunks_ms=(t, t + 100), call_id=f"c{t}") for t in (300, 100, 500, 200, 400)]
    recs.append(call(chunks_ms=(9000, 9100), call_id="warm", warmup=True))
    p = m.percentiles(m.calls_frame(recs))
    assert len(p) == 1
    row = p.iloc[0]
    assert row["n"] == 5
    # linear interpolation over [0.1, 0.2, 0.3, 0.4, 0.5]: position q * (n - 1)
    assert row["ttft_s_p50"] == pytest.approx(0.300)
    assert row["ttft_s_p90"] == pytest.approx(0.460)
    assert row["ttft_s_p95"] == pytest.approx(0.480)
    assert row["ttft_s_p99"] == pytest.approx(0.496)
    assert row["e2e_s_p50"] == pytest.approx(0.400)
    assert {"tpot_s_p50", "tokens_per_s_p99"} <= set(p.columns)


def test_percentiles_by_group():
    recs = [call(chunks_ms=(t, t + 100), call_id=f"a{t}", params={"max_tokens": 8}) for t in (100, 300)]
    recs += [call(chunks_ms=(t, t + 100), call_id=f"b{t}", params={"max_tokens": 64}) for t in (1000, 2000, 3000)]
    p = m.percentiles(m.calls_frame(recs), by=["param_max_tokens"], columns=["ttft_s"]).set_index("param_max_tokens")
    assert p.loc[8, "n"] == 2
    assert p.loc[8, "ttft_s_p50"] == pytest.approx(0.200)
    assert p.loc[64, "n"] == 3
    assert p.loc[64, "ttft_s_p50"] == pytest.approx(2.000)
    assert p.loc[64, "ttft_s_p90"] == pytest.approx(2.800)


# ------------------------------------------------------------------------------------ run log


def test_runlog_round_trip(tmp_path):
    rec = call(**STREAM, text="Paris", prompt_tokens=12, params={"max_tokens": 8, "stop": ["\n"]},
               server={"prompt_eval_tokens": 12}, finish_reason="stop")
    run = two_stage_run()
    run.decisions = {"strategy": DecisionRecord(value={"strategy": "simple"}, used={"strategy": "simple"},
                                                method="next-token choice", probabilities={"simple": 0.7, "analytical": 0.3},
                                                plan={"runs": ["answer"]})}
    run.labels = {"model": "smollm2-135m"}
    log = RunLog(tmp_path / "sub" / "log.jsonl")
    log.append(rec)
    log.append(run)
    back = read_log(log.path)
    assert back == [rec, run]
    assert isinstance(back[1].stages[0], StageRecord)
    assert isinstance(back[1].decisions["strategy"], DecisionRecord)  # typed again when read back
    assert list(log) == [rec, run]


def test_runlog_append_is_on_disk_at_once(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    log.append(call(call_id="first"))
    # the log object is alive and never closed: the line is already in the file
    lines = (tmp_path / "log.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["call_id"] == "first"
    log.append(call(call_id="second"))
    assert [r.call_id for r in read_log(tmp_path / "log.jsonl")] == ["first", "second"]


def test_runlog_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    write_log(path, [call(call_id="a"), call(call_id="b")])
    # simulate a crash mid-write: a partial JSON line without its newline, written by hand
    full = json.dumps({"kind": "call", **call(call_id="torn").to_dict()})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(full[: len(full) // 2])
    assert [r.call_id for r in read_log(path)] == ["a", "b"]
    # resuming after the crash: the next record is not glued onto the torn line
    RunLog(path).append(call(call_id="c"))
    assert [r.call_id for r in read_log(path)] == ["a", "b", "c"]


def test_runlog_corrupt_line_is_reported_not_skipped(tmp_path):
    from llmfirst_kit.sinks.jsonl import CorruptLog

    path = tmp_path / "log.jsonl"
    write_log(path, [call(call_id="a")])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("{this is not json}\n")  # corruption in the middle of the file
    RunLog(path).append(call(call_id="b"))
    problems: list[str] = []
    assert [r.call_id for r in read_log(path, problems=problems)] == ["a", "b"]
    assert len(problems) == 1 and f"{path}:2:" in problems[0] and "fix or delete it" in problems[0]
    with pytest.raises(CorruptLog, match=":2:"):
        read_log(path, strict=True)
    with pytest.warns(UserWarning, match="1 corrupt line"):
        read_log(path)
    clean: list[str] = []
    read_log(_clean(tmp_path), problems=clean)
    assert clean == []


def _clean(tmp_path):
    p = tmp_path / "clean.jsonl"
    write_log(p, [call(call_id="x")])
    return p


def test_load_level_metrics_by_hand():
    """Four finished calls and one error over a 4 s level; percentiles interpolate linearly (numpy's)."""
    calls = [call(chunks_ms=(t, e), tokens=(1, 1), output_tokens=n, call_id=f"c{i}")
             for i, (t, e, n) in enumerate([(100, 1000, 10), (300, 2000, 20), (200, 1500, 1), (500, 3000, 5)])]
    failed = CallRecord(call_id="e", backend="embedded", model="test", status="error", error="boom")
    lv = m.load_level_metrics([*calls, failed], wall_s=4.0)
    assert (lv["requests"], lv["ok"], lv["errors"], lv["cancelled"], lv["error_rate"]) == (5, 4, 1, 0, 0.2)
    assert lv["ttft_s_p50"] == pytest.approx(0.25) and lv["ttft_s_p95"] == pytest.approx(0.47)  # 0.3 + 0.85 x 0.2
    assert lv["e2e_s_p50"] == pytest.approx(1.75) and lv["e2e_s_p99"] == pytest.approx(2.97)
    # TPOT of the one-token answer is undefined: p50 of (0.9/9, 1.7/19, 2.5/4) is the middle one
    assert lv["tpot_s_p50"] == pytest.approx(0.1)
    assert lv["output_tokens"] == 36 and lv["output_tokens_per_s"] == pytest.approx(9.0)
    assert lv["requests_per_s"] == pytest.approx(1.0)
    assert lv["slo_pass_rate"] == pytest.approx(0.5)  # TPOT 0.1 and 0.625 s miss the 100 ms target
    json.dumps(lv)  # plain numbers: the --json output
    empty = m.load_level_metrics([failed], wall_s=1.0)
    assert empty["ttft_s_p50"] is None and empty["slo_pass_rate"] is None and empty["output_tokens"] == 0


def test_mbu_never_above_one_flags_the_bandwidth_instead():
    assert m.mbu(1e9, 10, 20) == pytest.approx(0.5)
    assert m.mbu(1e9, 10, 20, explain=True) == (pytest.approx(0.5), None)
    assert m.mbu(1e9, 10, 10) == pytest.approx(1.0)  # exactly the bandwidth: allowed
    # 1 GB read 30 times a second is 30 GB/s, more than the 28.6 GB/s "measured": the figure is wrong
    assert m.mbu(1e9, 30, 28.6) is None
    value, flag = m.mbu(1e9, 30, 28.6, explain=True)
    assert value is None and "bandwidth figure too low" in flag and "28.6 GB/s" in flag and "1.05" in flag
    assert m.mbu(None, 30, 28.6, explain=True) == (None, None)


def test_runlog_a_deep_or_garbage_line_is_reported_and_the_rest_read(tmp_path):
    """One line nested too deep for the parser does not make the log unreadable; a garbage last line that is not
    a record's torn beginning is reported, not skipped as torn."""
    path = tmp_path / "log.jsonl"
    write_log(path, [call(call_id="a")])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("[" * 100_000 + "\n")
    RunLog(path).append(call(call_id="b"))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("hello, not a record")
    problems: list[str] = []
    assert [r.call_id for r in read_log(path, problems=problems)] == ["a", "b"]
    assert len(problems) == 2 and f"{path}:2:" in problems[0] and "RecursionError" in problems[0]
    assert f"{path}:4:" in problems[1]
