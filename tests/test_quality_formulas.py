"""The quality formulas on hand-computed cases (no model): win-or-tie share, the bootstrap interval, order
disagreement, the first-position rate, meets-quality, the gate's accuracy, planted bad answers and key-fact
recall. The real-model tests of the judge and the gate are in test_quality_judge.py."""

from __future__ import annotations

import json

import pytest

from llmfirst_kit.quality import facts
from llmfirst_kit.quality.gate import KINDS, GatePair, RealAnswer, gate_result, pair_correct, planted_pairs, prompt_echoes
from llmfirst_kit.quality.retention import (bootstrap_ci, first_position_rate, hard_outcome, judgment_outcome,
                                            order_disagreement, query_score, retention, win_or_tie_share)
from llmfirst_kit.data import QUERIES
from llmfirst_kit.study import load_queries


def test_query_score_counts_wins_and_ties_over_decided_judgments():
    assert query_score(["candidate", "candidate"]) == 1.0
    assert query_score(["tie", "candidate"]) == 1.0
    assert query_score(["baseline", "tie"]) == 0.5  # the two orders disagree: half
    assert query_score(["baseline", "baseline"]) == 0.0
    assert query_score(["baseline", None]) == 0.0  # an undecided judgment is left out
    assert query_score([None, None]) is None
    with pytest.raises(ValueError, match="unknown outcome"):
        query_score(["A"])


def test_probabilities_weigh_each_order_by_its_confidence():
    # the candidate shown first (A) and judged worse, with its probabilities: mapped to the answers' labels
    j = {"winner": "baseline", "shown_first": "candidate", "verdict": "B", "probabilities": {"A": 0.3, "B": 0.6, "tie": 0.1}}
    assert judgment_outcome(j) == {"candidate": 0.3, "baseline": 0.6, "tie": 0.1}
    assert judgment_outcome({"winner": "tie", "shown_first": "baseline", "probabilities": None}) == "tie"
    assert judgment_outcome({"winner": None, "shown_first": "baseline", "probabilities": {"A": 1.0}}) is None
    assert hard_outcome(judgment_outcome(j)) == "baseline"
    # win-or-tie probability averaged over the orders: (0.3 + 0.1 + 0) / 2; a certain verdict is probability 1
    assert query_score([judgment_outcome(j), "baseline"]) == pytest.approx(0.2)
    assert query_score([{"candidate": 0.7, "baseline": 0.2, "tie": 0.1}, "tie"]) == pytest.approx(0.9)
    # a judge that only prefers position A, 0.9 sure each time: its two orders cancel to 0.5
    a_first = {"candidate": 0.9, "baseline": 0.1, "tie": 0.0}
    assert query_score([a_first, {"candidate": 0.1, "baseline": 0.9, "tie": 0.0}]) == pytest.approx(0.5)
    assert order_disagreement([(a_first, {"candidate": 0.1, "baseline": 0.9, "tie": 0.0})]) == 1.0
    with pytest.raises(ValueError, match="unknown outcome"):
        query_score([{"A": 1.0}])


def test_win_or_tie_share_is_the_mean_query_score():
    # four queries: 1, 0.5, 0, 1 -> 2.5 / 4
    assert win_or_tie_share([1.0, 0.5, 0.0, 1.0]) == pytest.approx(0.625)
    assert win_or_tie_share([None, 1.0]) == 1.0
    assert win_or_tie_share([]) is None


def test_bootstrap_interval_by_hand():
    # constant data: every resample has the same mean
    assert bootstrap_ci([1.0, 1.0, 1.0], seed=3) == (1.0, 1.0)
    assert bootstrap_ci([0.0] * 5) == (0.0, 0.0)
    assert bootstrap_ci([]) == (None, None)
    # [0, 1]: resampled means are 0 (p = 1/4), 0.5 (p = 1/2) and 1 (p = 1/4), so the 30 % and 70 % quantiles
    # (a 40 % interval) are both 0.5 and the 95 % interval is (0, 1)
    assert bootstrap_ci([0.0, 1.0], level=0.4, n_boot=20000, seed=1) == (0.5, 0.5)
    assert bootstrap_ci([0.0, 1.0], level=0.95, n_boot=20000, seed=1) == (0.0, 1.0)
    # seeded: the same seed gives the same interval, another seed may not
    values = [1, 0, 1, 1, 0.5, 1, 0, 1, 1, 0.5]
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    low, high = bootstrap_ci(values, seed=7)
    assert low < sum(values) / len(values) < high
    with pytest.raises(ValueError):
        bootstrap_ci(values, level=1.0)


def test_order_disagreement_and_first_position_rate():
    pairs = [("candidate", "candidate"), ("candidate", "baseline"), ("tie", "baseline"), ("baseline", "baseline"),
             ("candidate", None)]  # the last has one undecided judgment: not counted
    assert order_disagreement(pairs) == pytest.approx(2 / 4)
    assert order_disagreement([]) is None
    assert first_position_rate(["A", "A", "B", "tie", None]) == pytest.approx(2 / 3)
    assert first_position_rate(["tie"]) is None


