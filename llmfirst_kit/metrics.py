"""Every latency formula of the kit, as pure functions of records.

Definitions follow vLLM ``bench serve`` and guidellm:

- TTFT: first non-empty content chunk - request start
- E2E: last content chunk - request start
- TPOT: (E2E - TTFT) / (output_tokens - 1); undefined (None) for fewer than two tokens
- ITL: gaps between consecutive content chunks (per chunk; a chunk can hold several tokens)
- decode tokens/s: output_tokens / (E2E - TTFT); overall tokens/s: output_tokens / E2E
- user-visible TTFT of a run: first content chunk of any visible stage - run start
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from .records import CallRecord, RunRecord
from .compliance import decision_compliance, output_compliance, prompt_echo_chars

NS = 1e9


@dataclass(frozen=True)
class SLO:
    """Service-level objectives; defaults are the paper's targets."""

    ttft_s: float = 3.0
    tpot_s: float = 0.100
    e2e_s: float = 120.0


DEFAULT_SLO = SLO()


def ttft_s(rec: CallRecord) -> float | None:
    if not rec.chunk_ns:
        return None
    return (rec.chunk_ns[0] - rec.start_ns) / NS


def e2e_s(rec: CallRecord) -> float | None:
    if not rec.chunk_ns:
        return None
    return (rec.chunk_ns[-1] - rec.start_ns) / NS


def tpot_s(rec: CallRecord) -> float | None:
    n, t, e = rec.output_tokens, ttft_s(rec), e2e_s(rec)
    if n is None or n < 2 or t is None or e is None:
        return None
    return (e - t) / (n - 1)


def tpot_incl_first_s(rec: CallRecord) -> float | None:
    """guidellm's variant: E2E / output_tokens (the first token's latency included)."""
    n, e = rec.output_tokens, e2e_s(rec)
    if not n or e is None:
        return None
    return e / n


def itl_s(rec: CallRecord) -> list[float]:
    return [(b - a) / NS for a, b in zip(rec.chunk_ns, rec.chunk_ns[1:])]


def decode_tps(rec: CallRecord) -> float | None:
    n, t, e = rec.output_tokens, ttft_s(rec), e2e_s(rec)
    if not n or n < 2 or t is None or e is None or e <= t:
        return None
    return n / (e - t)


def overall_tps(rec: CallRecord) -> float | None:
    n, e = rec.output_tokens, e2e_s(rec)
    if not n or not e:
        return None
    return n / e


def slo_verdict(ttft: float | None, tpot: float | None, e2e: float | None,
                slo: SLO = DEFAULT_SLO) -> dict[str, bool | None]:
    """True = met, False = missed, None = undefined (no token, or TPOT of a one-token answer)."""
    return {
        "ttft": None if ttft is None else ttft < slo.ttft_s,
        "tpot": None if tpot is None else tpot < slo.tpot_s,
        "e2e": None if e2e is None else e2e < slo.e2e_s,
    }


def call_metrics(rec: CallRecord, slo: SLO = DEFAULT_SLO) -> dict[str, Any]:
    """Flat metrics of one call (seconds, tokens, tokens/s) plus its SLO verdict."""
    t, e, p = ttft_s(rec), e2e_s(rec), tpot_s(rec)
    itl = itl_s(rec)
    return {
        "ttft_s": t,
        "e2e_s": e,
        "tpot_s": p,
        "tpot_incl_first_s": tpot_incl_first_s(rec),
        "itl_mean_s": sum(itl) / len(itl) if itl else None,
        "itl_max_s": max(itl) if itl else None,
        "output_tokens": rec.output_tokens,
        "prompt_tokens": rec.prompt_tokens,
        "tokens_per_s": decode_tps(rec),
        "overall_tokens_per_s": overall_tps(rec),
        "token_count_source": rec.token_count_source,
        "load_s": rec.load_s,
        "cold_load": rec.cold_load,
        "slo": slo_verdict(t, p, e, slo),
    }


# ---------------------------------------------------------------------------------------------- runs

def user_ttft_s(run: RunRecord) -> float | None:
    """First content chunk of any stage the user sees - run start."""
    firsts = [s.call.chunk_ns[0] for s in run.stages if s.visible and s.call.chunk_ns]
    if not firsts:
        return None
    return (min(firsts) - run.start_ns) / NS


def run_e2e_s(run: RunRecord) -> float | None:
    ends = [s.call.chunk_ns[-1] for s in run.stages if s.call.chunk_ns]
    if not ends:
        return None
    return (max(ends) - run.start_ns) / NS


def stage_gaps_s(run: RunRecord) -> list[float]:
    """Kit time between sequential stages: from one stage's call returning to the next stage's request
    start (prompt building, decision parsing, grammar setup). Overlapping stages (a cascade) make no gap."""
    gaps = []
    prev_end: int | None = None
    for s in sorted(run.stages, key=lambda s: s.call.start_ns):
        if prev_end is not None and s.call.start_ns > prev_end:
            gaps.append((s.call.start_ns - prev_end) / NS)
        end = s.call.end_ns or (s.call.chunk_ns[-1] if s.call.chunk_ns else s.call.start_ns)
        prev_end = end if prev_end is None else max(prev_end, end)
    return gaps


def kit_overhead_s(run: RunRecord) -> float:
    """Total kit time between stages in a run (the sum of ``stage_gaps_s``)."""
    return sum(stage_gaps_s(run))


