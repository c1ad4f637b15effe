"""What runs inside one grid cell (the cell notebook, ``llmfirst_kit/assets/study.ipynb``): :func:`run_cell`
runs the queries x repeats (warm-up runs first, marked) and appends every
:class:`~llmfirst_kit.records.RunRecord` to ``records.jsonl`` through :class:`~llmfirst_kit.sinks.jsonl.RunLog`;
:func:`measure_cell_quality` writes perplexity / KL of local model files to ``quality.json``. An optional
per-answer 0-100 review (``judge_model``: the pipeline's own ``review`` stage) is part of the record but left
out of the latency figures (:func:`latency_view`).
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any, Callable

from ..backends import backend_options, capabilities, get_backend
from ..metrics import SLO, run_metrics
from ..pipeline import Pipeline, parse_preset
from ..records import RunRecord
from ..sinks.jsonl import RunLog
from .load import engine_parallel, load_levels, run_at_load
from .params import CellParams
from .quantization import local_files, model_id, quantization_label
from .store import QUALITY, RECORDS, StudyError, write_json

JUDGE_STAGES = ("review", "review.retry")


def make_backend(p: CellParams):
    """The cell's backend, given the parameters it takes (``n_ctx`` / ``n_threads`` go to embedded,
    ``ollama_host`` to ollama, ``openai_base_url`` / ``openai_response_format`` to openai)."""
    return get_backend(p.backend, **backend_options(
        p.backend, model=p.models[0], n_ctx=p.n_ctx, n_threads=p.n_threads or None, host=p.ollama_host or None,
        base_url=p.openai_base_url or None, response_format_style=p.openai_response_format,
        parallel=engine_parallel({"parallel": p.parallel, "concurrency": p.concurrency})))


def _line(rec: RunRecord, slo: SLO) -> str:
    m = run_metrics(latency_view(rec), slo)

    def s(v: float | None, scale: float = 1.0, unit: str = "s") -> str:
        return "n/a" if v is None else f"{v * scale:.2f}{unit}"

    q = rec.quality.get("score") if rec.quality else None
    lab = rec.labels
    return (f"{'warmup ' if rec.warmup else ''}{lab.get('model_id')} {rec.preset} {lab.get('query_id')} "
            f"r{lab.get('repeat')}: {rec.status} ttft={s(m.user_ttft_s)} tpot={s(m.answer_tpot_s, 1000, 'ms')} "
            f"e2e={s(m.e2e_s)} tokens={m.output_tokens} judge={q}"
            + (f" error={rec.error}" if rec.error else ""))


async def run_cell(p: CellParams, *, echo: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Run every model x quantization x preset x load level of ``p`` over its queries: warm-up runs (one at a
    time), then queries x repeats at the level (:func:`~.load.run_at_load`: ``concurrency`` in flight, or
    Poisson arrivals at ``rates``), each record appended (and fsync'ed) to ``output_dir/records.jsonl`` as soon
    as it ends, labelled with its load.
    Raises :class:`StudyError` if no measured run succeeded (the records stay)."""
    out = Path(p.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / RECORDS)
    backend = make_backend(p)
    counts = {"runs": 0, "ok": 0, "warmup": 0}
    first_error: str | None = None
    try:
        for model in p.models:
            for quant in p.quantizations:
                mid = model_id(p.backend, model, quant)
                qname, shipped = quantization_label(p.backend, model, quant)
                # an in-process backend pays a model load inside the call that first needs it: load the
                # judge now, not inside a measured run
                if p.judge_model and capabilities(p.backend).in_process:
                    await asyncio.to_thread(backend.load, p.judge_model)
                for preset in p.presets:
                    options = dict(backend=backend, model=mid, max_tokens=p.max_tokens, temperature=p.temperature,
                                   seed=p.seed, cache=p.effective_cache, slo=p.slo,
                                   judge_model=p.judge_model or None)  # +revise: its reviewer
                    warm = Pipeline.from_preset(preset, **options)
                    pipe = Pipeline.from_preset(preset, review=bool(p.judge_model), **options)
                    labels = {"study": p.study_name, "cell": p.cell, "backend": p.backend, "model": model,
                              "quantization": qname, "shipped": shipped, "model_id": mid, "preset": preset,
                              "judge_model": p.judge_model or None, "max_tokens": p.max_tokens,
                              "temperature": p.temperature, "seed": p.seed, "cache": p.effective_cache,
                              "n_threads": getattr(backend, "n_threads", None),
                              "parallel": getattr(backend, "parallel", None)}
                    for w in range(p.warmup_runs):
                        q = p.queries[w % len(p.queries)]
                        rec = await warm.run(q.query, labels={**labels, **q.labels(), "repeat": w}, warmup=True,
                                             log=log)
                        log.append(rec)
                        counts["warmup"] += 1
                        if echo:
                            echo(_line(rec, p.slo))
                    for level in load_levels({"concurrency": p.concurrency, "rates": p.rates}):
                        at = {**labels, **level.labels()}

                        async def one(q: Any, r: int, at: dict[str, Any] = at, pipe: Pipeline = pipe) -> None:
                            nonlocal first_error
                            rec = await pipe.run(q.query, labels={**at, **q.labels(), "repeat": r}, log=log)
                            log.append(rec)
                            counts["runs"] += 1
                            counts["ok"] += rec.status == "ok"
                            first_error = first_error or rec.error
                            if echo:
                                echo(_line(rec, p.slo))

                        jobs = [functools.partial(one, q, r) for r in range(p.repeats) for q in p.queries]
                        await run_at_load(level, jobs, seed=p.seed, key=f"{p.cell}:{mid}:{preset}")
    finally:
        await backend.aclose()
    if counts["ok"] == 0:
        raise StudyError(f"none of the {counts['runs']} measured runs succeeded; first error: {first_error}")
    return counts


def measure_cell_quality(p: CellParams) -> list[dict[str, Any]]:
    """Perplexity of each embedded model file of the cell on ``perplexity_text``, and its KL divergence
    against the model's shipped file (the shipped file against itself gives 0). Written to
    ``output_dir/quality.json``. Nothing for a server backend (no model file here, no logits) or without a
    text."""
    if not p.perplexity_text or not local_files(p.backend):
        return []
    from ..models import fidelity as quality

    rows = []
    for model in p.models:
        for quant in p.quantizations:
            mid = model_id(p.backend, model, quant)
            qname, shipped = quantization_label(p.backend, model, quant)
            reference = None if (model.endswith(".gguf") or os.sep in model) else model
            fq = quality.measure(mid, p.perplexity_text, reference=reference, n_tokens=p.perplexity_tokens,
                                 n_threads=p.n_threads or None)
            rows.append({**fq.to_dict(), "file": fq.model, "model": model, "quantization": qname, "shipped": shipped,
                         "model_id": mid,
                         "note": "reference = the shipped (already quantized) file, not a 16-bit original"})
    write_json(Path(p.output_dir) / QUALITY, rows)
    return rows


def latency_view(rec: RunRecord) -> RunRecord:
    """The record without its judge stages: the judge scores the answer after the user has it, so its
    time is not part of the pipeline's latency (the full record stays on disk). In a ``+revise`` preset the
    review is part of the flow (it decides the revision the user waits for) and stays."""
    if parse_preset(rec.preset).revise:
        return rec
    return rec.model_copy(update={"stages": [s for s in rec.stages if s.name not in JUDGE_STAGES]})
