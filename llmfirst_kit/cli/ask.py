"""``llmfirst ask QUESTION``: stream an answer through a pipeline preset and print its metrics."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from ..backends import BACKENDS, DEFAULT_BACKEND, backend_options, get_backend
from ..compliance import Transcript, sink_compliance
from ..events import Error
from ..metrics import call_metrics, run_metrics
from ..models import DEFAULT_MODEL
from ..pipeline import PRESET_NAMES, Pipeline
from ..records import RunRecord
from ..sinks.console import ConsoleSink
from ..sinks.jsonl import RunLog
from .command import BAD_INPUT_CODES, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, POSITIVE, Command

# the answer call's metrics at the top level of the --json object, and each stage's
ANSWER_FIELDS = ("ttft_s", "e2e_s", "tpot_s", "output_tokens", "prompt_tokens", "tokens_per_s", "token_count_source",
                 "load_s", "cold_load")
STAGE_FIELDS = ("ttft_s", "tpot_s", "e2e_s", "output_tokens")


def summary(rec: RunRecord, pipe: Pipeline, transcript: Transcript | None = None) -> dict[str, Any]:
    """The --json object: the answer call's metrics at the top level, the run's beside them; ``slo`` is the
    run's verdict (the user-visible TTFT, the answer's TPOT, the run's E2E: what a user waits for, the paper's
    goals), not the answer call's, which in a staged run starts after the invisible stages. ``compliance`` is
    the figure of the sink that shows it: the terminal's ``transcript``, or else this object itself (its
    ``text`` and its stages' texts are what it presents as the models' words)."""
    answer = rec.answer_call(or_last=True)
    cm = call_metrics(answer, pipe.slo) if answer else None
    rm = run_metrics(rec, pipe.slo)
    out = {
        "status": rec.status, "error": rec.error, "run_id": rec.run_id,
        "text": answer.text if answer else "", "model": answer.model if answer else rec.labels.get("model"),
        "backend": rec.labels.get("backend"), "preset": rec.preset,
        **{k: getattr(cm, k, None) for k in ANSWER_FIELDS},
        "slo": rm.slo.as_dict(),
        "user_ttft_s": rm.user_ttft_s, "run_e2e_s": rm.e2e_s, "model_calls": rm.model_calls,
        "kit_overhead_s": rm.kit_overhead_s, "compliance": None, "sink": None,
        "prompt_echo_chars": rm.prompt_echo_chars, "decision_compliance": rm.decision_compliance,
        "decisions": {k: {"value": v.value, "status": v.status, "used": v.used, "source": v.source,
                          "method": v.method, **{f: getattr(v, f) for f in ("probabilities", "plan")
                                                 if getattr(v, f) is not None}}
                      for k, v in rec.decisions.items()},
        "quality": rm.quality, "query": rec.query,
        "stages": [
            {"name": s.name, "model": s.call.model, "text": s.call.text, "visible": s.visible,
             "status": s.call.status, **{k: getattr(m, k) for k in STAGE_FIELDS}}
            for s in rec.stages for m in (call_metrics(s.call),)
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


def metrics_line(summary: dict[str, Any]) -> str:
    def f(v: Any, unit: str = "s", scale: float = 1.0) -> str:
        return "n/a" if v is None else f"{v * scale:.3f}{unit}" if unit == "s" else f"{v * scale:.1f}{unit}"

    slo = " ".join(f"{k}:{'ok' if v else ('n/a' if v is None else 'MISS')}" for k, v in summary["slo"].items()) \
        if summary["status"] == "ok" else f"no verdict: run {summary['status']}"  # nothing to judge of a cut run
    parts = [f"status={summary['status']}", f"preset={summary['preset']}", f"model={summary['model']}",
             f"user_ttft={f(summary['user_ttft_s'])}", f"ttft={f(summary['ttft_s'])}",
             f"tpot={f(summary['tpot_s'], 'ms', 1000)}", f"e2e={f(summary['e2e_s'])}",
             f"tokens={summary['output_tokens']} ({summary['token_count_source']})",
             f"tok/s={f(summary['tokens_per_s'], '')}", f"compliance={_r(summary['compliance'])}",
             f"echo={summary['prompt_echo_chars']}", f"decisions={_r(summary['decision_compliance'])}",
             f"quality={summary['quality']}", f"slo[{slo}]"]
    return " ".join(parts)


async def ask(question: str, *, backend: str, model: str | None, host: str | None, base_url: str | None,
              response_format: str, max_tokens: int, preset: str, rewrite: bool, review: bool, revise: bool,
              analysis_first: bool, judge_model: str | None, fast_model: str | None, temperature: float, seed: int, log: str | None,
              as_json: bool) -> int:
    chosen = get_backend(backend, **backend_options(backend, host=host, base_url=base_url,
                                                    response_format_style=response_format))
    pipe = Pipeline.from_preset(preset, backend=chosen, model=model, rewrite=rewrite, review=review,
                                revise=revise, judge_model=judge_model, fast_model=fast_model, analysis_first=analysis_first,
                                max_tokens=max_tokens, temperature=temperature, seed=seed)
    run_log = RunLog(log) if log else None
    run = pipe.start(question, log=run_log)
    error_code: str | None = None
    # the terminal sink; with --json nothing streams and the JSON object is the sink (see summary)
    sink = ConsoleSink(labels=sum(s.visible for s in pipe.stages) > 1) if not as_json else None
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
    if run_log is not None:
        run_log.append(rec)
    if sink is not None:
        sink.close()
        sink.line(metrics_line(summary(rec, pipe, sink.transcript)))
    else:
        print(json.dumps(summary(rec, pipe), ensure_ascii=False))
    if error_code in BAD_INPUT_CODES:  # found before a model call (e.g. a prompt longer than the context)
        return EXIT_BAD_INPUT
    return {"ok": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(rec.status, EXIT_FAILED)


@click.command("ask", cls=Command)
@click.argument("question")
@click.option("--backend", default=DEFAULT_BACKEND, help=f"one of: {', '.join(BACKENDS)} (default {DEFAULT_BACKEND})")
@click.option("--model", default=None, help=f"registry name or .gguf path (embedded default {DEFAULT_MODEL})")
@click.option("--host", default=None, help="Ollama host (default: $OLLAMA_HOST or the client's default)")
@click.option("--base-url", default=None, help="OpenAI-compatible server URL (default: $OPENAI_BASE_URL)")
@click.option("--response-format", default="json_schema", type=click.Choice(["json_schema", "json_object"]),
              help="how the openai backend sends JSON schemas (json_object for llama-cpp-python's server)")
@click.option("--max-tokens", type=POSITIVE, default=512)
@click.option("--preset", default="direct", help=f"one of: {', '.join(PRESET_NAMES)}, each with optional "
                                                 f"+rewrite, +revise (default direct)")
@click.option("--rewrite", is_flag=True, help="add the query-rewrite stage")
@click.option("--review", is_flag=True, help="add the LLM judge stage")
@click.option("--revise", is_flag=True, help="the judge reviews the answer and decides whether a revision stage "
                                             "streams an improved one (= the +revise modifier)")
@click.option("--analysis-first", is_flag=True, help="staged: run the visible analysis before the strategy decision")
@click.option("--judge-model", default=None)
@click.option("--fast-model", default=None, help="the cascade's opening model")
@click.option("--temperature", type=float, default=0.0)
@click.option("--seed", type=int, default=0)
@click.option("--log", default=None, help="append the run record to this JSONL file")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of streaming text")
def command(question: str, **options: Any) -> int:
    """stream an answer and print its metrics"""
    return asyncio.run(ask(question, **options))
