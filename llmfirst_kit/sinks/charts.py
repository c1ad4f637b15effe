"""Plotly figures of run records: token timeline, stage waterfall, latency distributions, quality vs latency,
and latency against concurrency from a load sweep.

Every latency comes from ``llmfirst_kit.metrics``; this module only places the records' own stamps on a
time axis (seconds since the run started). ``save_html`` writes a standalone file with plotly.js embedded,
so it opens offline.

In a notebook, set ``plotly.io.renderers.default = "plotly_mimetype+notebook"``: JupyterLab draws the
plotly mimetype, and the embedded-HTML copy keeps the figure visible in a saved notebook opened offline
(nbviewer, nbconvert HTML). ``notebook_connected`` would fetch plotly.js from a CDN.
"""

from __future__ import annotations

import math
import os
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..metrics import DEFAULT_SLO, NS, SLO, e2e_s, runs_frame, slo_dict, ttft_s, user_ttft_s
from ..records import RunRecord

if TYPE_CHECKING:
    import pandas as pd

# metric column -> (title, SLO field); both the runs frame's and the calls frame's names
LATENCY_COLUMNS: dict[str, tuple[str, str]] = {
    "user_ttft_s": ("user-visible TTFT (s)", "ttft_s"),
    "ttft_s": ("TTFT (s)", "ttft_s"),
    "answer_tpot_s": ("answer TPOT (s)", "tpot_s"),
    "tpot_s": ("TPOT (s)", "tpot_s"),
    "e2e_s": ("E2E (s)", "e2e_s"),
}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _seconds(run: RunRecord, t_ns: int) -> float:
    return (t_ns - run.start_ns) / NS


def token_timeline(run: RunRecord, *, title: str | None = None) -> go.Figure:
    """Cumulative output tokens against seconds since the run started, one line per stage (each line
    starts at the stage's request start); dotted lines are internal stages; the first token the user saw
    is marked (user-visible TTFT)."""
    fig = go.Figure()
    for i, stage in enumerate(run.stages):
        call = stage.call
        if not call.start_ns:
            continue
        x = [_seconds(run, call.start_ns), *(_seconds(run, t) for t in call.chunk_ns)]
        y = [0, *accumulate(call.chunk_tokens)]
        fig.add_trace(go.Scatter(
            x=x, y=y, name=stage.name, mode="lines", line_shape="hv",
            line={"color": PALETTE[i % len(PALETTE)], "dash": "solid" if stage.visible else "dot"},
            hovertemplate=f"{stage.name}<br>%{{x:.3f}} s<br>%{{y}} tokens<extra></extra>",
        ))
    visible = [s for s in run.stages if s.visible and s.call.chunk_ns]
    ut = user_ttft_s(run)
    if ut is not None:
        first = min(visible, key=lambda s: s.call.chunk_ns[0])
        fig.add_trace(go.Scatter(
            x=[ut], y=[first.call.chunk_tokens[0]], name="first visible token", mode="markers",
            marker={"symbol": "star", "size": 14, "color": "black"},
            hovertemplate=f"first token the user saw ({first.name})<br>user TTFT %{{x:.3f}} s<extra></extra>",
        ))
        fig.add_vline(x=ut, line_dash="dash", line_color="gray", annotation_text=f"user TTFT {ut:.2f} s")
    fig.update_layout(title=title or f"Token timeline · {run.preset} · {run.run_id}",
                      xaxis_title="seconds since run start", yaxis_title="output tokens (cumulative)",
                      legend_title="stage")
    return fig


