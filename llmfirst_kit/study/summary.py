"""A study's tables: :func:`runs_table` (one row per run) and :func:`summary_table` (one row per model x
quantization x preset: latency percentiles and median CIs, decode speed and MBU, judge score and retention
vs the baseline, perplexity / KL, SLO pass rate, strategy decisions, and whether the configuration meets
every target).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..backends import DEFAULT_BACKEND
from ..metrics import SLO, call_metrics, mbu, median_ci, percentiles, runs_frame
from .cell import latency_view
from .params import short_error
from .load import parse_key
from .quality import answer_text, cell_answers, is_complete, is_truncated, quality_columns
from .quantization import quantization_label, safe_model_id
from .store import StudyResults


def config_label(model: str, quantization: str, preset: str) -> str:
    return f"{model}@{quantization} · {preset}"


def runs_table(results: StudyResults):
    """One row per run (warm-up runs included, marked): labels, the run metrics without the judge's time
    (``metrics.runs_frame``), the answer call's decode tokens/s, the strategy the model decided."""
    import pandas as pd

    runs = results.runs
    df = runs_frame([latency_view(r) for r in runs], results.slo)
    if df.empty:
        return df
    df["complete"] = [bool(is_complete(r)) for r in runs]
    df["answer_text"] = [answer_text(r) for r in runs]
    df["start_ns"] = [r.start_ns for r in runs]
    df["end_ns"] = [r.end_ns for r in runs]
    df["truncated"] = [bool(is_truncated(r)) for r in runs]
    answer_tps, strategy, judge_status = [], [], []
    for r in runs:
        answer = r.answer_call()
        answer_tps.append(call_metrics(answer).tokens_per_s if answer else None)
        d = r.decisions.get("strategy")
        strategy.append(d.value["strategy"] if d and d.status == "decided" and d.value else None)
        judge_status.append(r.quality.get("status") if r.quality else None)
    df["answer_tokens_per_s"] = pd.to_numeric(pd.Series(answer_tps, index=df.index), errors="coerce")
    df["strategy"] = strategy
    df["judge_status"] = judge_status
    df["quality"] = pd.to_numeric(df["quality"], errors="coerce")
    df["config"] = [config_label(m, q, p) for m, q, p in zip(df["model"], df["quantization"], df["preset"])]
    return df


LATENCY = ("user_ttft_s", "answer_tpot_s", "e2e_s")


def _model_bytes(results: StudyResults) -> dict[str, int]:
    """Model id -> file size (embedded) or Ollama's size."""
    out = {}
    for row in results.environment.get("model_files", []):
        if row.get("name") and row.get("size"):
            out[row["name"]] = row["size"]
    return out


