"""Load as a study dimension, end to end on the real embedded SmolLM2-135M: a study with ``concurrency: [1, 3]``
runs one cell per level through papermill, the cell at 3 really keeps 3 calls in flight (the records overlap and
the engine decoded them in one batch), and the report's capacity at target comes out as a level, as "none" when a
target is missed at every level, and as "not decided" without a quality verdict.
"""

from __future__ import annotations

import os

import pytest

from llmfirst_kit import study
from llmfirst_kit.data import QUERIES
from llmfirst_kit.metrics import arrival_offsets
from llmfirst_kit.study.load import NONE, NOT_DECIDED, capacity_table
from llmfirst_kit.study.store import load_results
from llmfirst_kit.study.summary import summary_table

THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))
SMALL = "smollm2-135m"
SPEC = {
    "name": "load", "backend": "embedded", "models": [SMALL], "presets": ["direct"], "queries_file": str(QUERIES),
    "query_ids": ["en-s01", "ko-s01", "en-a01", "ko-a01"], "repeats": 1, "warmup_runs": 0, "max_tokens": 24,
    "concurrency": [1, 3], "rates": [4.0], "judge_model": "", "n_threads": THREADS, "perplexity_text": "",
    "ttft_slo_s": 60.0, "tpot_slo_s": 2.0, "e2e_slo_s": 120.0,
    # the configuration is the baseline system itself: its quality holds by definition, no judge is loaded
    "baseline_model": SMALL, "baseline_max_tokens": 24, "quality_judge": "",
}
C1, C3, R4 = f"{SMALL}@shipped--direct--c1", f"{SMALL}@shipped--direct--c3", f"{SMALL}@shipped--direct--r4"


@pytest.fixture(scope="module")
def load_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "study"
    result = study.run_study(SPEC, output_dir=out, progress=False, report=True, echo=lambda _: None)
    assert result.ok, result.describe()
    return out


def _in_flight(records) -> int:
    """The most runs whose [start, end] intervals overlap at one instant."""
    edges = sorted([(r.start_ns, 1) for r in records] + [(r.end_ns, -1) for r in records], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_a_cell_at_concurrency_n_has_n_calls_in_flight(load_study):
    res = load_results(load_study)
    assert [c["id"] for c in res.cells] == [C1, C3, R4] and res.baseline_cell == C1
    by_cell = {cid: [r for r in res.runs if r.labels["cell"] == cid] for cid in (C1, C3, R4)}
    assert all(len(runs) == 4 and all(r.status == "ok" for r in runs) for runs in by_cell.values())
    assert _in_flight(by_cell[C1]) == 1 and _in_flight(by_cell[C3]) == 3
    assert {r.labels["load"] for r in by_cell[C3]} == {"c3"} and {r.labels["concurrency"] for r in by_cell[C3]} == {3}
    # open loop: sent on the seeded Poisson schedule (4 requests/s), whatever the engine does
    assert {(r.labels["load"], r.labels["rate"]) for r in by_cell[R4]} == {("r4", 4.0)}
    starts = sorted(r.start_ns for r in by_cell[R4])
    offsets = arrival_offsets("poisson", 4.0, 4, 0, f"{R4}:{SMALL}:direct")  # seed 0: the notebook default
    assert all(abs((s - starts[0]) / 1e9 - o) < 0.15 for s, o in zip(starts, offsets))
    assert {r.labels["parallel"] for r in res.runs} == {4}  # one deployment for every level
    batch = lambda runs: max(s.call.server["batch"]["max"] for r in runs for s in r.stages)  # noqa: E731
    assert batch(by_cell[C1]) == 1 and batch(by_cell[C3]) == 3  # decoded together, not queued one by one


def test_capacity_is_the_highest_level_meeting_every_target(load_study):
    res = load_results(load_study)
    summary = summary_table(res)
    row = summary.set_index("cell").loc[C3]
    assert row["load_kind"] == "concurrency" and row["load_value"] == 3 and row["answers_differ"] is not None
    assert row["goodput_rps"] > 0 and row["quality_goodput_rps"] == row["goodput_rps"]  # the baseline holds
    cap = capacity_table(summary, res.slo).iloc[0]
    assert cap["quality"] == "baseline" and cap["capacity_concurrency"] == "3" and cap["capacity_rate"] == "4 rps"
    # the same runs against a first-token target nobody meets: no level
    res.spec["parameters"]["ttft_slo_s"] = 1e-4
    cap = capacity_table(summary_table(res), res.slo).iloc[0]
    assert cap["capacity_concurrency"] == NONE and "c1: TTFT p95" in cap["capacity_note"]
    assert (load_study / "capacity.csv").is_file()
    html = (load_study / "report.html").read_text(encoding="utf-8")
    assert "Capacity at target" in html and "Against load (concurrency)" in html


def test_without_a_quality_verdict_capacity_is_not_decided_never_a_level(load_study):
    res = load_results(load_study)
    summary = summary_table(res)
    # the same configuration as a judged one (not the baseline) whose judge failed its gate: no verdict
    failed_gate = summary.assign(role="grid", meets_quality=None,
                                 quality_note="judge cannot judge: gate accuracy 0.50 < 0.9")
    cap = capacity_table(failed_gate, res.slo).iloc[0]
    assert cap["quality"] == NOT_DECIDED and cap["capacity_concurrency"] == NOT_DECIDED
    assert "gate accuracy" in cap["capacity_note"]
    # and a verdict that fails: no level either, whatever the latency
    below = summary.assign(role="grid", meets_quality=False, quality_note=None)
    assert capacity_table(below, res.slo).iloc[0]["capacity_concurrency"] == NONE
    held = summary.assign(role="grid", meets_quality=True, quality_note=None)
    assert capacity_table(held, res.slo).iloc[0]["capacity_concurrency"] == "3"


def test_the_capacity_study_expands_to_one_deployment_per_level():
    spec = study.load_study(study.PROJECT_ROOT / "studies" / "capacity.yaml")
    cells = study.expand_grid(spec)
    assert len(cells) == 9 and {c.load for c in cells} == {"c1", "c4", "c8"}
    assert {c.parameters["parallel"] for c in cells} == {8}  # the largest level: the same engine everywhere
    assert study.baseline_cell(spec, cells).id == "qwen2.5-coder-1.5b@shipped--direct--c1"
    queries = study.load_queries(spec.parameters["queries_file"], ids=spec.parameters["query_ids"])
    assert len(queries) == 48 and {q.lang for q in queries} == {"en", "ko"}
