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
import random
from dataclasses import asdict, dataclass, fields
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


@dataclass(frozen=True)
class SLOVerdict:
    """Per objective: True = met, False = missed, None = undefined (no token, or TPOT of a one-token answer)."""

    ttft: bool | None = None
    tpot: bool | None = None
    e2e: bool | None = None

    @property
    def missed(self) -> bool:
        """Some objective was missed (an undefined one is not a miss)."""
        return False in (self.ttft, self.tpot, self.e2e)

    def as_dict(self) -> dict[str, bool | None]:
        return {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e}


def slo_verdict(ttft: float | None, tpot: float | None, e2e: float | None, slo: SLO = DEFAULT_SLO) -> SLOVerdict:
    """Each latency against its objective (strictly below it is met); None where the latency is undefined."""
    return SLOVerdict(ttft=None if ttft is None else ttft < slo.ttft_s,
                      tpot=None if tpot is None else tpot < slo.tpot_s,
                      e2e=None if e2e is None else e2e < slo.e2e_s)


class _Metrics:
    """Shared by the typed metrics: ``as_dict()`` is the flat JSON / DataFrame row (``slo`` as a dict of
    its three verdicts)."""

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        out["slo"] = out["slo"].as_dict()
        return out


@dataclass(frozen=True)
class CallMetrics(_Metrics):
    """Flat metrics of one model call: seconds, tokens, tokens/s (formulas in this module's docstring)."""

    ttft_s: float | None
    e2e_s: float | None
    tpot_s: float | None
    tpot_incl_first_s: float | None
    itl_mean_s: float | None
    itl_max_s: float | None
    output_tokens: int | None
    prompt_tokens: int | None
    tokens_per_s: float | None  # decode tokens/s
    overall_tokens_per_s: float | None
    token_count_source: str | None  # where output_tokens came from (the tokenizer, the server, chunks)
    load_s: float | None  # the model load this call waited for (a server's figure, or the embedded load)
    cold_load: bool | None
    slo: SLOVerdict


@dataclass(frozen=True)
class RunMetrics(_Metrics):
    """Metrics of one pipeline run: what the user saw (user TTFT, the answer's TPOT), the whole run, the
    kit's own time, and the LLM-first figures (compliance, prompt echo, decisions by the model)."""

    user_ttft_s: float | None
    e2e_s: float | None
    answer_tpot_s: float | None
    model_calls: int
    output_tokens: int
    kit_overhead_s: float
    compliance: float | None  # before any sink; each sink reports its own (compliance.py)
    prompt_echo_chars: int
    decision_compliance: float | None
    quality: float | None  # the judge's score, None when the run was not judged
    slo: SLOVerdict


def call_metrics(rec: CallRecord, slo: SLO = DEFAULT_SLO) -> CallMetrics:
    """Flat metrics of one call (seconds, tokens, tokens/s) plus its SLO verdict."""
    t, e, p = ttft_s(rec), e2e_s(rec), tpot_s(rec)
    itl = itl_s(rec)
    return CallMetrics(
        ttft_s=t,
        e2e_s=e,
        tpot_s=p,
        tpot_incl_first_s=tpot_incl_first_s(rec),
        itl_mean_s=sum(itl) / len(itl) if itl else None,
        itl_max_s=max(itl) if itl else None,
        output_tokens=rec.output_tokens,
        prompt_tokens=rec.prompt_tokens,
        tokens_per_s=decode_tps(rec),
        overall_tokens_per_s=overall_tps(rec),
        token_count_source=rec.token_count_source,
        load_s=rec.load_s,
        cold_load=rec.cold_load,
        slo=slo_verdict(t, p, e, slo) if rec.status == "ok" else SLOVerdict(),  # no verdict for what did not finish
    )


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