def summary_table(results: StudyResults):
    """One row per model x quantization x preset, failed cells included with their error: latency
    percentiles and median CIs, decode speed and MBU, judge score and retention vs the baseline,
    perplexity / KL, SLO pass rate, strategy decisions, and whether the configuration meets every target
    (p95 latencies under the SLOs, retention >= the quality target). Warm-up and failed runs excluded."""
    import pandas as pd

    spec, slo = results.spec, results.slo
    df = runs_table(results)
    groups = dict(iter(df.groupby("cell"))) if not df.empty and "cell" in df else {}
    sizes = _model_bytes(results)
    file_quality = {(q["model"], q["quantization"]): q for q in results.quality}
    quality = quality_columns(results)
    answers: dict[str, dict[str, Any]] = {}

    def judged_answers(cell_id: str | None) -> dict[str, Any]:
        if cell_id and cell_id not in answers:
            answers[cell_id] = cell_answers(results.runs, cell_id)
        return answers.get(cell_id or "", {})

    rows = []
    for cell in results.cells:
        backend = cell.get("backend") or spec["parameters"].get("backend", DEFAULT_BACKEND)
        qname, shipped = quantization_label(backend, cell["model"], cell["quantization"])
        mid = safe_model_id(backend, cell["model"], cell["quantization"])
        level = parse_key(cell.get("load"))
        load_key = cell.get("load") or level.key
        runs = groups.get(cell["id"])
        real = runs[~runs["warmup"].astype(bool)] if runs is not None else None
        ok = real[real["status"] == "ok"] if real is not None else None
        row: dict[str, Any] = {
            "model": cell["model"], "quantization": qname, "shipped": shipped, "preset": cell["preset"],
            "load": load_key, "load_kind": level.kind, "load_value": level.value, "cell_role": cell.get("role", "grid"),
            "backend": backend, "model_id": mid, "cell": cell["id"], "cell_state": cell["state"],
            "cell_error": short_error(cell["error"]), "cell_wall_s": cell["wall_s"],
            "n_runs": 0 if ok is None else len(ok),
            "n_errors": 0 if real is None else int((real["status"] != "ok").sum()),
            "n_complete": 0 if ok is None else int(ok["complete"].astype(bool).sum()),
            "truncation_rate": None if ok is None or not len(ok) else float(ok["truncated"].astype(bool).mean()),
        }
        row.update(_latency_columns(ok))
        row["model_bytes"] = sizes.get(mid) if mid else None
        row["bandwidth_gb_per_s"] = results.bandwidth_gb_per_s
        # never above 1: a figure that would be is withheld and the bandwidth flagged instead (metrics.mbu)
        row["mbu"], row["mbu_flag"] = mbu(row["model_bytes"], row["answer_tokens_per_s_p50"],
                                          row["bandwidth_gb_per_s"], explain=True)
        scored = ok["quality"].dropna() if ok is not None else pd.Series(dtype=float)
        row["judge_score_mean"] = float(scored.mean()) if len(scored) else None
        row["judge_scored"] = len(scored)
        qc = dict(quality.get(cell["id"], {}))
        qc.pop("truncation_rate", None)  # the same share, from the runs above
        scores = quality.get(qc.get("quality_cell"), {}).get("_query_scores")
        qc.pop("_query_scores", None)
        row.update(qc)
        q = file_quality.get((cell["model"], qname)) or {}
        row.update(perplexity=q.get("perplexity"), reference_perplexity=q.get("reference_perplexity"),
                   kl_mean=q.get("kl_mean"), kl_top1_agreement=q.get("top1_agreement"), quality_tokens=q.get("tokens"))
        row.update(_run_rates(ok, cell["preset"]))
        row.update(_verdict(row, slo, spec.get("quality_target", 0.8)))
        row.update(_load_columns(real, ok, row, scores, judged_answers(row.get("quality_cell")),
                                 baseline=row.get("quality_cell") == results.baseline_cell))
        rows.append(row)
    return pd.DataFrame(rows)


def _latency_columns(ok) -> dict[str, Any]:
    """p50 / p95 (``metrics.percentiles``) of each latency and the decode speed, and the median's CI. E2E is
    taken over complete answers only: the end of an answer cut off at the token limit is not the end."""
    out: dict[str, Any] = {}
    complete = ok[ok["complete"].astype(bool)] if ok is not None and len(ok) else None
    for col in (*LATENCY, "answer_tokens_per_s"):
        frame = complete if col == "e2e_s" else ok
        pct = percentiles(frame, columns=[col], q=(50, 95)).iloc[0] if frame is not None and len(frame) else {}
        for p in (50, 95):
            value = pct.get(f"{col}_p{p}") if len(pct) else None
            out[f"{col}_p{p}"] = None if value is None or value != value else float(value)  # NaN -> None
        if col in LATENCY:
            low, high, coverage = median_ci(frame[col].tolist() if frame is not None else [])
            out[f"{col}_p50_ci_low"], out[f"{col}_p50_ci_high"] = low, high
            if col == "user_ttft_s":
                out["median_ci_coverage"] = coverage
    return out


