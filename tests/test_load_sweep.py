"""The load sweep (``llmfirst bench load``) against the kit's own server on a free loopback port (through its
Ollama-compatible API and the kit's Ollama backend) and against the embedded model in-process, with the
real SmolLM2-135M model. Counts are asserted in tokens and requests, never in seconds; the time-limit test
only checks that the bound is enforced.
"""

from __future__ import annotations

import json
import socket

import pytest

from conftest import TEST_MODEL, wait_until_idle
from llmfirst_kit.sinks import charts
from llmfirst_kit.backends.ollama import OllamaBackend
from llmfirst_kit.cli import EXIT_BAD_INPUT, EXIT_OK, main
from llmfirst_kit.errors import BackendUnavailable, InvalidInput, UnknownModel
from llmfirst_kit.bench.load_sweep import (arrival_offsets, figure_file, parse_concurrency, parse_rates,
                                           summarize_file, sweep)
from llmfirst_kit.metrics import (CLIENT_CPU_BOUND, SLO, client_cpu_check, client_queue_s, goodput_pass,
                                  load_level_metrics)
from llmfirst_kit.records import CallRecord
from llmfirst_kit.serve import ServerConfig, ServerThread

QUERIES = ["What is 2+2?", "Name a color.", "Say hello."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(loaded):
    with ServerThread(config=ServerConfig(default_model=TEST_MODEL, n_threads=loaded.n_threads)) as srv:
        yield srv


async def test_sweep_against_the_kit_server_counts_every_token(server, loaded):
    target = OllamaBackend(TEST_MODEL, host=server.url)
    before = await wait_until_idle(loaded)
    result = await sweep(target, concurrency=[1, 2], requests=3, max_tokens=8, queries=QUERIES, warmup=False)
    await target.aclose()
    assert result["target"] == server.url and result["stopped_early"] is None
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    decoded = await wait_until_idle(loaded) - before
    total = 0
    for lv in result["levels"]:
        assert (lv["requests"], lv["ok"], lv["errors"], lv["cancelled"]) == (3, 3, 0, 0)
        assert lv["ttft_s_p50"] <= lv["ttft_s_p95"] <= lv["ttft_s_p99"] <= lv["e2e_s_p99"]
        assert lv["e2e_s_p50"] <= lv["e2e_s_p95"] <= lv["e2e_s_p99"]
        assert 3 <= lv["output_tokens"] <= 3 * 8
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["wall_s"])
        assert lv["error_messages"] == []
        total += lv["output_tokens"]
    # the server's eval_count totals match the model's own decode counter (which also counts each stop token)
    assert total <= decoded <= total + 6

    fig = charts.load_sweep(result)
    assert len([t for t in fig.data if t.type == "scatter"]) == 9 and fig.data[-1].type == "bar"
    assert list(fig.data[0].x) == [1, 2]
    # the five panel titles fit their panels (they overlapped: "output tokens/s (overall)" ran into the next)
    titles = [a for a in fig.layout.annotations if a.text and a.yref == "paper" and a.y >= 1]
    assert len(titles) == 5 and all(max(len(line) for line in a.text.split("<br>")) <= 18 for a in titles)


async def test_sweep_stops_when_the_error_rate_passes_the_bound(server):
    target = OllamaBackend("no-such-model", host=server.url)
    result = await sweep(target, concurrency=[1, 2], requests=6, max_tokens=4, queries=QUERIES, warmup=False,
                         max_error_rate=0.5)
    await target.aclose()
    assert result["stopped_early"] == "error rate"
    [level] = result["levels"]  # the higher level never ran
    assert level["stopped"] == "error rate" and level["requests"] == 4 < 6 and level["errors"] == 4
    assert any("ollama pull no-such-model" in msg for msg in level["error_messages"])


async def test_a_warm_up_that_finds_no_model_or_no_server_ends_the_sweep_at_once(server):
    target = OllamaBackend("no-such-model", host=server.url)
    with pytest.raises(UnknownModel, match="ollama pull no-such-model"):
        await sweep(target, concurrency=[1], requests=2, max_tokens=4, queries=QUERIES)
    await target.aclose()
    nobody = OllamaBackend(TEST_MODEL, host=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailable, match="ollama serve"):
        await sweep(nobody, concurrency=[1], requests=2, max_tokens=4, queries=QUERIES)
    await nobody.aclose()