def stage_waterfall(run: RunRecord, *, title: str | None = None) -> go.Figure:
    """Per stage (top to bottom, in start order): waited (run start -> request start), prefill (request
    start -> first token) and decode (first -> last token). A stage with no token shows its prefill up
    to the end of its call."""
    names, waited, prefill, decode = [], [], [], []
    for stage in run.stages:
        call = stage.call
        if not call.start_ns:
            continue
        t, e = ttft_s(call), e2e_s(call)
        names.append(stage.name)
        waited.append(stage.wait_ns / NS)
        if t is None:
            prefill.append(max(0.0, (call.end_ns - call.start_ns) / NS) if call.end_ns else 0.0)
            decode.append(0.0)
        else:
            prefill.append(t)
            decode.append(e - t)
    fig = go.Figure()
    base = [0.0] * len(names)
    for label, values, colour in (("waited", waited, "#d0d0d0"), ("prefill", prefill, "#f0a030"),
                                  ("decode", decode, "#3070c0")):
        fig.add_trace(go.Bar(
            y=names, x=values, base=base, name=label, orientation="h", marker_color=colour,
            hovertemplate=f"%{{y}}<br>{label} %{{x:.3f}} s<extra></extra>",
        ))
        base = [b + v for b, v in zip(base, values)]
    ut = user_ttft_s(run)
    if ut is not None:
        fig.add_vline(x=ut, line_dash="dash", line_color="black", annotation_text=f"user TTFT {ut:.2f} s")
    fig.update_layout(title=title or f"Stages · {run.preset} · {run.run_id}", barmode="overlay",
                      xaxis_title="seconds since run start", yaxis={"autorange": "reversed", "title": "stage"})
    return fig


def _log_axis_with_slo(fig: go.Figure, threshold: float, col: int) -> None:
    """Subplot ``col`` (row 1) on a log axis, so that the SLO and the measured values are both in view,
    with the SLO drawn as a dashed red line and labelled."""
    fig.add_hline(y=threshold, line_dash="dash", line_color="red", row=1, col=col)
    # on a log axis an annotation's y is the log10 of the value (a shape's is the value itself)
    fig.add_annotation(x=0, xref="x domain", y=math.log10(threshold), text=f"SLO {threshold:g} s",
                       showarrow=False, xanchor="left", yanchor="bottom", font={"color": "red"}, row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=col)


def _frame(runs):
    """A runs DataFrame from records, or the frame as given."""
    import pandas as pd

    return runs if isinstance(runs, pd.DataFrame) else runs_frame(list(runs))


def latency_distributions(runs: Iterable[RunRecord] | "pd.DataFrame", *, by: str = "model",
                          metrics: Sequence[str] = ("user_ttft_s", "answer_tpot_s", "e2e_s"),
                          slo: SLO = DEFAULT_SLO, title: str | None = None) -> go.Figure:
    """Box plots (every point shown) of each metric, one box per value of ``by`` (model, quantization,
    preset...), with the SLO threshold drawn as a dashed line. Log axes, so that the thresholds and the
    measured values are both in view. Warm-up runs are drawn as crosses and left out of the boxes (as
    ``metrics.percentiles`` leaves them out). Takes run records or ``runs_frame`` / ``calls_frame`` output."""
    df = _frame(runs)
    missing = [c for c in (by, *metrics) if c not in df.columns]
    if missing:
        raise ValueError(f"column(s) {', '.join(missing)} not in the frame; available: {', '.join(df.columns)}")
    unknown = [m for m in metrics if m not in LATENCY_COLUMNS]
    if unknown:
        raise ValueError(f"no SLO for {', '.join(unknown)}; known: {', '.join(LATENCY_COLUMNS)}")
    warm = df["warmup"].astype(bool) if "warmup" in df.columns else None
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[LATENCY_COLUMNS[m][0] for m in metrics])
    groups = list(dict.fromkeys(df[by].astype(str)))
    for col, metric in enumerate(metrics, start=1):
        for g, group in enumerate(groups):
            rows = df[df[by].astype(str) == group]
            colour = PALETTE[g % len(PALETTE)]
            measured = rows if warm is None else rows[~warm.loc[rows.index]]
            fig.add_trace(go.Box(
                y=measured[metric], name=group, legendgroup=group, showlegend=col == 1, marker_color=colour,
                boxpoints="all", jitter=0.3, pointpos=0, hovertext=measured.get("run_id"),
            ), row=1, col=col)
            if warm is not None and warm.loc[rows.index].any():
                warmups = rows[warm.loc[rows.index]]
                fig.add_trace(go.Scatter(
                    x=[group] * len(warmups), y=warmups[metric], mode="markers", name="warm-up (excluded)",
                    legendgroup="warm-up", showlegend=False, marker={"symbol": "x", "size": 9, "color": colour},
                ), row=1, col=col)
        _log_axis_with_slo(fig, getattr(slo, LATENCY_COLUMNS[metric][1]), col)
    for trace in fig.data:  # one legend entry for the warm-up crosses
        if trace.name == "warm-up (excluded)":
            trace.showlegend = True
            break
    fig.update_layout(title=title or f"Latency by {by}", legend_title=by)
    return fig


