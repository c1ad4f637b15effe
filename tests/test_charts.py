"""Every chart of llmfirst_kit.sinks.charts on real run records (SmolLM2-135M, short answers, judged)."""

from __future__ import annotations

import re

import pytest

from llmfirst_kit.sinks import charts
from llmfirst_kit.metrics import DEFAULT_SLO, NS, e2e_s, runs_frame, ttft_s, user_ttft_s
from llmfirst_kit.pipeline import Pipeline

from conftest import TEST_MODEL

QUERY = "Why do cats purr?"


@pytest.fixture(scope="module")
async def records(backend):
    """direct x3 (the first a warm-up), staged x1, cascade x1, each reviewed by the judge."""
    out = []
    for name, repeats in (("direct", 3), ("staged", 1), ("cascade", 1)):
        pipe = Pipeline.from_preset(name, backend=backend, model=TEST_MODEL, fast_model=TEST_MODEL,
                                    max_tokens=40, review=True)
        for i in range(repeats):
            rec = await pipe.run(QUERY, labels={"repeat": i}, warmup=name == "direct" and i == 0)
            assert rec.status == "ok", rec.error
            out.append(rec)
    return out


def by_preset(records, name):
    return [r for r in records if r.preset == name]


def test_token_timeline(records):
    (rec,) = by_preset(records, "staged")
    fig = charts.token_timeline(rec)
    names = [t.name for t in fig.data]
    assert names == [s.name for s in rec.stages] + ["first visible token"]
    for trace, stage in zip(fig.data, rec.stages):
        assert len(trace.x) == len(stage.call.chunk_ns) + 1  # from the request start, then every chunk
        assert trace.y[0] == 0 and trace.y[-1] == stage.call.output_tokens
        assert trace.x[0] == pytest.approx((stage.call.start_ns - rec.start_ns) / NS)
        assert trace.line.dash == ("solid" if stage.visible else "dot")
    marker = fig.data[-1]
    assert marker.x[0] == pytest.approx(user_ttft_s(rec))
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == pytest.approx(user_ttft_s(rec))


def test_stage_waterfall(records):
    for rec in (*by_preset(records, "staged"), *by_preset(records, "cascade")):
        fig = charts.stage_waterfall(rec)
        assert [t.name for t in fig.data] == ["waited", "prefill", "decode"]
        waited, prefill, decode = fig.data
        assert list(waited.y) == [s.name for s in rec.stages]
        for i, s in enumerate(rec.stages):
            assert waited.x[i] == pytest.approx(s.wait_ns / NS)
            assert prefill.x[i] == pytest.approx(ttft_s(s.call))
            assert decode.x[i] == pytest.approx(e2e_s(s.call) - ttft_s(s.call))
            assert prefill.base[i] == pytest.approx(waited.x[i])
            assert decode.base[i] == pytest.approx(waited.x[i] + prefill.x[i])
    (cascade,) = by_preset(records, "cascade")
    assert {s.name for s in cascade.stages} >= {"opening", "answer"}


@pytest.mark.parametrize("as_frame", [False, True])
def test_latency_distributions(records, as_frame):
    data = runs_frame(records) if as_frame else records
    fig = charts.latency_distributions(data, by="preset")
    boxes = [t for t in fig.data if t.type == "box"]
    assert [t.name for t in boxes] == ["direct", "staged", "cascade"] * 3
    assert [len(b.y) for b in boxes[:3]] == [2, 1, 1]  # the warm-up is out of the box...
    crosses = [t for t in fig.data if t.name == "warm-up (excluded)"]
    assert len(crosses) == 3 and all(len(c.y) == 1 for c in crosses)  # ...and drawn as a cross
    assert sum(bool(c.showlegend) for c in crosses) == 1
    slo_lines = [(s.yref, s.y0) for s in fig.layout.shapes]
    assert slo_lines == [("y", DEFAULT_SLO.ttft_s), ("y2", DEFAULT_SLO.tpot_s), ("y3", DEFAULT_SLO.e2e_s)]
    labels = [a.text for a in fig.layout.annotations if a.text.startswith("SLO")]
    assert labels == ["SLO 3 s", "SLO 0.1 s", "SLO 120 s"]
    assert {fig.layout[f"yaxis{i}"].type for i in ("", "2", "3")} == {"log"}


def test_latency_distributions_names_missing_columns(records):
    with pytest.raises(ValueError, match="quantization.*available: run_id"):
        charts.latency_distributions(records, by="quantization")


def test_quality_vs_latency(records):
    frame = runs_frame(records)
    fig = charts.quality_vs_latency(records, color="preset", baseline="direct")
    scored = frame[frame["quality"].notna()]
    assert [t.name for t in fig.data] == list(dict.fromkeys(scored["preset"]))
    assert sum(len(t.x) for t in fig.data) == len(scored)  # one point per judged run
    for trace in fig.data:
        rows = scored[scored["preset"] == trace.name]
        assert list(trace.x) == pytest.approx(list(rows["e2e_s"]))
        assert list(trace.y) == list(rows["quality"])
    direct = scored[scored["preset"] == "direct"]["quality"]
    if len(direct):
        assert [s.y0 for s in fig.layout.shapes] == pytest.approx([0.8 * direct.mean()])


def test_save_html_embeds_plotly_js(records, tmp_path):
    path = charts.save_html(charts.token_timeline(records[0]), tmp_path / "sub" / "timeline.html")
    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size > 3_000_000  # plotly.js itself is in the file
    assert "Plotly.newPlot" in page and "plotly.js v" in page
    assert not re.search(r"<script[^>]+src=", page)  # no CDN