async def test_sweep_is_bounded_in_time(backend, loaded):
    result = await sweep(backend, model=TEST_MODEL, concurrency=[1, 2], requests=50, max_tokens=64,
                         queries=["Write a long story about a dragon."], warmup=False, time_limit_s=1.0)
    assert result["stopped_early"] == "time limit"
    [level] = result["levels"]
    assert level["requests"] < 50 and level["cancelled"] == 1  # the call in flight at the deadline
    await wait_until_idle(loaded)  # decoding stopped (otherwise the counter keeps moving)


def test_parse_concurrency_names_the_expected_form():
    assert parse_concurrency("1, 2,8") == [1, 2, 8]
    for bad in ("", "0,1", "a,b", "-2"):
        with pytest.raises(InvalidInput, match="e.g. 1,2,4,8"):
            parse_concurrency(bad)


def test_cli_bench_load_on_the_kit_server_writes_json_and_chart(capsys, tmp_path, loaded):
    html = tmp_path / "load.html"
    code = main(["bench", "load", "--serve-kit", "--model", TEST_MODEL, "--concurrency", "1,2", "--requests", "2",
                 "--max-tokens", "4", "--threads", str(loaded.n_threads), "--json", "--html", str(html)])
    out, _ = capsys.readouterr()
    assert code == EXIT_OK
    result = json.loads(out)
    assert result["backend"] == "ollama" and result["target"].startswith("http://127.0.0.1:")
    assert [(lv["concurrency"], lv["ok"]) for lv in result["levels"]] == [(1, 2), (2, 2)]
    assert result["warmup"]["status"] == "ok" and result["chart"] == str(html)
    assert html.stat().st_size > 1_000_000  # plotly.js embedded: opens offline

    sweep_file = tmp_path / "rate.jsonl"
    code = main(["bench", "load", "--serve-kit", "--model", TEST_MODEL, "--arrival", "constant", "--rates", "4",
                 "--requests", "2", "--max-tokens", "4", "--threads", str(loaded.n_threads), "--jsonl",
                 str(sweep_file), "--json"])
    out, _ = capsys.readouterr()
    assert code == EXIT_OK
    ran = json.loads(out)
    assert ran["arrival"] == "constant" and [(lv["level"], lv["ok"]) for lv in ran["levels"]] == [("constant@4rps", 2)]
    code = main(["bench", "load", "--from-file", "--jsonl", str(sweep_file), "--json"])  # sends nothing
    out, _ = capsys.readouterr()
    assert code == EXIT_OK and json.loads(out)["levels"] == ran["levels"]
    code = main(["bench", "load", "--from-file", "--jsonl", str(sweep_file)])
    out, _ = capsys.readouterr()
    assert "goodput_rps" in out and "quality-aware goodput: not asked" in out and str(sweep_file) in out

    for argv, fix in ((["--concurrency", "0,x"], "e.g. 1,2,4,8"), (["--max-error-rate", "1.5"], "between 0 and 1"),
                      (["--time-limit", "0"], "positive number of seconds"),
                      (["--rates", "1,2"], "add --arrival poisson"), (["--arrival", "poisson"], "needs --rates"),
                      (["--arrival", "poisson", "--rates", "0"], "e.g. 0.5,1,2,4"),
                      (["--from-file"], "give it with --jsonl"), (["--judge", TEST_MODEL], "add --quality-baseline"),
                      (["--quality-baseline", "no-such-model"], "no-such-model")):
        code = main(["bench", "load", "--model", TEST_MODEL, *argv])
        out, err = capsys.readouterr()
        assert code == EXIT_BAD_INPUT and fix in err and not out  # before any request


def test_cli_quality_aware_goodput_against_a_baseline_model(capsys, tmp_path, loaded):
    """``--quality-baseline``: after the load the baseline model answers each query (here the same model with
    a longer budget, so the answers differ and the judge is asked) and the judge compares; every finished
    call gets a line, and quality-aware goodput never exceeds goodput. What the 135M judge decides is not
    asserted."""
    code = main(["bench", "load", "--model", TEST_MODEL, "--concurrency", "2", "--requests", "2", "--max-tokens", "4",
                 "--threads", str(loaded.n_threads), "--quality-baseline", TEST_MODEL, "--judge", TEST_MODEL,
                 "--baseline-max-tokens", "12", "--jsonl", str(tmp_path / "q.jsonl"), "--json"])
    out, _ = capsys.readouterr()
    assert code == EXIT_OK
    result = json.loads(out)
    [lv] = result["levels"]
    assert result["quality"] == "judged" and lv["ok"] == 2
    assert len([ln for ln in _lines(tmp_path / "q.jsonl") if ln["type"] == "quality"]) == 2
    assert lv["quality_goodput_rps"] is None or lv["quality_goodput_rps"] <= lv["goodput_rps"]