def quality_vs_latency(runs: Iterable[RunRecord] | "pd.DataFrame", *, color: str = "preset", x: str = "e2e_s",
                       baseline: float | str | None = None, title: str | None = None) -> go.Figure:
    """Judge score against a latency (default E2E), one point per run with a score, one trace per value
    of ``color``. ``baseline``: a score, or a value of ``color`` whose mean score is the baseline; the
    paper's target (80 % of it) is drawn as a dashed line."""
    df = _frame(runs)
    for c in (color, x, "quality"):
        if c not in df.columns:
            raise ValueError(f"column {c!r} not in the frame; available: {', '.join(df.columns)}")
    scored = df[df["quality"].notna()]
    fig = go.Figure()
    for g, (group, rows) in enumerate(scored.groupby(scored[color].astype(str), sort=False)):
        fig.add_trace(go.Scatter(
            x=rows[x], y=rows["quality"], name=group, mode="markers",
            marker={"size": 10, "color": PALETTE[g % len(PALETTE)]},
            hovertext=rows.get("run_id"),
            hovertemplate=f"%{{hovertext}}<br>{x} %{{x:.2f}}<br>score %{{y}}<extra></extra>",
        ))
    if isinstance(baseline, str):
        base_rows = scored[scored[color].astype(str) == baseline]
        baseline = float(base_rows["quality"].mean()) if len(base_rows) else None
    if baseline is not None:
        target = 0.8 * baseline
        fig.add_hline(y=target, line_dash="dash", line_color="red",
                      annotation_text=f"80 % of baseline ({target:.0f})", annotation_position="bottom right")
    fig.update_layout(title=title or "Quality vs latency", xaxis_title=LATENCY_COLUMNS.get(x, (x,))[0],
                      yaxis_title="judge score (0-100)", yaxis_range=[0, 105], legend_title=color)
    return fig


