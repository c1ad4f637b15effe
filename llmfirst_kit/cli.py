"""The ``llmfirst`` command: a thin layer over functions a notebook can call too.

Model text goes to stdout as it streams; stage labels, decisions and the metrics line go to stderr, so
``llmfirst ask ... > answer.txt`` keeps only what the model wrote (``sinks.console``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .backends import BACKENDS, backend_options, get_backend
from .errors import ContextOverflow, InvalidInput, KitError, UnknownModel
from .compliance import Transcript, sink_compliance
from .events import Error
from .metrics import call_metrics, run_metrics
from . import engine
from .models import DEFAULT_MODEL, known_names, status
from .pipeline import PRESETS, Pipeline
from .records import RunRecord
from .sinks.jsonl import RunLog
from .sinks.console import ConsoleSink

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130
BAD_INPUT_CODES = {cls.code for cls in (InvalidInput, ContextOverflow, UnknownModel)}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (at least 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmfirst", description="Streaming LLM-first pipelines, measured.")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="stream an answer and print its metrics")
    ask.add_argument("question")
    ask.add_argument("--backend", default="embedded", help=f"one of: {', '.join(BACKENDS)} (default embedded)")
    ask.add_argument("--model", default=None, help=f"registry name or .gguf path (embedded default {DEFAULT_MODEL})")
    ask.add_argument("--host", default=None, help="Ollama host (default: $OLLAMA_HOST or the client's default)")
    ask.add_argument("--base-url", default=None, help="OpenAI-compatible server URL (default: $OPENAI_BASE_URL)")
    ask.add_argument("--response-format", default="json_schema", choices=("json_schema", "json_object"),
                     help="how the openai backend sends JSON schemas (json_object for llama-cpp-python's server)")
    ask.add_argument("--max-tokens", type=_positive_int, default=512)
    ask.add_argument("--preset", default="direct", help=f"one of: {', '.join(PRESETS)} (default direct)")
    ask.add_argument("--rewrite", action="store_true", help="add the query-rewrite stage")
    ask.add_argument("--review", action="store_true", help="add the LLM judge stage")
    ask.add_argument("--analysis-first", action="store_true",
                     help="staged: run the visible analysis before the strategy decision")
    ask.add_argument("--judge-model", default=None)
    ask.add_argument("--fast-model", default=None, help="the cascade's opening model")
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--log", default=None, help="append the run record to this JSONL file")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    doctor = sub.add_parser("doctor", help="this machine's CPU and the embedded engine configuration chosen for it")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--reprobe", action="store_true", help="probe again instead of using the cached verdict")

    models = sub.add_parser("models", help="the embedded model registry and each model's status")
    models.add_argument("--json", action="store_true")
    # -- issue 5: quantized variants and studies (handlers: quantize_cmd, study_cmd) --
    msub = models.add_subparsers(dest="models_command")
    mq = msub.add_parser("quantize", help="build quantized variants of a shipped model into the cache")
    mq.add_argument("name", help="a registry model, e.g. smollm2-135m")
    mq.add_argument("--to", required=True, help="comma-separated types, e.g. Q8_0,Q5_K_M,Q4_0,Q3_K_S,Q2_K")
    mq.add_argument("--force", action="store_true", help="rebuild variants that exist")
    mq.add_argument("--threads", type=_positive_int, default=None)
    mq.add_argument("--json", action="store_true")
    study = sub.add_parser("study", help="papermill study grids: run (resumable) and report")
    ssub = study.add_subparsers(dest="study_command", required=True)
    sr = ssub.add_parser("run", help="run or resume a study (one notebook execution per grid cell)")
    sr.add_argument("study_file", help="the study YAML, e.g. studies/example.yaml")
    sr.add_argument("--out", default=None, help="study directory (default: output_dir in the YAML)")
    sr.add_argument("--no-report", action="store_true", help="skip summary.csv / report.html at the end")
    sr.add_argument("--no-progress", action="store_true")
    sr.add_argument("--executor", choices=("local", "dask"), default="local",
                    help="local: cell after cell here; dask: on the workers of a Dask scheduler (--scheduler)")
    sr.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="the Dask scheduler for --executor dask, e.g. tcp://HOST:8786 (started with `dask scheduler`)")
    sr.add_argument("--json", action="store_true")
    sp = ssub.add_parser("report", help="aggregate a study directory into summary.csv and report.html")
    sp.add_argument("study_dir")
    sp.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="side-by-side benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    ov = bsub.add_parser("overhead", help="kit embedded backend vs raw llama-cpp-python stream")
    ov.add_argument("--model", default=DEFAULT_MODEL)
    ov.add_argument("--runs", type=_positive_int, default=5)
    ov.add_argument("--max-tokens", type=_positive_int, default=128)
    ov.add_argument("--json", action="store_true")
    en = bsub.add_parser("engine", help="decode tokens/s with extra buffers on vs off, each in a child process")
    en.add_argument("--model", default=DEFAULT_MODEL)
    en.add_argument("--runs", type=_positive_int, default=3)
    en.add_argument("--max-tokens", type=_positive_int, default=128)
    en.add_argument("--threads", type=_positive_int, default=None)
    en.add_argument("--json", action="store_true")
    pl = bsub.add_parser("pipeline", help="user-visible TTFT of presets, interleaved")
    pl.add_argument("--model", default=None)
    pl.add_argument("--presets", default="direct,staged,staged:analysis-first,cascade",
                    help="comma-separated; 'staged:analysis-first' is the staged preset with the analysis first")
    pl.add_argument("--repeats", type=_positive_int, default=1)
    pl.add_argument("--max-tokens", type=_positive_int, default=256)
    pl.add_argument("--json", action="store_true")
    bv = bsub.add_parser("view", help="a run with and without the live notebook view attached")
    bv.add_argument("--model", default="smollm2-135m")
    bv.add_argument("--runs", type=_positive_int, default=3)
    bv.add_argument("--max-tokens", type=_positive_int, default=256)
    bv.add_argument("--json", action="store_true")
    bs = bsub.add_parser("serve", help="N concurrent WebSocket clients against the server, on loopback")
    bs.add_argument("--clients", type=_positive_int, default=20)
    bs.add_argument("--queries", type=_positive_int, default=3)
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--preset", default="direct")
    bs.add_argument("--max-tokens", type=_positive_int, default=32)
    bs.add_argument("--threads", type=_positive_int, default=None, help="decoding threads (default: all cores)")
    bs.add_argument("--json", action="store_true")
    bl = bsub.add_parser("load", help="latency and throughput against concurrency (a bounded load sweep)")
    bl.add_argument("--backend", default="embedded", help=f"one of: {', '.join(BACKENDS)} (default embedded)")
    bl.add_argument("--model", default=None, help="model name (default: the backend's default)")
    bl.add_argument("--host", default=None, help="Ollama host, e.g. the kit's own server http://127.0.0.1:8765")
    bl.add_argument("--base-url", default=None, help="OpenAI-compatible server URL (default $OPENAI_BASE_URL)")
    bl.add_argument("--serve-kit", action="store_true",
                    help="start the kit's own server on a free loopback port and load its Ollama-compatible API")
    bl.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels (default 1,2,4,8)")
    bl.add_argument("--requests", type=_positive_int, default=16, help="requests per level (default 16)")
    bl.add_argument("--max-tokens", type=_positive_int, default=64)
    bl.add_argument("--max-error-rate", type=float, default=0.5, help="stop when a level's error rate passes this")
    bl.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole sweep (default 600)")
    bl.add_argument("--threads", type=_positive_int, default=None, help="decoding threads (embedded, --serve-kit)")
    bl.add_argument("--html", default=None, help="write the latency-vs-concurrency chart to this HTML file")
    bl.add_argument("--json", action="store_true")

    serve = sub.add_parser("serve", help="WebSocket + Ollama-compatible HTTP API over the embedded models")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_positive_int, default=8765)
    serve.add_argument("--token", default=None, help="required off loopback (or set $LLMFIRST_TOKEN)")
    serve.add_argument("--model", default=None, help=f"default model (default {DEFAULT_MODEL})")
    serve.add_argument("--threads", type=_positive_int, default=None, help="decoding threads (default: all cores)")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="calls that may wait per model; more get 503 (default $LLMFIRST_MAX_QUEUE, else 64)")
    serve.add_argument("--allow-backend", action="append", choices=("ollama", "openai"), default=[],
                       help="let WebSocket runs use this backend (your Ollama server / OpenAI key); repeatable")
    serve.add_argument("--ws-idle-timeout", type=float, default=300.0,
                       help="close a WebSocket without messages or runs after this many seconds (0: never)")
    return parser


# ------------------------------------------------------------------------------------------------ ask

def _summary(rec: RunRecord, pipe: Pipeline, transcript: Transcript | None = None) -> dict[str, Any]:
    """The --json object: the answer call's metrics at the top level, the run's beside them. ``compliance`` is
    the figure of the sink that shows it: the terminal's ``transcript``, or else this object itself (its
    ``text`` and its stages' texts are what it presents as the models' words)."""
    visible = [s for s in rec.stages if s.visible]
    answer = visible[-1].call if visible else (rec.stages[-1].call if rec.stages else None)
    cm = call_metrics(answer, pipe.slo) if answer else {}
    rm = run_metrics(rec, pipe.slo)
    out = {
        "status": rec.status, "error": rec.error, "run_id": rec.run_id,
        "text": answer.text if answer else "", "model": answer.model if answer else rec.labels.get("model"),
        "backend": rec.labels.get("backend"), "preset": rec.preset,
        "ttft_s": cm.get("ttft_s"), "e2e_s": cm.get("e2e_s"), "tpot_s": cm.get("tpot_s"),
        "output_tokens": cm.get("output_tokens"), "prompt_tokens": cm.get("prompt_tokens"),
        "tokens_per_s": cm.get("tokens_per_s"), "token_count_source": cm.get("token_count_source"),
        "load_s": cm.get("load_s"), "cold_load": cm.get("cold_load"),
        "slo": cm.get("slo", {"ttft": None, "tpot": None, "e2e": None}),
        "user_ttft_s": rm["user_ttft_s"], "run_e2e_s": rm["e2e_s"], "model_calls": rm["model_calls"],
        "kit_overhead_s": rm["kit_overhead_s"], "compliance": None, "sink": None,
        "prompt_echo_chars": rm["prompt_echo_chars"], "decision_compliance": rm["decision_compliance"],
        "decisions": {k: {"value": v.get("value"), "status": v["status"], "used": v.get("used", v.get("value")),
                          "source": v.get("source", "model"),
                          **{f: v[f] for f in ("method", "probabilities", "plan") if v.get(f) is not None}}
                      for k, v in rec.decisions.items()},
        "quality": rm["quality"], "query": rec.query,
        "stages": [
            {"name": s.name, "model": s.call.model, "text": s.call.text, "visible": s.visible,
             "status": s.call.status, **{k: call_metrics(s.call)[k] for k in ("ttft_s", "tpot_s", "e2e_s",
                                                                               "output_tokens")}}
            for s in rec.stages
        ],
    }
    if transcript is None:  # this object is the sink: the text it presents as the models' words
        transcript = Transcript("json")
        for stage in out["stages"]:
            if stage["visible"]:
                transcript.content(stage["name"], stage["text"])
    report = sink_compliance(rec, transcript)
    out["compliance"], out["sink"] = report.compliance, report.to_dict()
    return out


def _r(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _metrics_line(summary: dict[str, Any]) -> str:
    def f(v: Any, unit: str = "s", scale: float = 1.0) -> str:
        return "n/a" if v is None else f"{v * scale:.3f}{unit}" if unit == "s" else f"{v * scale:.1f}{unit}"

    slo = " ".join(f"{k}:{'ok' if v else ('n/a' if v is None else 'MISS')}" for k, v in summary["slo"].items())
    parts = [f"status={summary['status']}", f"preset={summary['preset']}", f"model={summary['model']}",
             f"user_ttft={f(summary['user_ttft_s'])}", f"ttft={f(summary['ttft_s'])}",
             f"tpot={f(summary['tpot_s'], 'ms', 1000)}", f"e2e={f(summary['e2e_s'])}",
             f"tokens={summary['output_tokens']} ({summary['token_count_source']})",
             f"tok/s={f(summary['tokens_per_s'], '')}", f"compliance={_r(summary['compliance'])}",
             f"echo={summary['prompt_echo_chars']}", f"decisions={_r(summary['decision_compliance'])}",
             f"quality={summary['quality']}", f"slo[{slo}]"]
    return " ".join(parts)


async def ask(args: argparse.Namespace) -> int:
    backend = get_backend(args.backend, **backend_options(args.backend, host=args.host, base_url=args.base_url,
                                                          response_format_style=args.response_format))
    pipe = Pipeline.from_preset(args.preset, backend=backend, model=args.model, rewrite=args.rewrite,
                                review=args.review, judge_model=args.judge_model, fast_model=args.fast_model,
                                analysis_first=args.analysis_first, max_tokens=args.max_tokens,
                                temperature=args.temperature, seed=args.seed)
    log = RunLog(args.log) if args.log else None
    run = pipe.start(args.question, log=log)
    error_code: str | None = None
    # the terminal sink; with --json nothing streams and the JSON object is the sink (see _summary)
    sink = ConsoleSink(labels=sum(s.visible for s in pipe.stages) > 1) if not args.json else None
    try:
        async for ev in run:
            if isinstance(ev, Error):
                error_code = ev.code
                if sink is None:
                    print(f"llmfirst: error [{ev.code}] in stage {ev.stage}: {ev.message}", file=sys.stderr)
            if sink is not None:
                sink.handle(ev)
    except asyncio.CancelledError:
        pass
    rec = run.record
    if log is not None:
        log.append(rec)
    if sink is not None:
        sink.close()
        summary = _summary(rec, pipe, sink.transcript)
        sink.line(_metrics_line(summary))
    else:
        print(json.dumps(_summary(rec, pipe), ensure_ascii=False))
    if error_code in BAD_INPUT_CODES:  # found before a model call (e.g. a prompt longer than the context)
        return EXIT_BAD_INPUT
    return {"ok": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(rec.status, EXIT_FAILED)


# --------------------------------------------------------------------------------------------- models

def models_cmd(args: argparse.Namespace) -> int:
    rows = [status(name) for name in known_names()]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return EXIT_OK
    for r in rows:
        state = "verified" if r["verified"] else ("installed" if r["installed"] else "missing")
        default = " (default)" if r["name"] == DEFAULT_MODEL else ""
        print(f"{r['name']:<20} {r['title']:<30} {r['quantization']:<7} {r['parameters']:>5} "
              f"{r['size'] / 1e6:7.1f} MB  {'instruct' if r['instruct'] else 'base':<8} {state}{default}")
        if r.get("problem"):
            print(f"    {r['problem']}")
    print(_engine_line(engine.choice()))
    return EXIT_OK


def _engine_line(c: engine.EngineChoice) -> str:
    return f"engine: {c.config} (extra buffers {'on' if c.use_extra_bufts else 'off'}) on {c.cpu_model}: {c.reason}"


def doctor_cmd(args: argparse.Namespace) -> int:
    c = engine.choice(refresh=args.reprobe)
    if args.json:
        print(json.dumps(c.to_dict(), ensure_ascii=False, indent=2))
        return EXIT_OK
    print(f"cpu:      {c.cpu_model} (AMX {'yes' if c.cpu_amx else 'no'})")
    print(f"llama.cpp: llama-cpp-python {c.llama_cpp_version}; {c.build_features}")
    print(_engine_line(c))
    probe = c.probe
    if probe:
        cost = f"{probe['wall_s']:.1f} s" if "wall_s" in probe else "?"
        print(f"probe:    {probe['status']}, {cost}{' (cached from ' + c.decided_at + ')' if c.cached else ''}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- bench

async def bench_cmd(args: argparse.Namespace) -> int:
    from .bench.engine import compare
    from .bench.overhead import overhead
    from .bench.pipeline import pipeline as bench_pipeline

    if args.bench == "engine":
        result = compare(model=args.model, runs=args.runs, tokens=args.max_tokens, n_threads=args.threads)
    elif args.bench == "overhead":
        result = await overhead(model=args.model, runs=args.runs, max_tokens=args.max_tokens)
    elif args.bench == "view":
        from .bench.view import view_overhead

        result = await view_overhead(model=args.model, runs=args.runs, max_tokens=args.max_tokens)
    elif args.bench == "load":
        from .bench.load_sweep import format_sweep, load_target, parse_concurrency, sweep

        levels = parse_concurrency(args.concurrency)
        async with load_target(args.backend, host=args.host, base_url=args.base_url, serve_kit=args.serve_kit,
                               model=args.model, n_threads=args.threads) as target:
            result = await sweep(target, model=args.model, concurrency=levels, requests=args.requests,
                                 max_tokens=args.max_tokens, max_error_rate=args.max_error_rate,
                                 time_limit_s=args.time_limit)
        if args.html:
            from .sinks.charts import load_sweep, save_html

            result["chart"] = str(save_html(load_sweep(result), args.html))
        print(json.dumps(result, ensure_ascii=False) if args.json else format_sweep(result))
        return EXIT_FAILED if result["stopped_early"] == "error rate" else EXIT_OK
    elif args.bench == "serve":
        from .bench.ws_load import bench_serve_async, format_bench

        result = await bench_serve_async(args.clients, args.queries, model=args.model, preset=args.preset,
                                         max_tokens=args.max_tokens, n_threads=args.threads)
        if not args.json:
            print(format_bench(result))
            return EXIT_OK
    else:
        presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
        result = await bench_pipeline(model=args.model, presets=presets, repeats=args.repeats,
                                      max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return EXIT_OK


# ------------------------------------------------------------------------------- quantize and study (issue 5)

def quantize_cmd(args: argparse.Namespace) -> int:
    from .models.quantize import quantize

    rows = []
    for qtype in [t.strip() for t in args.to.split(",") if t.strip()]:
        v = quantize(args.name, qtype, force=args.force, n_threads=args.threads)
        rows.append(v.info())
        if not args.json:
            how = f"built in {v.built_s:.1f} s" if v.built_s is not None else "already built"
            print(f"{v.name:<28} {v.size / 1e6:8.1f} MB  sha256 {v.sha256}  {how}\n    {v.path}")
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        print("(re-quantized from the shipped, already quantized file; use as --model NAME@TYPE)", file=sys.stderr)
    return EXIT_OK


def study_cmd(args: argparse.Namespace) -> int:
    from . import study

    if args.study_command == "report":
        paths = study.build_report(args.study_dir)
        print(json.dumps(paths) if args.json else "\n".join(f"{k}: {v}" for k, v in paths.items()))
        return EXIT_OK
    result = study.run_study(args.study_file, output_dir=args.out, progress=not args.no_progress,
                             report=not args.no_report, executor=args.executor, scheduler=args.scheduler)
    print(result.describe(), file=sys.stderr)
    if args.json:
        print(json.dumps({"output_dir": str(result.output_dir), "wall_s": result.wall_s, "report": result.report,
                          "cells": [vars(c) for c in result.cells]}, ensure_ascii=False))
    return EXIT_OK if result.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ask":
            return asyncio.run(ask(args))
        if args.command == "models":
            return quantize_cmd(args) if args.models_command == "quantize" else models_cmd(args)
        if args.command == "doctor":
            return doctor_cmd(args)
        if args.command == "study":
            return study_cmd(args)
        if args.command == "bench":
            return asyncio.run(bench_cmd(args))
        if args.command == "serve":
            from .serve import ServerConfig, serve

            config = ServerConfig(default_model=args.model or DEFAULT_MODEL, n_threads=args.threads,
                                  max_queue=args.max_queue, allowed_backends=("embedded", *args.allow_backend),
                                  idle_timeout_s=args.ws_idle_timeout or None)
            serve(args.host, args.port, args.token, config=config)
            return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except InvalidInput as exc:
        return _fail(args, exc, EXIT_BAD_INPUT)
    except KitError as exc:
        return _fail(args, exc, EXIT_FAILED)
    return EXIT_FAILED


def _fail(args: argparse.Namespace, exc: KitError, code: int) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"status": "error", "code": exc.code, "error": str(exc)}, ensure_ascii=False))
    print(f"llmfirst: error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
