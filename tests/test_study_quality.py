"""A study's quality phase end to end on small real models: the baseline cell, the judge choice (no model
only judges itself), the judge gate, pairwise judging, resume, the summary's quality columns and the report.

Small and fast: SmolLM2-135M and Qwen2.5-Coder-0.5B answer two queries (English, Korean) in 48 tokens;
the 0.5B model is the baseline system and the judge of SmolLM2's answers. The judge's ability is not what
is tested here (test_quality_judge.py does that with the 1.5B model): the rules are -- a verdict only with a
passed gate, the queries the baseline answered completely, the truncation rate reported.
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from llmfirst_kit import study
from llmfirst_kit.data import QUERIES
from llmfirst_kit.study import quality

THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))
SMALL, BASE = "smollm2-135m", "qwen2.5-coder-0.5b"
SPEC = {
    "name": "quality", "backend": "embedded", "models": [SMALL, BASE], "quantizations": ["shipped"],
    "presets": ["direct"], "queries_file": str(QUERIES),
    "query_ids": ["en-s01", "ko-s01"], "repeats": 1, "warmup_runs": 0, "max_tokens": 48, "judge_model": "",
    "n_threads": THREADS, "perplexity_text": "",
    # the 0.5B direct cell of the grid is the baseline (same settings); SmolLM2 is answered by the quality judge
    # itself, so the second judge (the 0.5B) judges it
    "baseline_model": BASE, "baseline_max_tokens": 48, "quality_judge": SMALL, "second_judge": BASE,
    "gate_answers": 2, "gate_kinds": ["empty", "other_query"], "bootstrap_samples": 200,
}
SMALL_CELL, BASE_CELL = f"{SMALL}@shipped--direct", f"{BASE}@shipped--direct"


@pytest.fixture(scope="module")
def quality_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "study"
    result = study.run_study(SPEC, output_dir=out, progress=False, report=True, echo=lambda _: None)
    return result, out


def test_the_baseline_is_the_grid_cell_with_its_settings():
    spec = study.load_study(SPEC)
    cells = study.expand_grid(spec)
    assert [c.id for c in cells] == [SMALL_CELL, BASE_CELL]  # no extra cell: the grid's 0.5B cell is the baseline
    assert study.baseline_cell(spec, cells).id == BASE_CELL
    other = study.load_study({**SPEC, "baseline_max_tokens": 96})  # other settings: a cell of its own, first
    cells = study.expand_grid(other)
    assert cells[0].id == f"baseline--{BASE}@shipped--direct" and cells[0].role == "baseline"
    assert cells[0].parameters["max_tokens"] == 96 and cells[0].parameters["perplexity_text"] == ""
    assert len(study.expand_grid(study.load_study({**SPEC, "baseline_model": ""}))) == 2


def test_no_model_only_judges_itself():
    spec = {"parameters": {"backend": "embedded"}, "quality_judge": SMALL, "second_judge": ""}
    mine = quality.judge_for({"model": SMALL, "quantization": "shipped", "backend": "embedded"}, spec)
    assert mine.model is None and "never only judges itself" in mine.note
    other = quality.judge_for({"model": BASE, "quantization": "shipped", "backend": "embedded"}, spec)
    assert other.model == SMALL and other.note is None
    second = quality.judge_for({"model": SMALL, "quantization": "shipped", "backend": "embedded"},
                               {**spec, "second_judge": BASE})
    assert second.model == BASE and "second_judge" in second.note


def test_the_quality_phase_judges_against_the_baseline(quality_study):
    result, out = quality_study
    assert result.ok, result.describe()
    lines = quality.read_judgments(out)
    gate = [ln for ln in lines if ln["type"] == "gate"]
    assert {ln["judge"] for ln in gate} == {BASE}  # only the judge that is used is gated
    assert sorted((ln["kind"], ln["query_id"]) for ln in gate) == [
        ("empty", "en-s01"), ("empty", "ko-s01"), ("other_query", "en-s01"), ("other_query", "ko-s01")]
    assert all(len(ln["judgments"]) == 2 and ln["judgments"][0]["shown_first"] == "real" for ln in gate)
    pairs = [ln for ln in lines if ln["type"] == "pair"]
    assert {ln["cell"] for ln in pairs} <= {SMALL_CELL} and all(ln["judge"] == BASE for ln in pairs)
    # the judged queries: those the baseline answered completely; the candidate's answer cut off or not
    res = study.load_results(out)
    base, small = quality.cell_answers(res.runs, BASE_CELL), quality.cell_answers(res.runs, SMALL_CELL)
    assert {ln["query_id"] for ln in pairs} == {q for q, b in base.items()
                                                if quality.is_complete(b) and quality.answered(small[q])}
    # resume: nothing is judged twice
    again = quality.judge_study(out, echo=lambda _: None)
    assert again["gate_pairs"] == again["pairs"] == again["identical"] == 0
    assert len(quality.read_judgments(out)) == len(lines)


def test_a_gate_pair_planted_otherwise_since_is_judged_again_and_counted_once(quality_study, tmp_path):
    """A gate grown from more answers plants some pairs anew (``other_query`` picks from a larger pool): a stored
    judgment of another planted text is not reused, and the gate counts each pair once, as last judged."""
    import shutil

    _, out = quality_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    log = copy / quality.JUDGING / quality.JUDGMENTS
    lines = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    stale = next(ln for ln in lines if ln["type"] == "gate" and ln["kind"] == "other_query")
    stale["pair"]["planted"] = "An answer this gate no longer plants."
    log.write_text("".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines), encoding="utf-8")
    again = quality.judge_study(copy, echo=lambda _: None)
    assert again["gate_pairs"] == 1 and again["pairs"] == 0
    res = study.load_results(copy)
    base = quality.cell_answers(res.runs, BASE_CELL)
    gate = quality.gate_results(copy, current=quality.gate_runs(res.spec, base),
                                version=quality.judge_version(res.spec))[BASE]
    assert gate.n_pairs == sum(ln["type"] == "gate" for ln in lines)  # 4 pairs, not 5
    relogged = [ln for ln in quality.read_judgments(copy) if ln["type"] == "gate"][-1]
    assert relogged["query_id"] == stale["query_id"] and relogged["pair"]["planted"] != stale["pair"]["planted"]


def test_no_verdict_until_every_judged_query_is_judged(quality_study, tmp_path):
    """A study stopped in its judging: a verdict over the queries judged first would be over a subset; the note
    says so, and resuming judges the rest."""
    import shutil

    _, out = quality_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    log = copy / quality.JUDGING / quality.JUDGMENTS
    lines = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()]
    pairs = [ln for ln in lines if ln["type"] == "pair"]
    assert pairs, "the fixture's baseline answered no query completely: nothing to test"
    log.write_text("".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines if ln is not pairs[0]),
                   encoding="utf-8")

    def row():
        res = study.load_results(copy)
        res.spec["gate_threshold"] = 0.0  # whatever the small judge's gate: this test is about the judged set
        return study.summary_table(res).set_index("cell").loc[SMALL_CELL]

    cut = row()
    assert pd.isna(cut["quality_retention"]) and cut["quality_note"] == (
        f"judging unfinished: {len(pairs) - 1} of {len(pairs)} queries judged; run the study again to judge the rest")
    again = quality.judge_study(copy, echo=lambda _: None)
    assert again["pairs"] + again["identical"] == 1
    whole = row()
    assert not pd.isna(whole["quality_retention"]) and whole["retention_queries"] == len(pairs)


def test_summary_shows_a_quality_verdict_only_with_a_passed_gate(quality_study):
    _, out = quality_study
    rows = pd.read_csv(out / study.SUMMARY_CSV).set_index("cell")
    base, small = rows.loc[BASE_CELL], rows.loc[SMALL_CELL]
    assert base["role"] == "baseline" and base["quality_note"] == "the baseline" and pd.isna(base["meets_quality"])
    for col in ("truncation_rate", "key_fact_recall", "language_match", "gate_accuracy", "order_disagreement",
                "retention_ci_low", "retention_ci_high", "n_complete", "quality_judge"):
        assert col in rows.columns
    assert 0 <= base["language_match"] <= 1 and 0 <= small["language_match"] <= 1
    assert small["quality_judge"] == BASE and 0 <= small["truncation_rate"] <= 1
    assert small["n_complete"] + round(small["truncation_rate"] * small["n_runs"]) <= small["n_runs"]
    if bool(small["gate_passed"]):
        assert not pd.isna(small["quality_retention"]) or "no query" in small["quality_note"]
    else:  # the gate failed: no verdict, and the report says why
        assert pd.isna(small["quality_retention"]) and pd.isna(small["meets_quality"])
        assert "judge cannot judge" in small["quality_note"] and small["gate_accuracy"] < 0.9
    # the same judgments, a gate threshold the judge meets or not: the verdict follows the gate
    res = study.load_results(out)
    res.spec["gate_threshold"] = 1.0
    strict = study.summary_table(res).set_index("cell").loc[SMALL_CELL]
    assert bool(strict["gate_passed"]) == (small["gate_accuracy"] == 1.0)
    if not strict["gate_passed"]:  # the note names what to change
        assert pd.isna(strict["quality_retention"]) and "use a stronger quality_judge" in strict["quality_note"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "The judge gate" in html and "Quality against the baseline" in html and BASE in html


def test_the_key_fact_difference_is_paired_over_the_judged_queries(quality_study):
    """Judge-free, beside the verdict: the configuration's recall minus the baseline's, query by query."""
    from llmfirst_kit.quality.facts import key_fact_recall

    _, out = quality_study
    res = study.load_results(out)
    rows = study.summary_table(res).set_index("cell")
    base, small = quality.cell_answers(res.runs, BASE_CELL), quality.cell_answers(res.runs, SMALL_CELL)
    queries = quality.study_queries(res.spec)
    diffs = [key_fact_recall(quality.answer_text(small[q]), queries[q].facts)
             - key_fact_recall(quality.answer_text(base[q]), queries[q].facts)
             for q in queries if quality.is_complete(base[q]) and quality.answered(small[q])]
    row = rows.loc[SMALL_CELL]
    assert row["key_fact_diff_queries"] == len(diffs) == row["retention_queries"]
    if diffs:
        assert row["key_fact_diff"] == pytest.approx(sum(diffs) / len(diffs))
        assert row["key_fact_diff_ci_low"] <= row["key_fact_diff"] <= row["key_fact_diff_ci_high"]
    assert pd.isna(rows.loc[BASE_CELL, "key_fact_diff"]) and rows.loc[BASE_CELL, "key_fact_diff_queries"] == 0
    # against itself a configuration differs by nothing
    same = quality.key_fact_difference(base, base, queries, n_boot=100, seed=0)
    assert same["key_fact_diff"] in (0.0, None) and same["key_fact_diff_queries"] == sum(
        bool(quality.is_complete(b)) for b in base.values())


def test_a_baseline_mostly_cut_off_gives_no_configuration_a_verdict(quality_study):
    """The same study read as if the baseline's answers had hit the token limit: no retention, and the note
    names the setting to raise."""
    _, out = quality_study
    res = study.load_results(out)
    assert study.summary_table(res).set_index("cell").loc[SMALL_CELL, "quality_note"] != (
        "the baseline's answers mostly cut off: 0 of 2 complete; raise max_tokens")
    for run in res.runs:
        if run.labels.get("cell") == BASE_CELL:
            run.answer_call().finish_reason = "length"
    small = study.summary_table(res).set_index("cell").loc[SMALL_CELL]
    assert pd.isna(small["quality_retention"]) and pd.isna(small["meets_quality"])
    assert small["quality_note"] == "the baseline's answers mostly cut off: 0 of 2 complete; raise max_tokens"


def test_e2e_percentiles_use_complete_answers_only(quality_study):
    _, out = quality_study
    res = study.load_results(out)
    runs = study.runs_table(res)
    mine = runs[(runs["cell"] == SMALL_CELL) & ~runs["warmup"].astype(bool)]
    complete = mine[mine["complete"]]
    row = study.summary_table(res).set_index("cell").loc[SMALL_CELL]
    if complete.empty:
        assert pd.isna(row["e2e_s_p50"])
    else:
        assert row["e2e_s_p50"] == pytest.approx(complete["e2e_s"].median())
    status = json.loads((out / study.STUDY_FILE).read_text())
    assert status["baseline_cell"] == BASE_CELL


def test_summary_rates_report_the_prompt_echo_rate_and_decision_compliance():
    import pandas as pd

    from llmfirst_kit.study.summary import _run_rates

    ok = pd.DataFrame({"slo_ttft": [True] * 4, "slo_e2e": [True] * 4, "slo_tpot": [True] * 4,
                       "strategy": ["simple", None, "simple", "analytical"], "category": ["simple"] * 4,
                       "compliance": [1.0, 0.5, 1.0, 1.0], "prompt_echo_chars": [0, 40, 0, 0],
                       "decision_compliance": [1.0, 0.0, 1.0, None]})
    rates = _run_rates(ok, "staged")
    assert rates["prompt_echo_rate"] == 0.25 and rates["compliance_mean"] == 0.875
    assert rates["decision_compliance_mean"] == pytest.approx(2 / 3) and rates["strategy_decided_rate"] == 0.75


# ------------------------------------------------------------------------ head to head, revision
VERSUS_SPEC = {**SPEC, "name": "versus", "models": [BASE], "presets": ["direct", "direct+revise"],
               "comparisons": ["direct+revise vs direct"], "quality_judge": SMALL, "second_judge": ""}


@pytest.fixture(scope="module")
def versus_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("versus") / "study"
    result = study.run_study(VERSUS_SPEC, output_dir=out, progress=False, report=True, echo=lambda _: None)
    return result, out


def test_comparisons_are_judged_head_to_head_and_reported(versus_study):
    from llmfirst_kit.study.comparisons import comparison_rows

    result, out = versus_study
    assert result.ok, result.describe()
    res = study.load_results(out)
    runs = [r for r in res.runs if r.preset == "direct+revise" and not r.warmup]
    assert runs and all("review" in [s.name for s in r.stages] for r in runs)
    lines = quality.read_judgments(out)
    versus = [ln for ln in lines if ln["type"] == "versus"]
    assert {ln["reference_cell"] for ln in versus} <= {BASE_CELL} and all(ln["judge"] == SMALL for ln in versus)
    revisions = [ln for ln in lines if ln["type"] == "revision"]
    assert len(revisions) <= sum(quality.revised(r) and quality.is_complete(r) for r in runs)
    rows = {row["kind"]: row for row in comparison_rows(res)}
    head = rows["versus"]
    assert head["candidate"] == "direct+revise" and head["reference"] == "direct" and head["judge"] == SMALL
    assert head["e2e_ratio"] is None or head["e2e_ratio"] > 0
    if head["win_or_tie"] is None:  # no verdict: the report says why
        assert head["note"] and head["holds"] is None
    else:
        assert head["holds"] == (head["ci_low"] >= 0.5)
    assert 0 <= rows["revision"]["revise_rate"] <= 1 and rows["revision"]["added_s"] > 0
    assert (out / "comparisons.csv").is_file() and "Head to head" in (out / "report.html").read_text("utf-8")
    # the run's answer is the revision where one ran, else the answer; the draft stays readable
    for r in runs:
        assert quality.answer_call(r).text == [s for s in r.stages if s.name in ("revision", "answer")][-1].call.text
        assert quality.draft_call(r) is [s for s in r.stages if s.name == "answer"][0].call


def test_a_comparison_holds_only_when_its_interval_clears_one_half():
    from types import SimpleNamespace

    from llmfirst_kit.study.comparisons import _verdict

    gate = SimpleNamespace(passed=True, accuracy=1.0)

    def lines(winners):
        return [{"query_id": f"q{i}", "judgments": [{"winner": w, "verdict": "A"}, {"winner": w, "verdict": "B"}]}
                for i, w in enumerate(winners)]

    better = _verdict(lines(["candidate"] * 9 + ["tie"] * 3), gate, 500, 0)
    assert better["holds"] is True and better["win_or_tie"] == 1.0
    worse = _verdict(lines(["baseline"] * 9 + ["candidate"] * 3), gate, 500, 0)
    assert worse["holds"] is False and worse["win_or_tie"] == 0.25
    failed = _verdict(lines(["candidate"] * 4), SimpleNamespace(passed=False, accuracy=0.6), 500, 0)
    assert failed["holds"] is None and "judge cannot judge" in failed["note"]
    assert "use a stronger quality_judge" in failed["note"]  # and what to change
    unfinished = _verdict(lines(["candidate"] * 4), gate, 500, 0, planned=[f"q{i}" for i in range(5)])
    assert unfinished["holds"] is None and unfinished["note"].startswith("judging unfinished: 4 of 5 queries judged")
    assert _verdict(lines(["candidate"] * 4), gate, 500, 0, planned=[f"q{i}" for i in range(4)])["holds"] is True


def test_a_comparison_must_name_two_of_the_studys_presets():
    from llmfirst_kit.errors import InvalidInput

    with pytest.raises(InvalidInput, match="staged is not one of the study's presets"):
        study.load_study({**VERSUS_SPEC, "comparisons": ["staged vs direct"]})
    with pytest.raises(InvalidInput, match="CANDIDATE vs REFERENCE"):
        study.load_study({**VERSUS_SPEC, "comparisons": ["direct+revise, direct"]})