def test_retention_and_meets_quality():
    worse = retention({"q1": ["baseline", "baseline"], "q2": ["baseline", "baseline"], "q3": ["baseline", "tie"]},
                      positions=["A", "B", "A", "B", "A", "tie"], n_boot=2000, seed=0)
    assert worse.share == pytest.approx(0.5 / 3)
    assert (worse.wins, worse.ties, worse.losses, worse.n_queries) == (0, 1, 5, 3)
    assert worse.ci_high < 1.0 and worse.meets_quality is False
    assert worse.order_disagreement == pytest.approx(1 / 3) and worse.first_position_rate == pytest.approx(0.6)
    as_good = retention({f"q{i}": ["tie", "candidate"] for i in range(10)}, seed=0)
    assert as_good.share == 1.0 and as_good.ci_low == 1.0 and as_good.meets_quality is True
    # a share above the target whose interval's lower bound is below it does not meet quality
    mixed = retention({f"q{i}": (["candidate", "candidate"] if i < 8 else ["baseline", "baseline"]) for i in range(10)},
                      seed=0)
    assert mixed.share == pytest.approx(0.8) and mixed.ci_low < 0.8 and mixed.meets_quality is False
    assert retention({}).meets_quality is None


def _answers() -> list[RealAnswer]:
    return [RealAnswer("en-1", "What is the capital of Australia?", "The capital of Australia is Canberra.", "en", "ko-1"),
            RealAnswer("ko-1", "호주의 수도는 어디인가요?", "호주의 수도는 캔버라입니다.", "ko", "en-1"),
            RealAnswer("en-2", "Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice.", "en", None)]