def load_sweep(result: dict[str, Any], *, title: str | None = None) -> go.Figure:
    """Latency against load from a load sweep (``load_sweep.sweep`` / ``llmfirst bench load --json``, or its
    JSONL file through ``bench.load_sweep.figure_file``): TTFT, TPOT and E2E p50 / p95 / p99 with the SLO
    drawn, overall output tokens/s, and requests/s achieved beside goodput (those that met every SLO; and
    those that also passed the quality check, when the sweep judged). Closed loop: against concurrency. Open loop: against the offered rate,
    TTFT and E2E counted from each request's scheduled send time (client queueing included), the offered rate
    drawn on the requests/s panel. A level where the load client competed for cores is marked "client CPU"."""
    levels = result["levels"]
    open_loop = result.get("arrival", "concurrency") != "concurrency"
    x = [lv["rate_rps"] if open_loop else lv["concurrency"] for lv in levels]
    slo = result.get("slo") or slo_dict(DEFAULT_SLO)
    sched = "_from_scheduled" if open_loop else ""
    panels = ((f"ttft{sched}_s", "TTFT (s) from<br>scheduled send" if open_loop else "TTFT (s)", slo["ttft_s"]),
              ("tpot_s", "TPOT (s)", slo["tpot_s"]),
              (f"e2e{sched}_s", "E2E (s) from<br>scheduled send" if open_loop else "E2E (s)", slo["e2e_s"]))
    fig = make_subplots(rows=1, cols=5, horizontal_spacing=0.06,  # short titles, in two lines: none overlaps
                        subplot_titles=[*(p[1] for p in panels),
                                        "output tokens/s<br>(overall)", "requests/s:<br>all ok vs goodput"])
    for col, (metric, _, threshold) in enumerate(panels, start=1):
        for i, q in enumerate((50, 95, 99)):
            fig.add_trace(go.Scatter(x=x, y=[lv.get(f"{metric}_p{q}") for lv in levels], mode="lines+markers",
                                     name=f"p{q}", legendgroup=f"p{q}", showlegend=col == 1,
                                     line={"color": PALETTE[i], "dash": ("solid", "dash", "dot")[i]}),
                          row=1, col=col)
        _log_axis_with_slo(fig, threshold, col)
    notes = [", ".join(n for n in (f"{lv['errors']} err" if lv["errors"] else "",
                                   "client CPU" if lv.get("client_competed") else "") if n) for lv in levels]
    fig.add_trace(go.Bar(x=x, y=[lv["output_tokens_per_s"] for lv in levels], name="tokens/s",
                         marker_color=PALETTE[3], text=notes), row=1, col=4)
    if open_loop:
        fig.add_trace(go.Scatter(x=x, y=x, mode="lines", name="offered rate", line={"color": "#7f7f7f", "dash": "dash"}),
                      row=1, col=5)
    fig.add_trace(go.Bar(x=x, y=[lv["requests_per_s"] for lv in levels], name="requests/s (ok)",
                         marker_color=PALETTE[4]), row=1, col=5)
    if result.get("quality") == "judged":
        fig.add_trace(go.Bar(x=x, y=[lv.get("quality_goodput_rps") for lv in levels], name="quality-aware goodput",
                             marker_color=PALETTE[5]), row=1, col=5)
    fig.add_trace(go.Bar(x=x, y=[lv.get("goodput_rps") for lv in levels], name="goodput (met every SLO)",
                         marker_color=PALETTE[2]), row=1, col=5)
    fig.update_xaxes(title_text=f"offered rate ({result.get('arrival')}, requests/s)" if open_loop else "concurrency",
                     type="category")
    fig.update_layout(title=title or f"Load sweep · {result['model']} · {result['backend']} at {result['target']}",
                      legend_title="", barmode="group", margin={"t": 110})
    return fig


def judge_gate(gates: dict[str, Any], *, title: str | None = None) -> go.Figure:
    """The judge gate: per judge, the share of planted pairs of each kind in which it preferred the real answer
    (both orders averaged, ``quality.gate.pair_correct``), and its overall gate accuracy; the threshold dashed
    (below it, no quality verdict)."""
    fig = go.Figure()
    threshold = None
    for i, (judge, g) in enumerate(gates.items()):
        g = g if isinstance(g, dict) else g.to_dict()
        threshold = g["threshold"]
        kinds = [k for k, v in g["by_kind"].items() if v is not None]
        x = [*kinds, "all pairs"]
        y = [g["by_kind"][k] for k in kinds] + [g["accuracy"]]
        verdict = "passes" if g["passed"] else "FAILS"
        fig.add_trace(go.Bar(x=x, y=y, name=f"{judge} ({verdict}, {g['n_pairs']} pairs)",
                             marker_color=PALETTE[i % len(PALETTE)], text=[f"{v:.2f}" for v in y],
                             textposition="outside"))
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", line_color="#d62728",
                      annotation_text=f"threshold {threshold:g}", annotation_position="top left")
    fig.update_layout(title=title or "Judge gate: real answer preferred, both orders averaged", barmode="group",
                      yaxis={"range": [0, 1.1], "title": "share of pairs"}, xaxis_title="planted bad answer",
                      legend_title="judge")
    return fig


