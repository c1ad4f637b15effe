"""The judge and its gate on real models: the 1.5B model answers as the baseline and judges; SmolLM2-135M
is the configuration that is really worse and the judge that cannot discriminate.

Kept within budget: the 1.5B is loaded once (this process; the study test in test_study_quality.py uses
small models only), three short queries, short answers, one decode thread. The gate here plants two kinds
of bad answer (an empty answer, another query's answer) on the three real answers: the 1.5B judge separates
those in both orders. The full gate of a study tests every kind (see README, "Quality"). The verdict is a choice
read after the judge's reasons, which it writes freely as its JSON reply's first field: with the whole reply under
a JSON grammar, one reply here looped past the token limit twice on an AMX machine and stayed undecided, which
failed this gate.
"""

from __future__ import annotations

import os

import pytest

from llmfirst_kit.backends import get_backend
from llmfirst_kit.pipeline import Pipeline
from llmfirst_kit.quality import PairwiseJudge, RealAnswer, planted_pairs, retention, run_gate
from llmfirst_kit.quality.judge import VERDICTS
from llmfirst_kit.quality.retention import judgment_outcome
from llmfirst_kit.data import QUERIES
from llmfirst_kit.study import load_queries

REFERENCE = "qwen2.5-coder-1.5b"
SMALL = "smollm2-135m"
THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))
QUERY_IDS = ["ko-s01", "en-s05", "ko-s05"]  # Korean and English; SmolLM2 (English only) answers the Korean ones badly
GATE_KINDS = ("empty", "other_query")


@pytest.fixture(scope="module")
def reference():
    return get_backend("embedded", model=REFERENCE, n_threads=THREADS)


@pytest.fixture(scope="module")
def queries():
    return load_queries(QUERIES, ids=QUERY_IDS)


async def _answers(backend, model: str, queries, max_tokens: int) -> dict[str, tuple[str, str]]:
    pipe = Pipeline.from_preset("direct", backend=backend, model=model, max_tokens=max_tokens, cache="cold")
    out = {}
    for q in queries:
        rec = await pipe.run(q.query)
        call = rec.stages[-1].call
        out[q.id] = (call.text, call.finish_reason)
    return out


@pytest.fixture(scope="module")
async def baseline(reference, queries):
    """The 1.5B model's complete answers (the baseline system: direct)."""
    answers = await _answers(reference, REFERENCE, queries, 96)
    assert all(reason == "stop" for _, reason in answers.values()), answers  # complete answers only
    return answers


@pytest.fixture(scope="module")
def gate_pairs(baseline, queries):
    reals = [RealAnswer(q.id, q.query, baseline[q.id][0], q.lang, q.twin) for q in queries]
    return planted_pairs(reals, kinds=GATE_KINDS, seed=0)


async def test_gate_passes_with_a_judge_that_can_discriminate(reference, gate_pairs):
    judge = PairwiseJudge(reference, REFERENCE)
    gate = await run_gate(judge, gate_pairs)
    assert gate.n_pairs == 6 and gate.n_judgments == 12
    assert gate.passed, gate.describe() + f"\n{gate.pairs}"
    assert gate.accuracy >= 0.9 and gate.judge_model == REFERENCE
    judgments = [j for p in gate.pairs for j in p["judgments"]]
    # the verdict is the judge's choice after its reasons, read from next-token probabilities (its confidence)
    assert all(j["method"] == "next-token choice" and j["reasons"] for j in judgments)
    assert not any(j["reasons"].startswith("{") or j["reasons"].endswith('"') for j in judgments)  # the text only
    assert all(abs(sum(j["probabilities"].values()) - 1) < 1e-3 for j in judgments)


async def test_gate_fails_with_a_judge_that_cannot_discriminate(gate_pairs):
    small = get_backend("embedded", model=SMALL, n_threads=THREADS)
    gate = await run_gate(PairwiseJudge(small, SMALL), gate_pairs)
    assert gate.n_pairs == 6
    assert not gate.passed and gate.accuracy < 0.9, gate.describe()
    assert "cannot judge" in gate.describe()


async def test_retention_falls_for_a_worse_configuration(reference, baseline, queries):
    """SmolLM2-135M against the 1.5B baseline, judged by the 1.5B in both orders: it loses on (nearly) every
    query, so its win-or-tie share is low and its interval excludes 1.0 (and 0.8: it does not meet quality)."""
    small = get_backend("embedded", model=SMALL, n_threads=THREADS)
    candidate = await _answers(small, SMALL, queries, 96)
    judge = PairwiseJudge(reference, REFERENCE)
    outcomes, positions = {}, []
    for q in queries:
        if candidate[q.id][1] != "stop":  # complete answers only, as in a study
            continue
        js = await judge.compare(q.query, baseline[q.id][0], candidate[q.id][0])
        assert [j.shown_first for j in js] == ["baseline", "candidate"]  # both orders
        assert all(j.status == "decided" and j.reasons and j.verdict in VERDICTS for j in js), js
        outcomes[q.id] = [judgment_outcome(j) for j in js]
        positions += [j.verdict for j in js]
    r = retention(outcomes, positions=positions, seed=0, n_boot=2000)
    assert r.n_queries >= 2, candidate
    assert r.share <= 1 / 3, (r, outcomes)
    assert r.ci_high < 1.0 and r.meets_quality is False
    assert r.order_disagreement is not None
