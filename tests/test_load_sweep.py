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
from llmfirst_kit.bench.load_sweep import parse_concurrency, sweep
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

    for argv, fix in ((["--concurrency", "0,x"], "e.g. 1,2,4,8"), (["--max-error-rate", "1.5"], "between 0 and 1"),
                      (["--time-limit", "0"], "positive number of seconds")):
        code = main(["bench", "load", "--model", TEST_MODEL, *argv])
        out, err = capsys.readouterr()
        assert code == EXIT_BAD_INPUT and fix in err and not out  # before any request


async def test_serve_kit_through_its_openai_api(loaded):
    from llmfirst_kit.bench.load_sweep import load_target

    async with load_target("openai", serve_kit=True, model=TEST_MODEL, n_threads=loaded.n_threads) as target:
        result = await sweep(target, concurrency=[2], requests=2, max_tokens=4, queries=QUERIES)
    assert result["backend"] == "openai" and result["target"].endswith("/v1")
    [level] = result["levels"]
    assert (level["ok"], level["errors"]) == (2, 0) and 2 <= level["output_tokens"] <= 8