def retention_intervals(summary: "pd.DataFrame", *, target: float = 0.8, title: str | None = None) -> go.Figure:
    """Each configuration's retention (win-or-tie share against the baseline) with its bootstrap interval;
    the quality target dashed. Rows without a quality verdict are left out."""
    rows = summary.dropna(subset=["quality_retention"])
    labels = [f"{m}@{q} · {p}" for m, q, p in zip(rows["model"], rows["quantization"], rows["preset"])]
    y = rows["quality_retention"].astype(float)
    fig = go.Figure(go.Scatter(
        x=labels, y=y, mode="markers", marker={"size": 12, "color": PALETTE[0]},
        error_y={"type": "data", "symmetric": False, "array": rows["retention_ci_high"].astype(float) - y,
                 "arrayminus": y - rows["retention_ci_low"].astype(float)},
        hovertemplate="%{x}<br>retention %{y:.2f}<extra></extra>", name="retention"))
    fig.add_hline(y=target, line_dash="dash", line_color="#d62728", annotation_text=f"target {target:g}",
                  annotation_position="bottom left")
    fig.update_layout(title=title or "Quality retention vs the baseline (win-or-tie share, 95 % bootstrap interval)",
                      yaxis={"range": [-0.05, 1.05], "title": "retention"}, xaxis_title="configuration")
    return fig


def capacity_curves(summary: "pd.DataFrame", *, slo: Any = DEFAULT_SLO, kind: str = "concurrency",
                    title: str | None = None) -> go.Figure:
    """A study's configurations against load (``study.summary_table`` rows of one kind of load level: concurrency
    or rate): TTFT, TPOT and E2E p95 with the SLO dashed (log axes), the share of runs meeting every SLO, and
    goodput beside quality-aware goodput (requests/s). One line per model x quantization x preset."""
    rows = summary[summary["load_kind"] == kind].sort_values("load_value")
    panels = (("user_ttft_s_p95", "TTFT p95 (s)", slo.ttft_s), ("answer_tpot_s_p95", "TPOT p95 (s)", slo.tpot_s),
              ("e2e_s_p95", "E2E p95 (s)", slo.e2e_s))
    fig = make_subplots(rows=1, cols=5, horizontal_spacing=0.06,
                        subplot_titles=[*(p[1] for p in panels), "runs meeting<br>every SLO", "goodput (requests/s):<br>"
                                        "solid all, dotted quality-aware"])
    for i, ((model, quant, preset), group) in enumerate(rows.groupby(["model", "quantization", "preset"], sort=False)):
        color, name = PALETTE[i % len(PALETTE)], f"{model}@{quant} · {preset}"
        x = group["load_value"].tolist()
        series = [*(group[p[0]] for p in panels), group["slo_pass_rate"], group["goodput_rps"]]
        for col, y in enumerate(series, start=1):
            fig.add_trace(go.Scatter(x=x, y=y.tolist(), mode="lines+markers", name=name, legendgroup=name,
                                     showlegend=col == 1, line={"color": color}), row=1, col=col)
        if group["quality_goodput_rps"].notna().any():
            fig.add_trace(go.Scatter(x=x, y=group["quality_goodput_rps"].tolist(), mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=False, line={"color": color, "dash": "dot"}),
                          row=1, col=5)
    for col, (_, _, threshold) in enumerate(panels, start=1):
        _log_axis_with_slo(fig, threshold, col)
    fig.update_yaxes(range=[0, 1.05], row=1, col=4)
    fig.update_xaxes(title_text="requests in flight" if kind == "concurrency" else "offered rate (requests/s)",
                     type="category")
    fig.update_layout(title=title or f"Against load ({kind})", legend_title="", margin={"t": 110})
    return fig


def save_html(fig: go.Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a standalone HTML file with plotly.js embedded (opens offline); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


__all__ = ["token_timeline", "stage_waterfall", "latency_distributions", "quality_vs_latency", "load_sweep",
           "capacity_curves",
           "judge_gate", "retention_intervals", "save_html"]
