"""``llmfirst bench ...``: side-by-side benchmarks, each a function of :mod:`llmfirst_kit.bench`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import click

from ..backends import BACKENDS, DEFAULT_BACKEND
from ..models import DEFAULT_MODEL
from .command import EXIT_FAILED, EXIT_OK, POSITIVE, Group

JSON_HELP = "print one JSON object"
REPEATS_HELP = ("run the whole benchmark N times: each headline figure's mean and 95 % interval across runs "
                "(default 1)")


def _print(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return EXIT_OK


@click.group("bench", cls=Group)
def command() -> None:
    """side-by-side benchmarks"""


@command.command("overhead", short_help="kit embedded backend vs a plain Llama.generate loop, paired")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--pairs", type=POSITIVE, default=10, help="interleaved raw/kit pairs (at least 2; default 10)")
@click.option("--runs", type=POSITIVE, default=None, hidden=True, help="the old name of --pairs")
@click.option("--max-tokens", type=POSITIVE, default=128)
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads, both sides (default: all cores)")
@click.option("--repeats", type=POSITIVE, default=1, help=REPEATS_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def overhead(model: str, pairs: int, runs: int | None, max_tokens: int, threads: int | None, repeats: int,
             as_json: bool) -> int:
    """kit embedded backend vs a plain Llama.generate loop: throughput ratio and TTFT added, 95 % intervals"""
    from ..bench.overhead import GOALS, overhead as run
    from ..bench.repeats import repeat

    keys = ("throughput_ratio", "ttft_added_ms", "tpot_ratio", "raw_tokens_per_s_median", "kit_tokens_per_s_median")
    goals = {"throughput_ratio": (GOALS["throughput_ratio"], True), "ttft_added_ms": (GOALS["ttft_added_ms"], False)}
    once = lambda: run(model=model, pairs=runs or pairs, max_tokens=max_tokens, n_threads=threads)  # noqa: E731
    return _print(asyncio.run(repeat(once, repeats, keys, goals)), as_json)


@command.command("engine", short_help="decode tokens/s with extra buffers on vs off, each in a child process")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--runs", type=POSITIVE, default=3)
@click.option("--max-tokens", type=POSITIVE, default=128)
@click.option("--threads", type=POSITIVE, default=None)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def engine(model: str, runs: int, max_tokens: int, threads: int | None, as_json: bool) -> int:
    """decode tokens/s with extra buffers on vs off, each in a child process"""
    from ..bench.engine import compare

    return _print(compare(model=model, runs=runs, tokens=max_tokens, n_threads=threads), as_json)


@command.command("batch", short_help="the embedded engine's batch curve: aggregate tokens/s and step time per batch size")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--sizes", default="1,2,4,8,16", help="comma-separated batch sizes (default 1,2,4,8,16)")
@click.option("--max-tokens", type=POSITIVE, default=48)
@click.option("--rounds", type=POSITIVE, default=2, help="interleaved rounds over the sizes; medians (default 2)")
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def batch(model: str, sizes: str, max_tokens: int, rounds: int, threads: int | None, as_json: bool) -> int:
    """aggregate decode tokens/s and step time when 1, 2, 4, 8, 16 calls decode together"""
    from ..bench.batch import batch_curve
    from ..bench.load_sweep import parse_concurrency

    from ..errors import InvalidInput

    try:
        levels = parse_concurrency(sizes)
    except InvalidInput:
        raise InvalidInput(f"--sizes must be positive whole numbers separated by commas, e.g. 1,2,4,8,16; "
                           f"got {sizes!r}") from None
    result = asyncio.run(batch_curve(model=model, sizes=levels, max_tokens=max_tokens,
                                     rounds=rounds, n_threads=threads))
    if as_json:
        return _print(result, True)
    print(f"{result['model']} on {result['cpu_model']} (engine {result['engine']}, {result['n_threads']} threads)")
    print(f"{'sequences':>9} {'tokens/s':>9} {'step ms':>8} {'x one':>6}")
    for row in result["rows"]:
        print(f"{row['sequences']:>9} {row['aggregate_tokens_per_s']:>9} {row['step_ms']:>8} {row['vs_one']:>6}")
    return EXIT_OK


@command.command("pipeline", short_help="user-visible TTFT of presets, interleaved, every preset warmed")
@click.option("--model", default=None)
@click.option("--presets", default="direct,staged,staged:analysis-first,cascade",
              help="comma-separated, the first is the baseline; 'staged:analysis-first' is the staged preset with "
                   "the analysis first")
@click.option("--rounds", type=POSITIVE, default=1, help="rounds over the query set within one run (default 1)")
@click.option("--max-tokens", type=POSITIVE, default=256)
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--repeats", type=POSITIVE, default=1, help=REPEATS_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def pipeline(model: str | None, presets: str, rounds: int, max_tokens: int, threads: int | None, repeats: int,
             as_json: bool) -> int:
    """user-visible TTFT of presets, interleaved, cold per run; first-run costs reported apart"""
    from ..bench.pipeline import GOAL_STAGED_TTFT_RATIO, pipeline as run
    from ..bench.repeats import repeat

    names = tuple(p.strip() for p in presets.split(",") if p.strip())
    base = names[0] if names else ""  # no presets: the benchmark itself says what is accepted
    ratio = f"user_ttft_ratio_vs_{base}"
    keys = [f"{base}.user_ttft_s.median"] + [f"{p}.{ratio}" for p in names[1:]] + [
        f"{p}.decision_s.median" for p in names if p.startswith("staged")]
    goals = {f"{p}.{ratio}": (GOAL_STAGED_TTFT_RATIO, False) for p in names[1:] if p.startswith("staged")}
    once = lambda: run(model=model, presets=names, repeats=rounds, max_tokens=max_tokens,  # noqa: E731
                       n_threads=threads)
    return _print(asyncio.run(repeat(once, repeats, keys, goals)), as_json)


@command.command("decisions", short_help="the strategy decision over a query set: choices, agreement with labels, "
                                         "raw vs calibrated")
@click.option("--model", default=None)
@click.option("--queries", "queries_path", default=None, help="a JSONL/CSV query set with category labels "
              "(default: the kit's 72 queries)")
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--concurrency", type=POSITIVE, default=8,
              help="queries decided at once after the first (default 8; 1: one after another)")
@click.option("--rows", "show_rows", is_flag=True, help="also print each query's choices")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def decisions(model: str | None, queries_path: str | None, threads: int | None, concurrency: int, show_rows: bool,
              as_json: bool) -> int:
    """the strategy decision over a query set: distribution, agreement with labels, raw vs calibrated"""
    from ..bench.decisions import decisions as run
    from ..data import QUERIES

    result = asyncio.run(run(model=model, queries=queries_path or QUERIES, n_threads=threads,
                             concurrency=concurrency))
    if not (show_rows or as_json):
        result.pop("rows")
    return _print(result, as_json)


@command.command("judge", short_help="subtle-error detection of the judge with and without reference facts; "
                                     "judgments per minute one at a time vs batched")
@click.option("--answer-model", default="qwen2.5-coder-1.5b", help="writes the correct and the fact-changed answers")
@click.option("--judge-model", default="qwen2.5-coder-1.5b")
@click.option("--queries", "queries_path", default=None, help="a JSONL/CSV query set with reference facts "
              "(default: the kit's 72 queries)")
@click.option("--limit", type=int, default=0, help="the first N queries only (default: all)")
@click.option("--concurrency", type=POSITIVE, default=4, help="pairs judged at once (default 4)")
@click.option("--speed-pairs", type=int, default=4, help="pairs of the throughput comparison (0: none; default 4)")
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--out", default=None, help="write every answer, pair and judgment to this JSON file")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def judge(answer_model: str, judge_model: str, queries_path: str | None, limit: int, concurrency: int,
          speed_pairs: int, threads: int | None, out: str | None, as_json: bool) -> int:
    """subtle-error detection of the judge (reference-free vs reference-guided), both orders; throughput"""
    import sys

    from ..bench.judge import judge_bench
    from ..data import QUERIES

    result = asyncio.run(judge_bench(answer_model=answer_model, judge_model=judge_model,
                                     queries=queries_path or QUERIES, limit=limit, concurrency=concurrency,
                                     speed_pairs=speed_pairs, n_threads=threads, out=out,
                                     echo=lambda line: print(line, file=sys.stderr)))
    return _print(result, as_json)


@command.command("language", short_help="each preset against bare: answers in the query's language, key-fact recall")
@click.option("--model", default=None)
@click.option("--presets", default="bare,direct,staged", help="comma-separated (default bare,direct,staged)")
@click.option("--max-tokens", type=POSITIVE, default=48)
@click.option("--concurrency", type=POSITIVE, default=8, help="queries answered at once (default 8)")
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def language(model: str | None, presets: str, max_tokens: int, concurrency: int, threads: int | None,
             as_json: bool) -> int:
    """each preset against bare: the share of queries answered in their language, key-fact recall"""
    from ..bench.language import language as run

    names = [p.strip() for p in presets.split(",") if p.strip()]
    return _print(asyncio.run(run(model, names, max_tokens=max_tokens, concurrency=concurrency,
                                  n_threads=threads)), as_json)


@command.command("view", short_help="a run with and without the live notebook view attached")
@click.option("--model", default="smollm2-135m")
@click.option("--runs", type=POSITIVE, default=3)
@click.option("--max-tokens", type=POSITIVE, default=256)
@click.option("--repeats", type=POSITIVE, default=1, help=REPEATS_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def view(model: str, runs: int, max_tokens: int, repeats: int, as_json: bool) -> int:
    """a run with and without the live notebook view attached"""
    from ..bench.repeats import repeat
    from ..bench.view import view_overhead

    goals = {"throughput_ratio": (0.98, True), "messages_per_s": (20.0, False)}
    once = lambda: view_overhead(model=model, runs=runs, max_tokens=max_tokens)  # noqa: E731
    return _print(asyncio.run(repeat(once, repeats, ("throughput_ratio", "messages_per_s"), goals)), as_json)


@command.command("serve", short_help="N concurrent WebSocket clients against the server, on loopback")
@click.option("--clients", type=POSITIVE, default=20)
@click.option("--queries", type=POSITIVE, default=3)
@click.option("--model", default="smollm2-135m")
@click.option("--preset", default="direct")
@click.option("--max-tokens", type=POSITIVE, default=32)
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (default: all cores)")
@click.option("--parallel", type=POSITIVE, default=None,
              help="calls the server decodes at once (default $LLMFIRST_PARALLEL, else 4)")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def serve(clients: int, queries: int, model: str, preset: str, max_tokens: int, threads: int | None,
          parallel: int | None, as_json: bool) -> int:
    """N concurrent WebSocket clients against the server, on loopback"""
    from ..bench.ws_load import bench_serve_async, format_bench

    result = asyncio.run(bench_serve_async(clients, queries, model=model, preset=preset, max_tokens=max_tokens,
                                           n_threads=threads, parallel=parallel))
    if not as_json:
        print(format_bench(result))
        return EXIT_OK
    return _print(result, as_json)


@contextlib.asynccontextmanager
async def _quality_check(baseline: str | None, judge_model: str | None, max_tokens: int, threads: int | None):
    """``bench load --quality-baseline``: the baseline's answers and the judge, both embedded (checked before
    any load is sent: an unknown model fails first); None without a baseline."""
    if not baseline:
        yield None
        return
    from ..backends.embedded import EmbeddedBackend
    from ..bench.load_sweep import baseline_answers, judge_check, query_references
    from ..quality.judge import PairwiseJudge
    from ..study.spec import REFERENCE_MODEL

    answers = EmbeddedBackend(baseline, n_threads=threads)
    judge = PairwiseJudge(EmbeddedBackend(judge_model or REFERENCE_MODEL, n_threads=threads, n_ctx=4096),
                          judge_model or REFERENCE_MODEL)
    try:
        answers.resolve_model(baseline)
        judge.check()
        yield judge_check(judge, baseline_answers(answers, baseline, max_tokens=max_tokens), query_references())
    finally:
        await answers.aclose()
        await judge.backend.aclose()


@command.command("load", short_help="latency, throughput and goodput against load (a bounded, resumable load sweep)")
@click.option("--backend", default=DEFAULT_BACKEND, help=f"one of: {', '.join(BACKENDS)} (default {DEFAULT_BACKEND})")
@click.option("--model", default=None, help="model name (default: the backend's default)")
@click.option("--host", default=None, help="Ollama host, e.g. the kit's own server http://127.0.0.1:8765")
@click.option("--base-url", default=None, help="OpenAI-compatible server URL (default $OPENAI_BASE_URL)")
@click.option("--serve-kit", is_flag=True,
              help="start the kit's own server on a free loopback port and load its Ollama-compatible API "
                   "(its OpenAI one with --backend openai)")
@click.option("--arrival", type=click.Choice(["concurrency", "constant", "poisson"]), default="concurrency",
              help="concurrency: closed loop over --concurrency (default); constant / poisson: open loop, "
                   "requests sent on a schedule at each of --rates")
@click.option("--concurrency", default="1,2,4,8", help="comma-separated levels (default 1,2,4,8)")
@click.option("--rates", default=None, help="open loop: comma-separated request rates in requests/s, e.g. 0.5,1,2,4")
@click.option("--seed", type=int, default=0, help="seed of the Poisson arrival schedule (default 0)")
@click.option("--requests", type=POSITIVE, default=16, help="requests per level (default 16)")
@click.option("--max-tokens", type=POSITIVE, default=64)
@click.option("--max-error-rate", type=float, default=0.5,
              help="stop when a level's error rate passes this")
@click.option("--time-limit", type=float, default=600.0, help="seconds for the whole sweep (default 600)")
@click.option("--client-cpu-bound", type=float, default=None,
              help="cores of CPU the load client may use before a level is flagged as competing with the "
                   "engine (default 0.25)")
@click.option("--jsonl", default=None,
              help="append every request to this file as it ends; rerunning with the same file resumes the sweep")
@click.option("--from-file", is_flag=True,
              help="send nothing: rebuild the summary (and the --html chart) from --jsonl")
@click.option("--threads", type=POSITIVE, default=None, help="decoding threads (embedded, --serve-kit)")
@click.option("--parallel", type=POSITIVE, default=None,
              help="calls the embedded engine decodes at once (embedded, --serve-kit; default $LLMFIRST_PARALLEL, "
                   "else 4); --parallel 1 is one call at a time")
@click.option("--quality-baseline", default=None,
              help="quality-aware goodput: after the load, this embedded model answers each query (the baseline "
                   "system) and --judge compares every answer with it, both orders averaged, reference-guided")
@click.option("--judge", "judge_model", default=None,
              help="the judge of --quality-baseline (an embedded model; default qwen2.5-coder-1.5b)")
@click.option("--baseline-max-tokens", type=POSITIVE, default=512,
              help="max tokens of the baseline's answers (default 512)")
@click.option("--html", default=None, help="write the latency-vs-load chart to this HTML file")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def load(backend: str, model: str | None, host: str | None, base_url: str | None, serve_kit: bool, arrival: str,
         concurrency: str, rates: str | None, seed: int, requests: int, max_tokens: int, max_error_rate: float,
         time_limit: float, client_cpu_bound: float | None, jsonl: str | None, from_file: bool,
         threads: int | None, parallel: int | None, quality_baseline: str | None, judge_model: str | None,
         baseline_max_tokens: int, html: str | None, as_json: bool) -> int:
    """latency, throughput and goodput against load (a bounded, resumable load sweep)"""
    from ..bench.load_sweep import (CLOSED_LOOP, format_sweep, load_target, parse_concurrency, parse_rates,
                                    summarize_file, sweep)
    from ..errors import InvalidInput
    from ..metrics import CLIENT_CPU_BOUND

    if from_file:
        if not jsonl:
            raise InvalidInput("--from-file rebuilds the summary from a sweep's file; give it with --jsonl FILE")
        result = summarize_file(jsonl, client_cpu_bound=client_cpu_bound)
    else:
        if arrival == CLOSED_LOOP and rates is not None:
            raise InvalidInput("--rates is for an open-loop sweep; add --arrival poisson (or constant)")
        if arrival != CLOSED_LOOP and rates is None:
            raise InvalidInput(f"--arrival {arrival} needs --rates, e.g. --rates 0.5,1,2,4 (requests/s)")
        levels = parse_concurrency(concurrency) if arrival == CLOSED_LOOP else []
        rate_levels = parse_rates(rates) if rates is not None else None

        if judge_model and not quality_baseline:
            raise InvalidInput("--judge judges against a baseline; add --quality-baseline MODEL (e.g. "
                               "qwen2.5-coder-1.5b)")

        async def run() -> dict[str, Any]:
            async with contextlib.AsyncExitStack() as stack:
                quality = await stack.enter_async_context(_quality_check(quality_baseline, judge_model,
                                                                         baseline_max_tokens, threads))
                target = await stack.enter_async_context(load_target(
                    backend, host=host, base_url=base_url, serve_kit=serve_kit, model=model, n_threads=threads,
                    parallel=parallel))
                return await sweep(target, model=model, concurrency=levels or (1,), requests=requests, quality=quality,
                                   max_tokens=max_tokens, max_error_rate=max_error_rate, time_limit_s=time_limit,
                                   arrival=arrival, rates=rate_levels, seed=seed, jsonl=jsonl,
                                   client_cpu_bound=CLIENT_CPU_BOUND if client_cpu_bound is None else client_cpu_bound,
                                   # a new port each run: named so that a rerun with the same --jsonl resumes
                                   target_name=(f"serve-kit:{target.name}" + (f":parallel={parallel}" if parallel
                                                                              else "")) if serve_kit else None)

        result = asyncio.run(run())
    if html:
        from ..sinks.charts import load_sweep, save_html

        result["chart"] = str(save_html(load_sweep(result), html))
    print(json.dumps(result, ensure_ascii=False) if as_json else format_sweep(result))
    return EXIT_FAILED if result["stopped_early"] == "error rate" else EXIT_OK