async def test_serve_kit_through_its_openai_api(loaded):
    from llmfirst_kit.bench.load_sweep import load_target

    async with load_target("openai", serve_kit=True, model=TEST_MODEL, n_threads=loaded.n_threads) as target:
        result = await sweep(target, concurrency=[2], requests=2, max_tokens=4, queries=QUERIES)
    assert result["backend"] == "openai" and result["target"].endswith("/v1")
    [level] = result["levels"]
    assert (level["ok"], level["errors"]) == (2, 0) and 2 <= level["output_tokens"] <= 8


# ------------------------------------------------------------------------------ open loop, goodput, JSONL

LENIENT = SLO(ttft_s=1e6, tpot_s=1e6, e2e_s=1e6)
IMPOSSIBLE = SLO(ttft_s=1e-9, tpot_s=1e-9, e2e_s=1e-9)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_arrival_schedules_are_seeded_and_have_the_asked_rate():
    assert arrival_offsets("constant", 4.0, 4, seed=0) == [0.0, 0.25, 0.5, 0.75]
    a = arrival_offsets("poisson", 2.0, 200, seed=7, key="poisson@2rps")
    assert a == arrival_offsets("poisson", 2.0, 200, seed=7, key="poisson@2rps")  # the same on every rerun
    assert a != arrival_offsets("poisson", 2.0, 200, seed=8, key="poisson@2rps")
    assert a[0] == 0.0 and all(y > x for x, y in zip(a, a[1:]))
    assert 1.5 < 199 / a[-1] < 2.7  # mean rate of 199 exponential gaps at 2/s (a 5-sigma band)
    assert parse_rates("0.5, 2") == [0.5, 2.0]
    for bad in ("", "0", "x", "-1", "inf"):
        with pytest.raises(InvalidInput, match="e.g. 0.5,1,2,4"):
            parse_rates(bad)