def _run_rates(ok, preset: str) -> dict[str, Any]:
    """Share of runs meeting every SLO (an undefined TPOT -- a one-token answer -- is not a miss), share of
    staged runs whose strategy was decided and agreement of the decision with the query's label, mean
    LLM-first compliance, the prompt-echo rate (share of runs whose shown text echoes a kit prompt) and the
    mean decision compliance (runs with decisions)."""
    if ok is None or ok.empty:
        return {"slo_pass_rate": None, "strategy_decided_rate": None, "strategy_agreement": None,
                "compliance_mean": None, "prompt_echo_rate": None, "decision_compliance_mean": None}
    passed = _met_every_slo(ok)
    decided = ok[ok["strategy"].notna()]
    agree = (decided["strategy"] == decided["category"]).mean() if len(decided) and "category" in decided else None
    return {"slo_pass_rate": float(passed.mean()),
            "strategy_decided_rate": len(decided) / len(ok) if preset.startswith("staged") else None,
            "strategy_agreement": None if agree is None else float(agree),
            "compliance_mean": float(ok["compliance"].astype(float).mean()),
            "prompt_echo_rate": float((ok["prompt_echo_chars"].fillna(0) > 0).mean())
            if "prompt_echo_chars" in ok else None,
            "decision_compliance_mean": _mean(ok["decision_compliance"]) if "decision_compliance" in ok else None}


def _met_every_slo(ok):
    """Per run: met every SLO (an undefined TPOT -- a one-token answer -- is not a miss)."""
    return (ok["slo_ttft"] == True) & (ok["slo_e2e"] == True) & (ok["slo_tpot"] != False)  # noqa: E712


def _load_columns(real, ok, row: Mapping[str, Any], scores: Mapping[str, float | None] | None,
                  judged: Mapping[str, Any], *, baseline: bool) -> dict[str, Any]:
    """The load a cell ran under and what it delivered: the measured runs' wall time (first start to last
    end), requests/s, goodput (runs meeting every SLO per second) and quality-aware goodput (those whose
    answer also holds against the baseline: the query's averaged win-or-tie probability >= 0.5 on the answer
    the judge saw -- a run whose answer differs from it counts as not holding, so this is a lower bound; the
    ``baseline`` system's own configuration holds by definition; None without a verdict)."""
    import pandas as pd

    out: dict[str, Any] = {"load_wall_s": None, "requests_per_s": None, "goodput_rps": None,
                           "quality_goodput_rps": None}
    if real is None or not len(real) or ok is None:
        return out
    wall = (real["end_ns"].max() - real["start_ns"].min()) / 1e9
    if wall <= 0:
        return out
    passed = _met_every_slo(ok)
    out.update(load_wall_s=float(wall), requests_per_s=len(ok) / wall, goodput_rps=float(passed.sum()) / wall)
    if baseline:
        out["quality_goodput_rps"] = out["goodput_rps"]
    elif row.get("meets_quality") is not None and scores:
        holds = [scores.get(q) is not None and scores[q] >= 0.5 and q in judged
                 and (judged[q].run_id == rid or answer_text(judged[q]).strip() == text.strip())
                 for q, rid, text in zip(ok["query_id"], ok["run_id"], ok["answer_text"])]
        out["quality_goodput_rps"] = float((passed & pd.Series(holds, index=ok.index)).sum()) / wall
    return out


def _mean(column) -> float | None:
    values = column.dropna().astype(float)
    return float(values.mean()) if len(values) else None


def _verdict(row: Mapping[str, Any], slo: SLO, quality_target: float) -> dict[str, Any]:
    ttft, tpot, e2e = row["user_ttft_s_p95"], row["answer_tpot_s_p95"], row["e2e_s_p95"]
    latency = None if ttft is None or e2e is None else bool(
        ttft < slo.ttft_s and e2e < slo.e2e_s and (tpot is None or tpot < slo.tpot_s))
    low = row.get("retention_ci_low")  # None when there is no verdict (no baseline, failed gate, ...)
    quality = None if low is None or row.get("quality_retention") is None else bool(low >= quality_target)
    return {"meets_latency": latency, "meets_quality": quality, "meets_all": bool(latency and quality)}