def run_metrics(run: RunRecord, slo: SLO = DEFAULT_SLO) -> RunMetrics:
    answer = run.answer_call(or_last=True)
    ut, e = user_ttft_s(run), run_e2e_s(run)
    tp = tpot_s(answer) if answer else None
    return RunMetrics(
        user_ttft_s=ut,
        e2e_s=e,
        answer_tpot_s=tp,
        model_calls=len(run.stages),
        output_tokens=sum(s.call.output_tokens or 0 for s in run.stages),
        kit_overhead_s=kit_overhead_s(run),
        compliance=output_compliance(run),
        prompt_echo_chars=prompt_echo_chars(run),
        decision_compliance=decision_compliance(run),
        quality=None if run.quality is None else run.quality.get("score"),
        slo=slo_verdict(ut, tp, e, slo) if run.status == "ok" else SLOVerdict(),  # a cut-short run has no verdict
    )


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


def mbu(model_bytes: float | None, decode_tokens_per_s: float | None, bandwidth_gb_per_s: float | None, *,
        explain: bool = False) -> Any:
    """Model bandwidth utilisation: model bytes x decode tokens/s / measured memory bandwidth (each decoded
    token reads every weight once).

    MBU cannot exceed 1: a figure above 1 means the bandwidth measured is lower than what the decoder
    demonstrably read, so the *bandwidth* is wrong (measured with too few threads, or on a busy machine), not
    the decoder fast. Then None is returned instead of the figure. ``explain=True`` returns ``(mbu, flag)``:
    ``flag`` is None for a figure in (0, 1], else the reason it is withheld, naming the bandwidth figure."""
    value: float | None = None
    flag: str | None = None
    if model_bytes and decode_tokens_per_s and bandwidth_gb_per_s:
        value = model_bytes * decode_tokens_per_s / (bandwidth_gb_per_s * 1e9)
        if value > 1:
            flag = (f"bandwidth figure too low: {bandwidth_gb_per_s:.1f} GB/s measured, but the decoder read "
                    f"{model_bytes * decode_tokens_per_s / 1e9:.1f} GB/s (MBU would be {value:.2f} > 1); "
                    f"measure it again with all cores on an idle machine (environment.memory_read_bandwidth)")
            value = None
    return (value, flag) if explain else value


# ------------------------------------------------------------------------------------------- frames

def calls_frame(records: Iterable[CallRecord], slo: SLO = DEFAULT_SLO):
    """One row per call: ids, parameters and every metric."""
    import pandas as pd

    rows = []
    for r in records:
        m = call_metrics(r, slo).as_dict()
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
        m = run_metrics(run, slo).as_dict()
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
                       q: Sequence[int] = (50, 95, 99), *, scheduled_ns: Sequence[int | None] | None = None,
                       quality: Sequence[bool | None] | None = None) -> dict[str, Any]:
    """One level of a load sweep: TTFT / TPOT / E2E percentiles over the calls that finished
    (:func:`percentiles`), error counts, and overall throughput = all output tokens / the level's wall time
    (first request issued -> last call returned), as vLLM ``bench serve`` reports it.

    ``scheduled_ns`` (one per record, the open-loop arrival schedule; None: sent when scheduled) adds the
    client's queueing (:func:`client_queue_s`) and TTFT / E2E from the scheduled send time, and goodput:
    requests per second of wall time that met every SLO (:func:`goodput_pass`, judged on the latencies from
    the scheduled time). ``quality`` (one per record: the judge's pass, None = not judged) adds
    quality-aware goodput: those that also passed."""
    scheduled = list(scheduled_ns) if scheduled_ns is not None else [None] * len(records)
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
    pairs = [(r, s) for r, s in zip(records, scheduled) if r.status == "ok"]
    from_scheduled = {
        "client_queue_s": [client_queue_s(r, s) for r, s in pairs],
        "ttft_from_scheduled_s": [ttft_from_scheduled_s(r, s) for r, s in pairs],
        "e2e_from_scheduled_s": [e2e_from_scheduled_s(r, s) for r, s in pairs],
    }
    for name, values in from_scheduled.items():
        out |= {f"{name}_p{p}": _quantile(values, p / 100) for p in q}
    passed = [goodput_pass(r, s, slo) for r, s in zip(records, scheduled)]
    out["goodput_requests"] = sum(passed)
    out["goodput_rps"] = sum(passed) / wall_s if wall_s > 0 else None
    if quality is None or all(v is None for v in quality):
        out |= {"quality_judged": 0, "quality_passed": None, "quality_goodput_requests": None,
                "quality_goodput_rps": None}
    else:
        verdicts = list(quality)
        both = sum(bool(p and v) for p, v in zip(passed, verdicts))
        out |= {"quality_judged": sum(v is not None for v in verdicts), "quality_passed": sum(bool(v) for v in verdicts),
                "quality_goodput_requests": both, "quality_goodput_rps": both / wall_s if wall_s > 0 else None}
    return out