def test_goodput_counts_latency_from_the_scheduled_send_time():
    """By hand: a call that met the TTFT objective from its actual send, but waited 2.5 s in the client before
    it was sent, misses it from the scheduled time and is not goodput; one sent on time is."""
    s = 10 ** 9

    t0 = 100 * s  # perf_counter_ns stamps; a start_ns of 0 is a call that never started

    def rec(start_s: float) -> CallRecord:
        start = t0 + int(start_s * s)
        return CallRecord(call_id="c", backend="embedded", model="m", status="ok", start_ns=start, end_ns=start + s,
                          chunk_ns=[start + s // 2, start + s], chunk_tokens=[1, 1], output_tokens=2)

    slo = SLO(ttft_s=1.0, tpot_s=1.0, e2e_s=10.0)
    on_time, late = rec(0.0), rec(2.5)  # both scheduled at t=0
    assert client_queue_s(on_time, t0) == 0.0 and client_queue_s(late, t0) == pytest.approx(2.5)
    assert goodput_pass(on_time, t0, slo) is True and goodput_pass(late, t0, slo) is False
    assert goodput_pass(late, None, slo) is True  # closed loop: no schedule, timed from the send
    lv = load_level_metrics([on_time, late], wall_s=4.0, slo=slo, scheduled_ns=[t0, t0], quality=[False, True])
    assert lv["slo_pass_rate"] == 1.0 and lv["goodput_requests"] == 1 and lv["goodput_rps"] == pytest.approx(0.25)
    assert lv["ttft_s_p50"] == pytest.approx(0.5) and lv["ttft_from_scheduled_s_p99"] == pytest.approx(2.975)
    assert lv["client_queue_s_p50"] == pytest.approx(1.25)
    # quality-aware: the one goodput call failed the check, the one that passed missed the SLO
    assert (lv["quality_judged"], lv["quality_passed"], lv["quality_goodput_requests"]) == (2, 1, 0)
    assert client_cpu_check(1.0, 2.0, bound=0.25)["client_competed"] is True
    assert client_cpu_check(0.1, 2.0, bound=0.25)["client_competed"] is False


async def test_open_loop_sweep_writes_every_request_and_resumes(server, tmp_path):
    """A Poisson rate sweep of the kit server: every call a line of the file as it ended; the summary and
    chart rebuilt from the file alone; goodput, the client-CPU flag and the SLO judged each way from it; a
    rerun with the same file runs nothing; a level whose end never reached the file (standing in for a kill
    mid-level: the file cut there, with half a line) is run again whole, the finished one skipped."""
    path = tmp_path / "sweep.jsonl"
    target = OllamaBackend(TEST_MODEL, host=server.url)
    options = dict(arrival="poisson", rates=[4.0, 8.0], requests=3, max_tokens=4, queries=QUERIES, seed=3,
                   jsonl=path)
    result = await sweep(target, **options)
    assert result["arrival"] == "poisson" and result["rates_rps"] == [4.0, 8.0] and result["stopped_early"] is None
    assert [lv["level"] for lv in result["levels"]] == ["poisson@4rps", "poisson@8rps"]
    requests = [ln for ln in _lines(path) if ln["type"] == "request"]
    assert len(requests) == 6 and all(ln["record"]["status"] == "ok" for ln in requests)
    for lv in result["levels"]:
        assert (lv["ok"], lv["errors"], lv["rate_rps"], lv["concurrency"]) == (3, 0, lv["rate_rps"], None)
        assert lv["client_queue_s_p50"] >= 0.0
        assert lv["ttft_from_scheduled_s_p50"] >= lv["ttft_s_p50"] - 1e-9  # the schedule is never after the send
        assert lv["e2e_from_scheduled_s_p99"] >= lv["e2e_s_p99"] - 1e-9
        assert lv["client_cpu_bound"] == CLIENT_CPU_BOUND and lv["client_cpu_s"] >= 0
        assert lv["quality_goodput_rps"] is None  # no quality check asked
    assert result["quality"] == "not asked"

    rebuilt = summarize_file(path)
    assert rebuilt["levels"] == result["levels"]
    lenient, impossible = summarize_file(path, slo=LENIENT), summarize_file(path, slo=IMPOSSIBLE)
    assert [lv["goodput_requests"] for lv in lenient["levels"]] == [3, 3]
    assert [lv["goodput_requests"] for lv in impossible["levels"]] == [0, 0]
    assert all(lv["client_competed"] for lv in summarize_file(path, client_cpu_bound=1e-12)["levels"])
    assert not any(lv["client_competed"] for lv in summarize_file(path, client_cpu_bound=64.0)["levels"])
    fig = figure_file(path)
    assert list(fig.data[0].x) == [4.0, 8.0] and fig.data[-1].name == "goodput (met every SLO)"

    again = await sweep(target, **options)  # same sweep, same file: nothing left to run
    assert again["resumed_levels"] == ["poisson@4rps", "poisson@8rps"]
    assert len([ln for ln in _lines(path) if ln["type"] == "request"]) == 6
    assert again["levels"] == result["levels"]

    lines = path.read_text().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(lines) if '"level_start"' in ln and "poisson@8rps" in ln) + 2
    path.write_text("".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])  # one call of level 2, half a line
    assert summarize_file(path)["levels"][1]["stopped"] == "interrupted"
    resumed = await sweep(target, **options)
    await target.aclose()
    assert resumed["resumed_levels"] == ["poisson@4rps"] and resumed["levels"][0] == result["levels"][0]
    assert resumed["levels"][1]["ok"] == 3 and resumed["levels"][1]["stopped"] is None
    assert len({ln["attempt"] for ln in _lines(path) if ln["type"] == "level_start"}) == 3

    with pytest.raises(InvalidInput, match="holds a different sweep"):
        await sweep(OllamaBackend(TEST_MODEL, host=server.url), **{**options, "max_tokens": 5})