def test_planted_pairs_are_built_from_real_answers():
    pairs = planted_pairs(_answers(), seed=0)
    by = {(p.query_id, p.kind): p for p in pairs}
    assert {k for (_, k) in by} == set(KINDS) and len(pairs) == 15
    assert by[("en-1", "other_query")].planted == "Jane Austen wrote Pride and Prejudice."  # same language, not the twin
    assert by[("en-1", "other_query")].source == "en-2"
    assert by[("en-1", "wrong_language")].planted == "호주의 수도는 캔버라입니다."  # the twin's answer
    assert by[("ko-1", "wrong_language")].source == "en-1"
    assert by[("en-2", "wrong_language")].source == "ko-1"  # no twin: another query's answer in another language
    text = "The capital of Australia is Canberra."
    assert by[("en-1", "truncated")].planted == text[: len(text) // 5] == "The cap"  # 37 characters -> 7
    assert by[("en-1", "empty")].planted == ""
    echoes = prompt_echoes()
    assert by[("en-1", "prompt_echo")].planted in echoes and "Your task:" in echoes[0]
    assert all(p.real != p.planted for p in pairs)
    assert planted_pairs(_answers(), seed=0) == pairs  # deterministic
    assert [p.kind for p in planted_pairs(_answers()[:1], kinds=("other_query", "empty"))] == ["empty"]


def test_gate_pair_passes_on_the_real_answers_probability_averaged_over_both_orders():
    p = GatePair("q", "query", "wrong_language", "real text", "other text")

    def judged(shown_first, a, b, tie=0.0):
        verdict = max((("A", a), ("B", b), ("tie", tie)), key=lambda x: x[1])[0]
        other = "planted" if shown_first == "real" else "real"
        return {"shown_first": shown_first, "verdict": verdict, "probabilities": {"A": a, "B": b, "tie": tie},
                "winner": {"A": shown_first, "B": other, "tie": "tie"}[verdict]}

    # sure of the real answer first (0.99), wrong but hesitant second (real 0.4): 0.695 > 0.5 passes
    confident = [judged("real", 0.99, 0.01), judged("planted", 0.6, 0.4)]
    # position only: A at 0.9 in both orders -> the real answer 0.9 then 0.1 -> 0.5 fails
    position = [judged("real", 0.9, 0.1), judged("planted", 0.9, 0.1)]
    # sure of the real one first, a tie second -> 0.5 fails
    tied = [judged("real", 1.0, 0.0), judged("planted", 0.0, 0.0, 1.0)]
    g = gate_result([(p, confident), (p, position), (p, tied)], threshold=0.5)
    assert [x["correct"] for x in g.pairs] == [True, False, False]
    assert g.accuracy == pytest.approx(1 / 3) and g.both_orders_accuracy == 0.0 and g.passed is False
    assert pair_correct([{"real": 0.7, "planted": 0.3, "tie": 0.0}, None]) is False  # undecided counts as not real
    assert gate_result([(p, confident)] * 9 + [(p, position)]).passed is True


def test_gate_with_certain_verdicts_needs_the_real_answer_in_both_orders():
    p = GatePair("q", "query", "empty", "real text", "")
    real, planted = {"winner": "real", "verdict": "A"}, {"winner": "planted", "verdict": "A"}
    tie = {"winner": "tie", "verdict": "tie"}
    assert pair_correct(["real", "real"]) and not pair_correct(["real", "tie"]) and not pair_correct([])
    judged = [(p, [real, {"winner": "real", "verdict": "B"}]), (p, [real, planted]), (p, [tie, real]),
              (GatePair("q", "query", "truncated", "real text", "re"), [real, {"winner": "real", "verdict": "B"}])]
    g = gate_result(judged, threshold=0.9)
    assert g.accuracy == pytest.approx(2 / 4) and g.judgment_accuracy == pytest.approx(6 / 8)
    assert g.by_kind["empty"] == pytest.approx(1 / 3) and g.by_kind["truncated"] == 1.0 and g.by_kind["prompt_echo"] is None
    assert g.passed is False and "FAILS" in g.describe()
    assert g.first_position_rate == pytest.approx(5 / 7)
    assert gate_result([(p, [real, {"winner": "real", "verdict": "B"}])] * 9 + [(p, [real, planted])]).passed is True
    assert gate_result([]).passed is False


def test_key_fact_recall():
    canberra = [{"en": "The capital is Canberra.", "ko": "수도는 캔버라이다.", "any": ["Canberra", "캔버라"]}]
    assert facts.key_fact_recall("The capital of Australia is Canberra.", canberra) == 1.0
    assert facts.key_fact_recall("호주의 수도는 캔버라입니다.", canberra) == 1.0
    assert facts.key_fact_recall("The capital of Australia is Sydney.", canberra) == 0.0
    gold = [{"any": ["Au"]}]
    assert facts.key_fact_recall("Its symbol is Au.", gold) == 1.0
    assert facts.key_fact_recall("because it is in Australia", gold) == 0.0  # word boundaries for Latin forms
    assert facts.key_fact_recall("The engine is rendering", [{"any": ["render*"]}, {"any": ["dns"]}]) == 0.5
    assert facts.key_fact_recall("1,024 bytes", [{"any": ["1024"]}]) == 1.0
    assert facts.key_fact_recall("anything", []) is None


def test_queries_have_twins_and_facts_in_both_languages():
    queries = load_queries(QUERIES)
    by_id = {q.id: q for q in queries}
    assert len(queries) >= 60 and {q.lang for q in queries} == {"en", "ko"}
    for q in queries:
        assert q.twin in by_id and by_id[q.twin].twin == q.id and by_id[q.twin].lang != q.lang, q.id
        assert q.facts and all(f["en"] and f["ko"] and f["any"] for f in q.facts), q.id
    raw = [json.loads(line) for line in QUERIES.read_text().splitlines()]
    assert set(raw[0]) == {"id", "lang", "category", "query", "twin", "facts"}


def _answered(text: str, finish_reason: str = "stop"):
    from llmfirst_kit.records import CallRecord, RunRecord, StageRecord

    call = CallRecord(call_id="c", backend="embedded", model="m", status="ok", text=text, finish_reason=finish_reason)
    return RunRecord(run_id=f"run-{abs(hash(text))}", preset="direct", query="q", status="ok",
                     stages=[StageRecord(name="answer", visible=True, call=call)])


def test_gate_answers_are_complete_and_hold_their_key_facts():
    """A wrong baseline answer is not known-good: the gate never plants bad answers against it (a judge that
    prefers "Canberra" in the wrong language to "Seoul" is right). Cut-off answers are left out too."""
    from llmfirst_kit.study.quality import gate_answers

    queries = {q.id: q for q in load_queries(QUERIES, ids=["en-s01", "ko-s07", "en-s02", "ko-s08"])}
    baseline = {"en-s01": _answered("The capital of Australia is Canberra."),
                "ko-s07": _answered("호주의 수도는 서울입니다."),       # wrong: misses 캔버라
                "en-s02": _answered("A kilobyte is 1024 bytes.", "length"),  # cut off at the limit
                "ko-s08": _answered("1킬로바이트는 1024바이트입니다.")}
    chosen = [a.query_id for a in gate_answers(baseline, queries, 8)]
    assert chosen == ["en-s01", "ko-s08"]
    baseline["ko-s07"] = _answered("호주의 수도는 캔버라입니다.")
    assert [a.query_id for a in gate_answers(baseline, queries, 8)] == ["en-s01", "ko-s07", "ko-s08"]
    assert [a.query_id for a in gate_answers(baseline, queries, 2)] == ["en-s01", "ko-s07"]


def test_a_changed_reasons_budget_is_another_judge_version():
    """Judgments are keyed by the judge's prompt version and its reasons budget: a study whose judge_max_tokens
    changed judges again instead of reusing judgments made with another budget."""
    from llmfirst_kit.quality.judge import PROMPT_VERSION, REASONS_TOKENS
    from llmfirst_kit.study.quality import judge_version

    assert judge_version({}) == f"{PROMPT_VERSION}+{REASONS_TOKENS}"
    assert judge_version({"judge_max_tokens": 96}) != judge_version({"judge_max_tokens": 160})