def run_metrics(run: RunRecord, slo: SLO = DEFAULT_SLO) -> dict[str, Any]:
    visible = [s for s in run.stages if s.visible]
    answer = visible[-1].call if visible else (run.stages[-1].call if run.stages else None)
    ut, e = user_ttft_s(run), run_e2e_s(run)
    tp = tpot_s(answer) if answer else None
    return {
        "user_ttft_s": ut,
        "e2e_s": e,
        "answer_tpot_s": tp,
        "model_calls": len(run.stages),
        "output_tokens": sum(s.call.output_tokens or 0 for s in run.stages),
        "kit_overhead_s": kit_overhead_s(run),
        "compliance": output_compliance(run),  # before any sink; each sink reports its own (compliance.py)
        "prompt_echo_chars": prompt_echo_chars(run),
        "decision_compliance": decision_compliance(run),
        "quality": None if run.quality is None else run.quality.get("score"),
        "slo": slo_verdict(ut, tp, e, slo),
    }


def median_ci(values: Iterable[float | None], level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Distribution-free confidence interval for a median from order statistics: ``[x_(j), x_(n+1-j)]``
    (sorted, 1-based) covers the true median with probability ``1 - 2 P(Bin(n, 1/2) <= j-1)``. Returns
    (low, high, coverage) for the narrowest such interval with coverage >= ``level``; with fewer than 6
    values no interval reaches 95 %, and (min, max) is returned with its actual coverage."""
    xs = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    n = len(xs)
    if n == 0:
        return None, None, None

    def coverage(j: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)


def mbu(model_bytes: float | None, decode_tokens_per_s: float | None, bandwidth_gb_per_s: float | None) -> float | None:
    """Model bandwidth utilisation: model bytes x decode tokens/s / measured memory bandwidth (each decoded
    token reads every weight once)."""
    if not model_bytes or not decode_tokens_per_s or not bandwidth_gb_per_s:
        return None
    return model_bytes * decode_tokens_per_s / (bandwidth_gb_per_s * 1e9)


# ------------------------------------------------------------------------------------------- frames

def calls_frame(records: Iterable[CallRecord], slo: SLO = DEFAULT_SLO):
    """One row per call: ids, parameters and every metric."""
    import pandas as pd

    rows = []
    for r in records:
        m = call_metrics(r, slo)
        verdict = m.pop("slo")
        rows.append({
            "call_id": r.call_id, "backend": r.backend, "model": r.model, "status": r.status,
            "warmup": r.warmup, **{f"param_{k}": v for k, v in r.params.items() if not isinstance(v, (dict, list))},
            **m, **{f"slo_{k}": v for k, v in verdict.items()},
        })
    return pd.DataFrame(rows)


def runs_frame(runs: Iterable[RunRecord], slo: SLO = DEFAULT_SLO):
    """One row per run: labels (study parameters), the run metrics and the SLO verdict."""
    import pandas as pd

    rows = []
    for run in runs:
        m = run_metrics(run, slo)
        verdict = m.pop("slo")
        rows.append({
            "run_id": run.run_id, "preset": run.preset, "query": run.query, "status": run.status,
            "warmup": run.warmup, **run.labels, **m, **{f"slo_{k}": v for k, v in verdict.items()},
        })
    return pd.DataFrame(rows)


def percentiles(frame, by: Sequence[str] = (), columns: Sequence[str] | None = None,
                q: Sequence[int] = (50, 90, 95, 99)):
    """p50/p90/p95/p99 of each metric column over repeats; warm-up rows excluded (and counted)."""
    import pandas as pd

    df = frame
    if "warmup" in df.columns:
        df = df[~df["warmup"].astype(bool)]
    if columns is None:
        columns = [c for c in ("ttft_s", "user_ttft_s", "tpot_s", "answer_tpot_s", "e2e_s", "tokens_per_s")
                   if c in df.columns]
    out = []
    groups = df.groupby(list(by), dropna=False) if by else [((), df)]
    for key, g in groups:
        row: dict[str, Any] = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["n"] = len(g)
        for c in columns:
            vals = pd.to_numeric(g[c], errors="coerce").dropna()
            for p in q:
                row[f"{c}_p{p}"] = vals.quantile(p / 100) if len(vals) else None
        out.append(row)
    return pd.DataFrame(out)


def load_level_metrics(records: Sequence[CallRecord], wall_s: float, slo: SLO = DEFAULT_SLO,
                       q: Sequence[int] = (50, 95, 99)) -> dict[str, Any]:
    """One concurrency level of a load sweep: TTFT / TPOT / E2E percentiles over the calls that finished
    (:func:`percentiles`), error counts, and overall throughput = all output tokens / the level's wall time
    (first request issued -> last call returned), as vLLM ``bench serve`` reports it."""
    ok = [r for r in records if r.status == "ok"]
    out: dict[str, Any] = {"requests": len(records), "ok": len(ok),
                           "errors": sum(r.status == "error" for r in records),
                           "cancelled": sum(r.status == "cancelled" for r in records), "wall_s": wall_s}
    out["error_rate"] = out["errors"] / len(records) if records else None
    latencies = ("ttft_s", "tpot_s", "e2e_s")
    out |= {f"{c}_p{p}": None for c in latencies for p in q}
    out["slo_pass_rate"] = None
    if ok:
        frame = calls_frame(ok, slo)
        row = percentiles(frame, columns=latencies, q=q).iloc[0]
        out |= {k: None if v is None or math.isnan(v) else float(v) for k, v in row.drop("n").items()}
        out["slo_pass_rate"] = float(frame[["slo_ttft", "slo_tpot", "slo_e2e"]].ne(False).all(axis=1).mean())
    tokens = sum(r.output_tokens or 0 for r in ok)
    out["output_tokens"] = tokens
    out["output_tokens_per_s"] = tokens / wall_s if wall_s > 0 else None
    out["requests_per_s"] = len(ok) / wall_s if wall_s > 0 else None
    return out


def slo_dict(slo: SLO) -> dict[str, float]:
    return asdict(slo)