async def test_quality_aware_goodput_counts_only_calls_that_passed_the_check(server, tmp_path):
    """The quality check runs after the last level, once per finished call; here it passes the answers to the
    first query and fails the others, so one call of two comes out each way."""
    async def first_query_passes(query: str, record: CallRecord) -> bool:
        return query == QUERIES[0] and record.status == "ok"

    target = OllamaBackend(TEST_MODEL, host=server.url)
    path = tmp_path / "q.jsonl"
    result = await sweep(target, concurrency=[1], requests=2, max_tokens=4, queries=QUERIES, warmup=False,
                         jsonl=path, quality=first_query_passes)
    await target.aclose()
    [lv] = result["levels"]
    assert result["quality"] == "judged" and (lv["quality_judged"], lv["quality_passed"]) == (2, 1)
    assert lv["quality_goodput_requests"] <= lv["goodput_requests"]
    [lenient] = summarize_file(path, slo=LENIENT)["levels"]
    assert (lenient["goodput_requests"], lenient["quality_goodput_requests"]) == (2, 1)
    assert [ln["passed"] for ln in _lines(path) if ln["type"] == "quality"] == [True, False]


async def test_the_pairwise_judge_as_the_quality_check(server, backend, tmp_path):
    """``judge_check``: the kit's pairwise judge (SmolLM2 here, on the embedded backend) compares each answer
    with the baseline answer to its query in both orders; a query without a baseline gets no verdict. What
    the 135M judge decides is not asserted, only that its verdict (or its failure to decide) is recorded."""
    from llmfirst_kit.bench.load_sweep import judge_check
    from llmfirst_kit.quality.judge import PairwiseJudge

    target = OllamaBackend(TEST_MODEL, host=server.url)
    check = judge_check(PairwiseJudge(backend, TEST_MODEL, max_tokens=96), {QUERIES[0]: "4"})
    path = tmp_path / "judged.jsonl"
    result = await sweep(target, concurrency=[1], requests=2, max_tokens=4, queries=QUERIES[:2], warmup=False,
                         jsonl=path, quality=check)
    await target.aclose()
    verdicts = {ln["index"]: ln["passed"] for ln in _lines(path) if ln["type"] == "quality"}
    assert set(verdicts) == {0, 1} and verdicts[1] is None and verdicts[0] in (True, False, None)
    [lv] = result["levels"]
    assert lv["quality_judged"] == (verdicts[0] is not None)


async def test_bench_serve_flags_clients_that_compete_for_cores(server):
    """The WebSocket load's clients all run on this event-loop thread; their CPU time over the load against
    the bound, each way: flagged under a bound no client can stay below, not under one no client reaches."""
    from llmfirst_kit.bench.ws_load import bench_serve_async

    result = await bench_serve_async(clients=2, queries=1, url=server.ws_url, max_tokens=4, timeout_s=300,
                                     client_cpu_bound=1e-12)
    assert result["runs_completed"] == 2 and result["client_cpu_s"] > 0
    assert result["client_competed"] is True and result["client_cpu_bound"] == 1e-12
    assert client_cpu_check(result["client_cpu_s"], result["wall_s"], bound=64.0)["client_competed"] is False


def test_a_killed_sweep_resumes_from_its_file(tmp_path, backend):
    """A real kill: ``llmfirst bench load --jsonl`` in a child process, SIGKILLed once the first level has
    ended and the second is under way; the file keeps every request that ended, and the same sweep run again
    skips the finished level and runs the interrupted one whole."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "killed.jsonl"
    argv = ["--model", TEST_MODEL, "--threads", "1", "--arrival", "constant", "--rates", "8,0.5", "--requests",
            "3", "--max-tokens", "4", "--jsonl", str(path)]
    child = subprocess.Popen([sys.executable, "-m", "llmfirst_kit.cli", "bench", "load", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None:
            text = path.read_text() if path.exists() else ""
            if '"level_end"' in text and text.count('"request"') >= 4:  # level 2's first call has ended
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    cut = summarize_file(path)
    assert [lv["stopped"] for lv in cut["levels"]] == [None, "interrupted"]
    assert cut["levels"][0]["ok"] == 3 and 1 <= cut["levels"][1]["requests"] < 3

    code = main(["bench", "load", *argv, "--json"])  # the same sweep, in this process: resumes
    assert code == EXIT_OK
    done = summarize_file(path)
    assert done["resumed_levels"] == ["constant@8rps"] and done["levels"][0] == cut["levels"][0]
    assert done["levels"][1]["ok"] == 3 and done["levels"][1]["stopped"] is None
