"""Head-to-head results of a study (``comparisons.csv``): each of the study's ``comparisons`` (e.g. ``staged vs
direct``, ``direct+rewrite vs direct``) per model x quantization, and every ``+revise`` configuration's revised
answers against their own drafts. The pairs are judged in the quality phase (:mod:`.quality`, after the same
judge gate); here they become a win-or-tie share with a bootstrap interval, beside what the candidate costs in
latency.

- **win_or_tie**: the candidate's win-or-tie share over the queries (:func:`~llmfirst_kit.quality.retention.retention`);
  ``holds`` = the interval's lower bound >= 0.5 (the candidate is at least as good as its reference, the bar the
  staged flow must clear); None without a verdict (judge not gated or failed its gate, no pairs), with a note.
- **latency**: the median user-visible TTFT and E2E of each side over the same queries' measured runs, and their
  ratios (candidate / reference).
- **revision rows**: ``revise_rate`` = the share of runs where the judge decided to revise; ``added_s`` = median
  seconds from the draft's last token to the run's end (the review, and the revision where it ran).
"""

from __future__ import annotations

import statistics
from typing import Any

from ..errors import KitError
from ..metrics import NS, run_e2e_s, user_ttft_s
from ..pipeline import parse_preset
from ..quality.retention import retention
from .cell import latency_view
from .quality import (STRONGER_JUDGE, cell_answers, draft_call, comparison_plan, gate_results, gate_runs,
                      judge_for, judge_version, judged_queries, pair_outcomes, read_judgments, revised, study_queries)
from .store import StudyResults

HOLDS_AT = 0.5  # the candidate wins or ties at least half the time: it does not hurt


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(lines: list[dict[str, Any]], gate: Any, n_boot: int, seed: int,
             planned: list[str] | None = None) -> dict[str, Any]:
    """``planned``: the queries the comparison judges (where known); a verdict waits until all are judged."""
    outcomes, positions, _ = pair_outcomes(lines)
    planned = planned or []
    unjudged = sum(q not in outcomes for q in planned)
    r = retention(outcomes, positions=positions, target=HOLDS_AT, n_boot=n_boot, seed=seed)
    row: dict[str, Any] = {"queries": r.n_queries, "order_disagreement": r.order_disagreement,
                           "win_or_tie": None, "ci_low": None, "ci_high": None, "holds": None, "note": None}
    if gate is None:
        row["note"] = "judge not gated"
    elif not gate.passed:
        acc = "n/a" if gate.accuracy is None else f"{gate.accuracy:.2f}"
        row["note"] = f"judge cannot judge: gate accuracy {acc}; {STRONGER_JUDGE}"
    elif unjudged:
        row["note"] = (f"judging unfinished: {len(planned) - unjudged} of {len(planned)} queries judged; "
                       f"run the study again to judge the rest")
    elif r.n_queries == 0:
        row["note"] = "no query the reference answered completely was judged"
    else:
        row.update(win_or_tie=r.share, ci_low=r.ci_low, ci_high=r.ci_high, holds=r.ci_low >= HOLDS_AT)
    return row


def comparison_rows(res: StudyResults) -> list[dict[str, Any]]:
    """One row per comparison per model x quantization, then one per ``+revise`` configuration."""
    spec, p = res.spec, res.spec["parameters"]
    n_boot, seed = int(spec.get("bootstrap_samples") or 2000), int(p.get("seed") or 0)
    version = judge_version(spec)
    logged = read_judgments(res.directory)  # read once: the gate's lines and the comparisons' come from it
    lines = [ln for ln in logged if ln.get("prompt_version") == version]
    baseline = cell_answers(res.runs, res.baseline_cell) if res.baseline_cell else {}
    try:
        queries = study_queries(spec)
    except KitError:
        queries = {}
    gates = gate_results(res.directory, logged, float(spec.get("gate_threshold") or 0.9), gate_runs(spec, baseline),
                         version=version)
    rows = []
    for cand, ref in comparison_plan(res):
        judge = judge_for(cand, spec).model
        mine, theirs = cell_answers(res.runs, cand["id"]), cell_answers(res.runs, ref["id"])
        current = [ln for ln in lines if ln["type"] == "versus" and ln["cell"] == cand["id"]
                   and ln.get("reference_cell") == ref["id"] and ln["judge"] == judge
                   and mine.get(ln["query_id"]) is not None and mine[ln["query_id"]].run_id == ln["candidate_run_id"]
                   and theirs.get(ln["query_id"]) is not None and theirs[ln["query_id"]].run_id == ln["baseline_run_id"]]
        both = [q for q in mine if q in theirs]
        planned = judged_queries(queries, theirs, mine)
        c_ttft = _median([user_ttft_s(latency_view(mine[q])) for q in both])
        r_ttft = _median([user_ttft_s(latency_view(theirs[q])) for q in both])
        c_e2e = _median([run_e2e_s(latency_view(mine[q])) for q in both])
        r_e2e = _median([run_e2e_s(latency_view(theirs[q])) for q in both])
        rows.append({"kind": "versus", "model": cand["model"], "quantization": cand["quantization"],
                     "candidate": cand["preset"], "reference": ref["preset"], "judge": judge,
                     **_verdict(current, gates.get(judge), n_boot, seed, planned),
                     "candidate_user_ttft_s": c_ttft, "reference_user_ttft_s": r_ttft, "ttft_ratio": _ratio(c_ttft, r_ttft),
                     "candidate_e2e_s": c_e2e, "reference_e2e_s": r_e2e, "e2e_ratio": _ratio(c_e2e, r_e2e),
                     "revise_rate": None, "added_s": None})
    for cell in res.cells:
        if cell["state"] != "done" or not parse_preset(cell["preset"]).revise:
            continue
        judge = judge_for(cell, spec).model
        answers = cell_answers(res.runs, cell["id"])
        current = [ln for ln in lines if ln["type"] == "revision" and ln["cell"] == cell["id"] and ln["judge"] == judge
                   and answers.get(ln["query_id"]) is not None and answers[ln["query_id"]].run_id == ln["candidate_run_id"]]
        added = []
        for rec in answers.values():
            draft = draft_call(rec)
            end = run_e2e_s(rec)
            if draft is not None and draft.chunk_ns and end is not None:
                added.append(end - (draft.chunk_ns[-1] - rec.start_ns) / NS)
        rows.append({"kind": "revision", "model": cell["model"], "quantization": cell["quantization"],
                     "candidate": f"{cell['preset']} (revised)", "reference": f"{cell['preset']} (draft)",
                     "judge": judge, **_verdict(current, gates.get(judge), n_boot, seed),
                     "candidate_user_ttft_s": None, "reference_user_ttft_s": None, "ttft_ratio": None,
                     "candidate_e2e_s": None, "reference_e2e_s": None, "e2e_ratio": None,
                     "revise_rate": sum(map(revised, answers.values())) / len(answers) if answers else None,
                     "added_s": _median(added)})
    return rows


def comparisons_frame(res: StudyResults):
    import pandas as pd

    return pd.DataFrame(comparison_rows(res))


__all__ = ["HOLDS_AT", "comparison_rows", "comparisons_frame"]