def slo_dict(slo: SLO) -> dict[str, float]:
    return asdict(slo)


# ------------------------------------------------------------------------------- open-loop load

def arrival_offsets(arrival: str, rate: float, n: int, seed: int, key: str = "") -> list[float]:
    """Scheduled send times in seconds from the level's start: ``i / rate`` (constant), or a Poisson process
    at ``rate`` (exponential gaps from ``random.Random(f"{seed}:{key}")``, the first call at 0)."""
    if arrival == "constant":
        return [i / rate for i in range(n)]
    rng = random.Random(f"{seed}:{key}")
    out, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


CLIENT_CPU_BOUND = 0.25  # cores: above this, the load client's own CPU competed with the engine (see below)


def client_queue_s(rec: CallRecord, scheduled_ns: int | None) -> float | None:
    """Open-loop load: request start - scheduled send time, the time the request waited in the load client
    (its event loop busy, the previous sleep overshot); 0 for a request sent when it was scheduled."""
    if scheduled_ns is None or not rec.start_ns:
        return None if scheduled_ns is not None else 0.0
    return max(0.0, (rec.start_ns - scheduled_ns) / NS)


def ttft_from_scheduled_s(rec: CallRecord, scheduled_ns: int | None) -> float | None:
    """TTFT counted from the scheduled send time (what a user arriving then waited); = TTFT without a schedule."""
    if scheduled_ns is None:
        return ttft_s(rec)
    return None if not rec.chunk_ns else (rec.chunk_ns[0] - scheduled_ns) / NS


def e2e_from_scheduled_s(rec: CallRecord, scheduled_ns: int | None) -> float | None:
    """E2E counted from the scheduled send time; = E2E without a schedule."""
    if scheduled_ns is None:
        return e2e_s(rec)
    return None if not rec.chunk_ns else (rec.chunk_ns[-1] - scheduled_ns) / NS


def goodput_pass(rec: CallRecord, scheduled_ns: int | None, slo: SLO = DEFAULT_SLO) -> bool:
    """Counts toward goodput: the call ended ``ok`` with at least one content chunk, and none of TTFT, TPOT
    and E2E missed its objective, TTFT and E2E counted from the scheduled send time (a request that waited
    in the client waited for the user too). TPOT of a one-token answer is undefined and not a miss."""
    if rec.status != "ok" or not rec.chunk_ns:
        return False
    verdict = slo_verdict(ttft_from_scheduled_s(rec, scheduled_ns), tpot_s(rec),
                          e2e_from_scheduled_s(rec, scheduled_ns), slo)
    return not verdict.missed


def client_cpu_check(cpu_s: float, wall_s: float, bound: float = CLIENT_CPU_BOUND) -> dict[str, Any]:
    """Did the load client compete with the engine for cores? ``cpu_s``: the client's CPU time over the level
    (its event-loop thread), ``wall_s`` the level's wall time; ``cores`` = cpu_s / wall_s, flagged when above
    ``bound`` (named in the output, :data:`CLIENT_CPU_BOUND` by default)."""
    cores = cpu_s / wall_s if wall_s > 0 else None
    return {"client_cpu_s": cpu_s, "client_cpu_cores": cores, "client_cpu_bound": bound,
            "client_competed": None if cores is None else cores > bound}


def _quantile(values: Sequence[float | None], share: float) -> float | None:
    """Linear-interpolated quantile (as pandas / numpy) of the defined values; None when there are none."""
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return None
    pos = share * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
