"""Studies: "which model, quantization and pipeline meets TTFT < 3 s, TPOT < 100 ms, E2E < 120 s and
quality >= 80 % of the baseline?", answered by a grid of papermill executions that can be resumed.

Three layers, each usable alone:

- **one grid cell** (inside ``notebooks/study.ipynb``): :func:`notebook_parameters` validates the
  notebook's parameters before any model call, :func:`run_cell` runs the queries x repeats (warm-up runs
  first, marked) and appends every :class:`~llmfirst_kit.records.RunRecord` to ``records.jsonl`` through
  :class:`~llmfirst_kit.records.RunLog`; :func:`measure_cell_quality` writes perplexity / KL of embedded
  variants to ``quality.json``. An optional per-answer 0-100 review (``judge_model``: the pipeline's own
  ``review`` stage) is part of the record but left out of the latency figures (:func:`latency_view`).
- **the runner** (:func:`run_study`, ``llmfirst study run STUDY.yaml``): expands the grid, executes the
  notebook once per cell with papermill (kernel ``llmfirst-kit``, working directory = the cell's
  directory, executed notebook kept beside the records), resumes (a cell is finished only when its
  ``DONE.json`` marker has been written atomically after its records; an unfinished cell directory is
  removed and the cell redone), records a failing cell's error and goes on, and records the environment
  once (``environment.json``). The baseline system is a cell too (:func:`baseline_cell`), run first.
- **the quality phase** (:mod:`llmfirst_kit.study_quality`, after the cells): the judge gate, then every
  configuration's complete answers judged pairwise, in both orders, against the baseline's; resumable
  (``DIR/judging/judgments.jsonl``).
- **the report** (:func:`build_report`, ``llmfirst study report DIR``): :func:`summary_table` per model x
  quantization x preset into ``summary.csv``, then ``notebooks/study_summary.ipynb`` executed and
  converted to a self-contained ``report.html`` (inputs hidden, plotly.js embedded).

Study directory layout::

    DIR/study.json  environment.json  status.json  summary.csv  report.ipynb  report.html
    DIR/judging/judgments.jsonl   (every gate pair and every judged pair, with both orders' verdicts)
    DIR/cells/<model>@<quantization>--<preset>/records.jsonl  quality.json  study.ipynb  DONE.json | FAILED.json

Labels (query category, language, repeat) are recorded beside each run for evaluation only; no model
ever sees them and nothing is decided from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from .backends import BACKENDS, get_backend
from .errors import InvalidInput, KitError
from .metrics import SLO, call_metrics, mbu, median_ci, percentiles, run_metrics, runs_frame
from .pipeline import PRESETS, Pipeline
from .records import RunLog, RunRecord, read_log

if TYPE_CHECKING:
    from distributed import Client

KERNEL_NAME = "llmfirst-kit"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STUDY_NOTEBOOK = PROJECT_ROOT / "notebooks" / "study.ipynb"
SUMMARY_NOTEBOOK = PROJECT_ROOT / "notebooks" / "study_summary.ipynb"

RECORDS = "records.jsonl"
QUALITY = "quality.json"
EXECUTED = "study.ipynb"
DONE = "DONE.json"
FAILED = "FAILED.json"
STUDY_FILE = "study.json"
ENVIRONMENT = "environment.json"
STATUS = "status.json"
SUMMARY_CSV = "summary.csv"

SHIPPED = "shipped"
JUDGE_STAGES = ("review", "review.retry")
CACHE_MODES = ("auto", "reuse", "cold")


class StudyError(KitError):
    code = "study_failed"


# ======================================================================================= parameters

@dataclass(frozen=True)
class Param:
    kind: type  # str, int, float, bool or list (of str)
    help: str


# The parameters of notebooks/study.ipynb (its `parameters` cell holds the defaults; a test keeps the two
# in step). One execution = one grid cell: the runner passes one-element lists; by hand, any lists work.
CELL_PARAMETERS: dict[str, Param] = {
    "backend": Param(str, f"one of: {', '.join(BACKENDS)}"),
    "models": Param(list, "model names: embedded registry names or .gguf paths; Ollama or OpenAI-compatible "
                          "server names"),
    "quantizations": Param(list, "embedded: 'shipped' or a type built by `llmfirst models quantize` (Q8_0, Q4_0, "
                                 "...); ollama: a tag suffix (model-<q>, e.g. q8_0) or 'default'"),
    "presets": Param(list, f"pipeline presets: {', '.join(PRESETS)} (staged:analysis-first too)"),
    "queries_file": Param(str, "JSONL (or CSV) with id, lang, category, query"),
    "query_ids": Param(list, "query ids to run, in this order ([] = the first query_limit queries)"),
    "query_limit": Param(int, "without query_ids: run the first N queries (0 = all)"),
    "repeats": Param(int, "measured runs of each query"),
    "warmup_runs": Param(int, "runs before measuring, per model x quantization x preset (recorded, marked warmup)"),
    "seed": Param(int, "sampling seed"),
    "temperature": Param(float, "sampling temperature"),
    "max_tokens": Param(int, "max output tokens of a stage"),
    "ttft_slo_s": Param(float, "SLO: user-visible time to first token (s)"),
    "tpot_slo_s": Param(float, "SLO: time per output token of the answer (s)"),
    "e2e_slo_s": Param(float, "SLO: end to end (s)"),
    "judge_model": Param(str, "the model that scores every answer 0-100 in its run (the pipeline's review stage: "
                              "absolute, no baseline; '' = none). Quality vs the baseline: the study's quality_judge"),
    "cache": Param(str, "KV cache: auto (cold on embedded, reuse on ollama) | reuse | cold"),
    "n_threads": Param(int, "embedded decode threads (0 = all cores)"),
    "n_ctx": Param(int, "embedded context size"),
    "perplexity_text": Param(str, "text for perplexity / KL of embedded files ('' = skip)"),
    "perplexity_tokens": Param(int, "tokens of the text to score"),
    "ollama_host": Param(str, "Ollama host ('' = $OLLAMA_HOST or the client's default)"),
    "openai_base_url": Param(str, "OpenAI-compatible server URL ('' = $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)"),
    "openai_response_format": Param(str, "how JSON schemas are sent to that server: json_schema (vLLM, SGLang, "
                                         "llama-server) | json_object (llama-cpp-python's server)"),
    "output_dir": Param(str, "where this execution writes records.jsonl (and quality.json)"),
    "study_name": Param(str, "label: the study"),
    "cell": Param(str, "label: the grid cell"),
}

_IPYTHON_NAMES = re.compile(r"^_i?\d+$")  # _i7, _7: IPython's per-execution history names
BEFORE_NAME = "_names_before_parameters"  # the notebook's snapshot of its globals above the parameters cell


def _type_name(kind: type) -> str:
    return "list of str" if kind is list else kind.__name__


def accepted_parameters() -> str:
    return "".join(f"\n  {name} ({_type_name(p.kind)}): {p.help}" for name, p in CELL_PARAMETERS.items())


def _type_problem(name: str, value: Any, kind: type) -> str | None:
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        list: isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
    }[kind]
    return None if ok else f"{name} must be {_type_name(kind)}, got {type(value).__name__} {value!r}"


@dataclass(frozen=True)
class Query:
    id: str
    query: str
    lang: str = ""
    category: str = ""
    twin: str | None = None  # the same query in the other language (the judge gate's wrong-language answers)
    facts: tuple[dict[str, Any], ...] = ()  # reference key facts, for key-fact recall only (never shown to a model)

    def labels(self) -> dict[str, str]:
        """Evaluation labels stored beside a run; never shown to a model."""
        return {"query_id": self.id, "lang": self.lang, "category": self.category}


def load_queries(path: str | Path, *, ids: Iterable[str] = (), limit: int = 0) -> list[Query]:
    """Queries from JSONL (one object a line) or CSV, each with ``id`` and ``query`` (``lang``, ``category``
    optional). ``ids`` selects and orders them; without ids, ``limit`` keeps the first N (0: all)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"queries file {str(path)!r} does not exist; pass a JSONL or CSV file (see data/queries/)")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{path}:{n}: not JSON ({exc.msg}); one JSON object a line") from None
    queries = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not str(row.get("query") or "").strip() or not row.get("id"):
            raise InvalidInput(f"{path}: query {n} needs a non-empty 'id' and 'query'")
        facts = row.get("facts") or ()
        if isinstance(facts, str):  # a CSV cell holds JSON
            facts = json.loads(facts) if facts.strip() else ()
        queries.append(Query(id=str(row["id"]), query=str(row["query"]), lang=str(row.get("lang") or ""),
                             category=str(row.get("category") or ""), twin=str(row["twin"]) if row.get("twin") else None,
                             facts=tuple(facts)))
    by_id = {q.id: q for q in queries}
    if len(by_id) != len(queries):
        raise InvalidInput(f"{path}: query ids must be unique")
    ids = list(ids)
    if ids:
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise InvalidInput(f"unknown query id(s) {', '.join(unknown)} in {path}; known: {', '.join(by_id)}")
        queries = [by_id[i] for i in ids]
    elif limit:
        queries = queries[:limit]
    if not queries:
        raise InvalidInput(f"no queries selected from {path}")
    return queries


def model_id(backend: str, model: str, quantization: str) -> str:
    """The name the backend gets for a model at a quantization: embedded ``model@Q8_0`` (the shipped
    quantization keeps the plain name), Ollama ``model-q8_0`` (``default`` keeps the plain tag)."""
    q = quantization.strip()
    if backend == "embedded":
        if q.lower() == SHIPPED or model.endswith(".gguf") or os.sep in model:
            return model
        from .models.variants import variant_name

        return variant_name(model, q)
    return model if q.lower() in ("default", SHIPPED) else f"{model}-{q}"


def safe_model_id(backend: str, model: str, quantization: str) -> str | None:
    """:func:`model_id`, or None where it cannot be formed (unknown model or type; the cell says why)."""
    try:
        return model_id(backend, model, quantization)
    except KitError:
        return None


def quantization_label(backend: str, model: str, quantization: str) -> tuple[str, bool]:
    """(the quantization's name, whether it is the shipped / default one) for tables."""
    q = quantization.strip()
    if backend == "embedded":
        from .models import REGISTRY

        spec = REGISTRY.get(model)
        if q.lower() == SHIPPED:
            return (spec.quantization if spec else SHIPPED), True
        name = q.upper()
        return name, bool(spec and spec.quantization == name)
    return ("default", True) if q.lower() in ("default", SHIPPED) else (q, False)


@dataclass(frozen=True)
class CellParams:
    """Validated parameters of one notebook execution."""

    backend: str
    models: list[str]
    quantizations: list[str]
    presets: list[str]
    queries_file: str
    query_ids: list[str]
    query_limit: int
    repeats: int
    warmup_runs: int
    seed: int
    temperature: float
    max_tokens: int
    ttft_slo_s: float
    tpot_slo_s: float
    e2e_slo_s: float
    judge_model: str
    cache: str
    n_threads: int
    n_ctx: int
    perplexity_text: str
    perplexity_tokens: int
    ollama_host: str
    openai_base_url: str
    openai_response_format: str
    output_dir: str
    study_name: str
    cell: str
    queries: list[Query] = field(default_factory=list)

    @property
    def slo(self) -> SLO:
        return SLO(ttft_s=self.ttft_slo_s, tpot_s=self.tpot_slo_s, e2e_s=self.e2e_slo_s)

    @property
    def effective_cache(self) -> str:
        if self.cache != "auto":
            return self.cache
        return "cold" if self.backend == "embedded" else "reuse"


def check_names_and_types(values: Mapping[str, Any], *, extra: Mapping[str, Param] | None = None,
                          require_all: bool = True) -> list[str]:
    """Problems with names and types only (no file or model lookups)."""
    accepted = {**CELL_PARAMETERS, **(extra or {})}
    problems = []
    unknown = [k for k in values if k not in accepted]
    if unknown:
        problems.append(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    if require_all:
        missing = [k for k in CELL_PARAMETERS if k not in values]
        if missing:
            problems.append(f"missing parameter(s): {', '.join(missing)}")
    for name, value in values.items():
        if name in accepted and (p := _type_problem(name, value, accepted[name].kind)):
            problems.append(p)
    return problems


def _raise(problems: list[str], accepted: str) -> None:
    if problems:
        raise InvalidInput("invalid study parameters:\n  - " + "\n  - ".join(problems) + f"\naccepted:{accepted}")


def validate_parameters(values: Mapping[str, Any]) -> CellParams:
    """Names, types and values of a cell's parameters, checked before any model call (no model is loaded).
    Name and type problems are listed together, then value problems, each time with the accepted
    parameters."""
    _raise(check_names_and_types(values), accepted_parameters())
    v = dict(values)
    for name in ("models", "quantizations", "presets", "query_ids"):
        v[name] = [str(x).strip() for x in v[name]]
    v["temperature"], v["ttft_slo_s"] = float(v["temperature"]), float(v["ttft_slo_s"])
    v["tpot_slo_s"], v["e2e_slo_s"] = float(v["tpot_slo_s"]), float(v["e2e_slo_s"])
    problems: list[str] = []
    if v["backend"] not in BACKENDS:
        problems.append(f"backend {v['backend']!r} is unknown; accepted: {', '.join(BACKENDS)}")
    for name in ("models", "quantizations", "presets"):
        if not v[name] or any(not x for x in v[name]):
            problems.append(f"{name} must be a non-empty list of non-empty names")
    for preset in v["presets"]:
        base, _, variant = preset.partition(":")
        if base not in PRESETS or variant not in ("", "analysis-first") or (variant and base != "staged"):
            problems.append(f"preset {preset!r} is unknown; accepted: {', '.join(PRESETS)}, staged:analysis-first")
    for name, low in (("query_limit", 0), ("repeats", 1), ("warmup_runs", 0), ("max_tokens", 1), ("n_threads", 0),
                      ("n_ctx", 256), ("perplexity_tokens", 16)):
        if v[name] < low:
            problems.append(f"{name} must be >= {low}, got {v[name]}")
    if v["temperature"] < 0:
        problems.append(f"temperature must be >= 0, got {v['temperature']}")
    for name in ("ttft_slo_s", "tpot_slo_s", "e2e_slo_s"):
        if v[name] <= 0:
            problems.append(f"{name} must be > 0, got {v[name]}")
    if v["cache"] not in CACHE_MODES:
        problems.append(f"cache {v['cache']!r} is unknown; accepted: {', '.join(CACHE_MODES)}")
    elif v["cache"] == "cold" and v["backend"] != "embedded":
        problems.append(f"cache 'cold' is not possible with {v['backend']} (no per-request switch); use 'auto' or "
                        f"'reuse'")
    from .backends.openai import RESPONSE_FORMAT_STYLES

    if v["openai_response_format"] not in RESPONSE_FORMAT_STYLES:
        problems.append(f"openai_response_format {v['openai_response_format']!r} is unknown; accepted: "
                        f"{', '.join(RESPONSE_FORMAT_STYLES)}")
    if not v["output_dir"].strip():
        problems.append("output_dir must name a directory")
    if v["perplexity_text"] and not Path(v["perplexity_text"]).is_file():
        problems.append(f"perplexity_text {v['perplexity_text']!r} does not exist; pass a text file or ''")
    queries: list[Query] = []
    try:
        queries = load_queries(v["queries_file"], ids=v["query_ids"], limit=v["query_limit"])
    except InvalidInput as exc:
        problems.append(str(exc))
    if v["backend"] == "embedded":
        problems += _embedded_model_problems(v)
    _raise(problems, accepted_parameters())
    return CellParams(**v, queries=queries)


def _embedded_model_problems(v: Mapping[str, Any]) -> list[str]:
    """Every model file the cell needs exists (registry, built variant or path): no model is loaded."""
    from .models import resolve

    problems = [f"quantization {q!r} is unknown; accepted: shipped, {', '.join(_quant_types())}"
                for q in v["quantizations"] if not _known_quant(q)]
    names = [(m, q) for m in v["models"] for q in v["quantizations"] if _known_quant(q)]
    names += [(v["judge_model"], SHIPPED)] if v["judge_model"] else []
    for model, quant in dict.fromkeys(names):
        try:
            resolve(model_id("embedded", model, quant))
        except KitError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))


def _quant_types() -> tuple[str, ...]:
    from .models.variants import QUANT_TYPES

    return QUANT_TYPES


def _known_quant(q: str) -> bool:
    return q.lower() == SHIPPED or q.upper() in _quant_types()


def notebook_parameters(namespace: Mapping[str, Any], before: set[str]) -> CellParams:
    """The parameters of a running study notebook: every name defined since ``before`` (a snapshot of the
    globals taken in the cell above the ``parameters`` cell), so a misspelt name that papermill injected
    shows up as an unknown parameter instead of being silently ignored."""
    names = [k for k in namespace if k not in before and k != BEFORE_NAME and not _IPYTHON_NAMES.match(k)]
    return validate_parameters({k: namespace[k] for k in names})


# ======================================================================================= one cell

def make_backend(p: CellParams):
    if p.backend == "embedded":
        return get_backend("embedded", model=p.models[0], n_ctx=p.n_ctx, n_threads=p.n_threads or None)
    if p.backend == "openai":
        return get_backend("openai", model=p.models[0], base_url=p.openai_base_url or None,
                           response_format_style=p.openai_response_format)
    return get_backend("ollama", model=p.models[0], host=p.ollama_host or None)


def _line(rec: RunRecord, slo: SLO) -> str:
    m = run_metrics(latency_view(rec), slo)

    def s(v: float | None, scale: float = 1.0, unit: str = "s") -> str:
        return "n/a" if v is None else f"{v * scale:.2f}{unit}"

    q = rec.quality.get("score") if rec.quality else None
    lab = rec.labels
    return (f"{'warmup ' if rec.warmup else ''}{lab.get('model_id')} {rec.preset} {lab.get('query_id')} "
            f"r{lab.get('repeat')}: {rec.status} ttft={s(m['user_ttft_s'])} tpot={s(m['answer_tpot_s'], 1000, 'ms')} "
            f"e2e={s(m['e2e_s'])} tokens={m['output_tokens']} judge={q}"
            + (f" error={rec.error}" if rec.error else ""))


async def run_cell(p: CellParams, *, echo: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Run every model x quantization x preset of ``p`` over its queries: warm-up runs, then queries x
    repeats, each record appended (and fsync'ed) to ``output_dir/records.jsonl`` as soon as it ends.
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
                if p.judge_model and p.backend == "embedded":  # load the judge now, not inside a measured run
                    await asyncio.to_thread(backend.load, p.judge_model)
                for preset in p.presets:
                    name, _, variant = preset.partition(":")
                    options = dict(backend=backend, model=mid, max_tokens=p.max_tokens, temperature=p.temperature,
                                   seed=p.seed, cache=p.effective_cache, slo=p.slo,
                                   analysis_first=variant == "analysis-first")
                    warm = Pipeline.from_preset(name, **options)
                    pipe = Pipeline.from_preset(name, review=bool(p.judge_model), judge_model=p.judge_model or None,
                                                **options)
                    labels = {"study": p.study_name, "cell": p.cell, "backend": p.backend, "model": model,
                              "quantization": qname, "shipped": shipped, "model_id": mid, "preset": preset,
                              "judge_model": p.judge_model or None, "max_tokens": p.max_tokens,
                              "temperature": p.temperature, "seed": p.seed, "cache": p.effective_cache,
                              "n_threads": getattr(backend, "n_threads", None)}
                    for w in range(p.warmup_runs):
                        q = p.queries[w % len(p.queries)]
                        rec = await warm.run(q.query, labels={**labels, **q.labels(), "repeat": w}, warmup=True,
                                             log=log)
                        log.append(rec)
                        counts["warmup"] += 1
                        if echo:
                            echo(_line(rec, p.slo))
                    for r in range(p.repeats):
                        for q in p.queries:
                            rec = await pipe.run(q.query, labels={**labels, **q.labels(), "repeat": r}, log=log)
                            log.append(rec)
                            counts["runs"] += 1
                            counts["ok"] += rec.status == "ok"
                            first_error = first_error or rec.error
                            if echo:
                                echo(_line(rec, p.slo))
    finally:
        await backend.aclose()
    if counts["ok"] == 0:
        raise StudyError(f"none of the {counts['runs']} measured runs succeeded; first error: {first_error}")
    return counts


def measure_cell_quality(p: CellParams) -> list[dict[str, Any]]:
    """Perplexity of each embedded model file of the cell on ``perplexity_text``, and its KL divergence
    against the model's shipped file (the shipped file against itself gives 0). Written to
    ``output_dir/quality.json``. Nothing for Ollama (the server exposes no logits) or without a text."""
    if not p.perplexity_text or p.backend != "embedded":
        return []
    from .models import fidelity as quality

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
    _write_json(Path(p.output_dir) / QUALITY, rows)
    return rows


def latency_view(rec: RunRecord) -> RunRecord:
    """The record without its judge stages: the judge scores the answer after the user has it, so its
    time is not part of the pipeline's latency (the full record stays on disk)."""
    return dataclasses.replace(rec, stages=[s for s in rec.stages if s.name not in JUDGE_STAGES])


# ======================================================================================= the study file

RUNNER_KEYS: dict[str, Param] = {
    "name": Param(str, "the study's name (default: the file name)"),
    "output_dir": Param(str, "the study directory (relative to the study file)"),
    "notebook": Param(str, "the cell notebook (default notebooks/study.ipynb)"),
    "baseline_model": Param(str, "the baseline system every configuration is judged against: this model ... (default "
                                 "qwen2.5-coder-1.5b; '' = no baseline, no quality verdicts)"),
    "baseline_backend": Param(str, "... on this backend (default embedded) ..."),
    "baseline_preset": Param(str, "... with this preset (default direct) ..."),
    "baseline_quantization": Param(str, "... at this quantization (default shipped) ..."),
    "baseline_max_tokens": Param(int, "... and this max tokens per stage, large enough for complete answers (default 512)"),
    "quality_judge": Param(str, "the model that judges each configuration's answers against the baseline's, pairwise "
                                "in both orders (default qwen2.5-coder-1.5b; '' = no judging)"),
    "quality_judge_backend": Param(str, "the judge's backend (default embedded)"),
    "second_judge": Param(str, "judges the configurations answered by the judge model itself, so that no model only "
                               "judges itself ('' = those configurations get no quality verdict; default '')"),
    "judge_max_tokens": Param(int, "max tokens of one judgment (reasons, then the verdict; default 160)"),
    "gate_answers": Param(int, "baseline answers the judge gate plants bad answers from, 5 kinds each (default 8)"),
    "gate_kinds": Param(list, "kinds of planted bad answers: other_query, truncated, wrong_language, prompt_echo, empty "
                              "(default all)"),
    "gate_threshold": Param(float, "gate accuracy below which a judge cannot judge: no quality verdict (default 0.9)"),
    "bootstrap_samples": Param(int, "bootstrap resamples of the retention interval (default 2000; seeded by `seed`)"),
    "quality_target": Param(float, "meets quality: the retention interval's lower bound >= this (default 0.8)"),
    "cell_timeout_s": Param(int, "papermill timeout of one notebook cell, 0 = none (default 0)"),
}
RUNNER_SET = ("output_dir", "study_name", "cell")  # notebook parameters the runner sets itself
PATH_KEYS = ("queries_file", "perplexity_text", "notebook", "output_dir")


REFERENCE_MODEL = "qwen2.5-coder-1.5b"  # the default baseline and judge


@dataclass(frozen=True)
class QualitySettings:
    """The baseline system, its judge and the judge gate (study-level keys of the same names)."""

    baseline_model: str = REFERENCE_MODEL
    baseline_backend: str = "embedded"
    baseline_preset: str = "direct"
    baseline_quantization: str = SHIPPED
    baseline_max_tokens: int = 512
    quality_judge: str = REFERENCE_MODEL
    quality_judge_backend: str = "embedded"
    second_judge: str = ""
    judge_max_tokens: int = 160
    gate_answers: int = 8
    gate_kinds: tuple[str, ...] = ("other_query", "truncated", "wrong_language", "prompt_echo", "empty")
    gate_threshold: float = 0.9
    bootstrap_samples: int = 2000
    quality_target: float = 0.8

    def problems(self) -> list[str]:
        out = []
        for name in ("baseline_backend", "quality_judge_backend"):
            if getattr(self, name) not in BACKENDS:
                out.append(f"{name} {getattr(self, name)!r} is unknown; accepted: {', '.join(BACKENDS)}")
        base, _, variant = self.baseline_preset.partition(":")
        if base not in PRESETS or variant not in ("", "analysis-first"):
            out.append(f"baseline_preset {self.baseline_preset!r} is unknown; accepted: {', '.join(PRESETS)}")
        for name, low in (("baseline_max_tokens", 1), ("judge_max_tokens", 16), ("gate_answers", 1),
                          ("bootstrap_samples", 100)):
            if getattr(self, name) < low:
                out.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        from .quality.gate import KINDS

        unknown = [k for k in self.gate_kinds if k not in KINDS]
        if unknown or not self.gate_kinds:
            out.append(f"gate_kinds must be a non-empty list of: {', '.join(KINDS)}; got {list(self.gate_kinds)}")
        if not 0 < self.gate_threshold <= 1 or not 0 < self.quality_target <= 1:
            out.append("gate_threshold and quality_target must be in (0, 1]")
        return out


QUALITY_KEYS = tuple(f.name for f in dataclasses.fields(QualitySettings))


@dataclass
class StudySpec:
    name: str
    output_dir: Path
    notebook: Path
    parameters: dict[str, Any]  # notebook parameters shared by every cell (grid axes included as lists)
    quality: QualitySettings = field(default_factory=QualitySettings)
    cell_timeout_s: int = 0
    source: str | None = None

    @property
    def baseline_preset(self) -> str:
        return self.quality.baseline_preset

    @property
    def baseline_quantization(self) -> str:
        return self.quality.baseline_quantization

    @property
    def quality_target(self) -> float:
        return self.quality.quality_target

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "output_dir": str(self.output_dir), "notebook": str(self.notebook),
                "parameters": self.parameters, **dataclasses.asdict(self.quality),
                "cell_timeout_s": self.cell_timeout_s, "source": self.source}


def accepted_study_keys() -> str:
    keys = {**RUNNER_KEYS, **{k: v for k, v in CELL_PARAMETERS.items() if k not in RUNNER_SET}}
    return "".join(f"\n  {k} ({_type_name(p.kind)}): {p.help}" for k, p in keys.items())


def load_study(study: str | os.PathLike[str] | Mapping[str, Any], *, output_dir: str | os.PathLike[str] | None = None
               ) -> StudySpec:
    """A study from a YAML file or a dict. Keys are the notebook's parameters (``models``, ``quantizations``
    and ``presets`` are the grid's axes) plus the runner's own; relative paths are relative to the YAML
    file (to the working directory for a dict). Unknown keys or wrong types fail here, listing what is
    accepted; model names are checked by each cell (an unknown model fails that cell only)."""
    import yaml

    if isinstance(study, Mapping):
        data, base, source = dict(study), Path.cwd(), None
    else:
        path = Path(study)
        if not path.is_file():
            raise InvalidInput(f"study file {str(path)!r} does not exist; see studies/example.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise InvalidInput(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"{path} must hold a mapping of study keys; accepted: {accepted_study_keys()}")
        base, source = path.resolve().parent, str(path.resolve())
    set_by_runner = [k for k in data if k in RUNNER_SET and k != "output_dir"]
    notebook_keys = {k: v for k, v in CELL_PARAMETERS.items() if k not in RUNNER_SET}
    problems = [f"{k} is set by the runner for each cell; remove it" for k in set_by_runner]
    problems += check_names_and_types({k: v for k, v in data.items() if k not in set_by_runner},
                                      extra=RUNNER_KEYS, require_all=False)
    for axis in ("models", "presets"):
        if axis not in data:
            problems.append(f"{axis} is required (a list)")
    _raise(problems, accepted_study_keys())
    for key in PATH_KEYS:
        if data.get(key):
            data[key] = str((base / Path(data[key]).expanduser()).resolve())
    name = data.pop("name", None) or (Path(source).stem if source else "study")
    out = output_dir or data.pop("output_dir", None) or (Path.cwd() / "runs" / name)
    data.pop("output_dir", None)
    runner = {k: data.pop(k) for k in list(data) if k in RUNNER_KEYS}
    notebook = Path(runner.get("notebook") or STUDY_NOTEBOOK)
    parameters = {k: v for k, v in notebook_defaults(notebook).items() if k in notebook_keys}
    for key in ("queries_file", "perplexity_text"):  # the notebook's defaults are relative to the notebook
        if parameters.get(key) and not Path(parameters[key]).is_absolute():
            parameters[key] = str((notebook.parent / parameters[key]).resolve())
    parameters.update(data)
    parameters.setdefault("quantizations", [SHIPPED])
    quality = QualitySettings(**{k: (float(v) if isinstance(getattr(QualitySettings, k), float) else
                                     tuple(v) if isinstance(v, list) else v)
                                 for k, v in runner.items() if k in QUALITY_KEYS})
    _raise(quality.problems(), accepted_study_keys())
    return StudySpec(name=name, output_dir=Path(out).expanduser().resolve(),
                     notebook=notebook, parameters=parameters, quality=quality,
                     cell_timeout_s=int(runner.get("cell_timeout_s", 0)), source=source)


def notebook_defaults(notebook: Path = STUDY_NOTEBOOK) -> dict[str, Any]:
    """The defaults in the notebook's ``parameters`` cell (as papermill reads them)."""
    import ast

    import papermill as pm

    if not notebook.is_file():
        raise InvalidInput(f"study notebook {str(notebook)!r} does not exist; set `notebook:` in the study file")
    out = {}
    for name, info in pm.inspect_notebook(str(notebook)).items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            out[name] = info["default"]
    return out


@dataclass(frozen=True)
class GridCell:
    id: str
    model: str
    quantization: str
    preset: str
    parameters: dict[str, Any]
    role: str = "grid"  # grid | baseline (the baseline system's answers, which the others are judged against)
    backend: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+=-]+", "_", text).strip("_") or "x"


def expand_grid(spec: StudySpec) -> list[GridCell]:
    """models x quantizations x presets, in that order. The first preset of each model x quantization
    also measures perplexity / KL (once per model file)."""
    p = spec.parameters
    cells: list[GridCell] = []
    seen: set[str] = set()
    for model in p["models"]:
        short = Path(model).stem if model.endswith(".gguf") else model
        for quant in p["quantizations"]:
            for i, preset in enumerate(p["presets"]):
                cid = _slug(f"{short}@{quant}--{preset}")
                while cid in seen:
                    cid += "+"
                seen.add(cid)
                params = {**p, "models": [model], "quantizations": [quant], "presets": [preset],
                          "output_dir": str(spec.output_dir / "cells" / cid), "study_name": spec.name, "cell": cid,
                          "perplexity_text": p.get("perplexity_text", "") if i == 0 else ""}
                cells.append(GridCell(id=cid, model=model, quantization=quant, preset=preset, parameters=params,
                                      backend=p.get("backend", "embedded")))
    baseline = baseline_cell(spec, cells)
    if baseline is not None and baseline not in cells:
        cells.insert(0, baseline)  # first: its answers are what every other cell is judged against
    return cells


def baseline_cell(spec: StudySpec, grid: list[GridCell]) -> GridCell | None:
    """The cell that answers as the baseline system: a grid cell with exactly the baseline's settings, or a
    cell of its own (``baseline--...``; no perplexity, its own max tokens). None without a baseline."""
    q, p = spec.quality, spec.parameters
    if not q.baseline_model:
        return None
    for cell in grid:
        if (cell.backend == q.baseline_backend and cell.model == q.baseline_model
                and cell.quantization.lower() == q.baseline_quantization.lower() and cell.preset == q.baseline_preset
                and p.get("max_tokens") == q.baseline_max_tokens):
            return cell
    short = Path(q.baseline_model).stem if q.baseline_model.endswith(".gguf") else q.baseline_model
    cid = _slug(f"baseline--{short}@{q.baseline_quantization}--{q.baseline_preset}")
    params = {**p, "backend": q.baseline_backend, "models": [q.baseline_model],
              "quantizations": [q.baseline_quantization], "presets": [q.baseline_preset],
              "max_tokens": q.baseline_max_tokens, "perplexity_text": "",
              "output_dir": str(spec.output_dir / "cells" / cid), "study_name": spec.name, "cell": cid}
    return GridCell(id=cid, model=q.baseline_model, quantization=q.baseline_quantization, preset=q.baseline_preset,
                    parameters=params, role="baseline", backend=q.baseline_backend)


# ======================================================================================= the runner

@dataclass
class CellResult:
    id: str
    state: str  # done | failed | skipped (done by an earlier invocation)
    wall_s: float | None = None
    error: str | None = None
    runs: int | None = None


@dataclass
class StudyResult:
    output_dir: Path
    cells: list[CellResult]
    wall_s: float
    report: dict[str, str] | None = None
    report_error: str | None = None
    judging: dict[str, Any] | None = None  # counts of the quality phase (judge gate and pairwise judgments)
    judging_error: str | None = None

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.state == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.report_error is None and self.judging_error is None

    def describe(self) -> str:
        done = [c for c in self.cells if c.state == "done"]
        skipped = [c for c in self.cells if c.state == "skipped"]
        lines = [f"study {self.output_dir}: {len(self.cells)} cells: {len(done)} run now, {len(skipped)} already "
                 f"done (skipped), {len(self.failed)} failed; wall time {self.wall_s:.1f} s"]
        lines += [f"  FAILED {c.id}: {short_error(c.error)}" for c in self.failed]
        if self.judging:
            lines.append("  quality phase: " + ", ".join(f"{k} {v}" for k, v in self.judging.items()))
        if self.judging_error:
            lines.append(f"  the quality judging failed: {self.judging_error}")
        if self.report_error:
            lines.append(f"  the report failed: {self.report_error}")
        if self.report:
            lines += [f"  {k}: {v}" for k, v in self.report.items()]
        return "\n".join(lines)


def _write_json(path: Path, data: Any) -> None:
    """Atomic: written to a temporary file, fsync'ed, renamed over ``path``, directory fsync'ed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=1, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cell_state(cell_dir: Path) -> str:
    if (cell_dir / DONE).is_file():
        return "done"
    if (cell_dir / FAILED).is_file():
        return "failed"
    return "incomplete" if cell_dir.exists() else "pending"


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise StudyError(f"Jupyter kernel {KERNEL_NAME!r} is not installed; run: {sys.executable} -m ipykernel "
                         f"install --sys-prefix --name {KERNEL_NAME} --display-name {KERNEL_NAME}") from None


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One runner per study directory. The lock dies with its process; the lock file is removed on exit
    (re-checked after locking, so a runner never holds a lock on a file another one just removed)."""
    import fcntl

    path = directory / ".lock"
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StudyError(f"another runner is working on {directory}; wait for it or stop it") from None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()  # removed by a runner that just finished: lock the new file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill PID`` stops the runner like Ctrl-C: papermill then shuts the kernel down. (On SIGKILL the
    kernel notices its parent is gone and exits by itself: ipykernel's parent poller.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_same_study(out: Path, spec: StudySpec, cells: list[GridCell]) -> None:
    """A directory holds one study: resuming with different shared parameters would mix two studies.
    The grid may grow (new models, quantizations or presets add cells)."""
    path = out / STUDY_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        axes = ("models", "quantizations", "presets")
        before = {k: v for k, v in old["spec"]["parameters"].items() if k not in axes}
        now = {k: v for k, v in spec.parameters.items() if k not in axes}
        # a parameter the notebook gained since (e.g. openai_base_url), left at its default, changes nothing
        defaults = notebook_defaults(spec.notebook)
        changed = sorted(k for k in before.keys() | now.keys()
                         if before.get(k, defaults.get(k)) != now.get(k, defaults.get(k)))
        if changed:
            raise StudyError(f"{out} holds a study run with different parameters ({', '.join(changed)}); use "
                             f"another output directory (--out) or delete {out}")
        known = {c["id"]: c for c in old["cells"]}
        cells_json = [*old["cells"], *(_cell_json(c) for c in cells if c.id not in known)]
    else:
        cells_json = [_cell_json(c) for c in cells]
    baseline = baseline_cell(spec, [c for c in cells if c.role == "grid"])
    _write_json(path, {"spec": spec.to_dict(), "cells": cells_json, "kernel": KERNEL_NAME,
                       "baseline_cell": baseline.id if baseline else None})


def _cell_json(c: GridCell) -> dict[str, Any]:
    return {"id": c.id, "model": c.model, "quantization": c.quantization, "preset": c.preset, "role": c.role,
            "backend": c.backend}


def _prepare_variants(parameters: Mapping[str, Any], echo: Callable[[str], Any]) -> dict[tuple[str, str], str]:
    """Build the embedded quantized variants that cells with these parameters need into this machine's
    cache (once; cached). The runner calls it for the whole grid, a Dask worker for its cell (its cache
    may lack them). Returns build errors by (model, quantization); those cells fail with that error."""
    errors: dict[tuple[str, str], str] = {}
    if parameters.get("backend", "embedded") != "embedded":
        return errors
    from .models import REGISTRY
    from .models.quantize import quantize
    from .models.variants import QUANT_TYPES, find_variant

    for model in parameters["models"]:
        for quant in parameters["quantizations"]:
            spec_m = REGISTRY.get(model)
            if quant.lower() == SHIPPED or spec_m is None or quant.upper() not in QUANT_TYPES:
                continue  # a path, an unknown model or type: the cell's own validation names the problem
            if quant.upper() == spec_m.quantization or find_variant(model, quant.upper()):
                continue
            try:
                v = quantize(model, quant, n_threads=parameters.get("n_threads") or None)
            except KitError as exc:
                errors[(model, quant)] = f"{type(exc).__name__}: {exc}"
                continue
            if v.built_s is not None:  # None: another process built it meanwhile
                echo(f"built {v.name} ({v.size / 1e6:.1f} MB) in {v.built_s:.1f} s")
    return errors


def _model_files(spec: StudySpec) -> list[dict[str, Any]]:
    """sha256, size and path of every embedded file the grid uses (judge and shipped references too),
    Ollama's digest and size of each model, or the models an OpenAI-compatible server lists (the API gives
    no digest)."""
    p = spec.parameters
    if p.get("backend", "embedded") == "embedded":
        from .models import resolve

        q = spec.quality
        names = [safe_model_id("embedded", m, qq) for m in p["models"] for qq in p["quantizations"]]
        names += [*p["models"], *([p["judge_model"]] if p.get("judge_model") else [])]
        roles = {p.get("judge_model"): "judge"}
        if q.baseline_model and q.baseline_backend == "embedded":
            bid = safe_model_id("embedded", q.baseline_model, q.baseline_quantization)
            names.append(bid)
            roles[bid] = "baseline"
        for name in (q.quality_judge, q.second_judge) if q.quality_judge_backend == "embedded" else ():
            if name:
                names.append(name)
                roles[name] = "quality judge"
        rows = []
        for name in dict.fromkeys(n for n in names if n):
            try:
                rows.append({"role": roles.get(name, "model"), **resolve(name).info()})
            except KitError as exc:
                rows.append({"name": name, "error": str(exc)})
        return rows
    from .sync import run_sync

    if p.get("backend") == "openai":
        from .backends.openai import OpenAIBackend

        server = OpenAIBackend(base_url=p.get("openai_base_url") or None)
        try:
            return [{"base_url": server.base_url, "served": run_sync(_listed(server))}]
        except KitError as exc:
            return [{"openai_error": str(exc)}]
    from .backends.ollama import OllamaBackend

    backend = OllamaBackend(host=p.get("ollama_host") or None)
    wanted = {safe_model_id("ollama", m, q) for m in p["models"] for q in p["quantizations"]} | (
        {p["judge_model"]} if p.get("judge_model") else set())
    try:
        version = run_sync(backend.version())
        listing = run_sync(backend.list_models())
    except KitError as exc:
        return [{"ollama_error": str(exc)}]
    rows = [{"ollama_version": version, "host": backend.host}]
    for m in listing:
        if m.get("model") in wanted or m.get("name") in wanted:
            rows.append({"name": m.get("model") or m.get("name"), "digest": m.get("digest"), "size": m.get("size"),
                         "details": m.get("details")})
    return rows


async def _listed(server: Any) -> list[str]:
    try:
        return await server.served_models()
    finally:
        await server.aclose()


def capture_environment(spec: StudySpec) -> dict[str, Any]:
    from . import environment
    from jupyter_client.kernelspec import KernelSpecManager

    env = environment.capture(n_threads=spec.parameters.get("n_threads") or None)
    env["backend"] = spec.parameters.get("backend", "embedded")
    env["model_files"] = _model_files(spec)
    with contextlib.suppress(Exception):
        env["kernel"] = {"name": KERNEL_NAME, "argv": KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv}
    return env


def _processes_working_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (Linux ``/proc``; elsewhere none are found)."""
    target = str(directory.resolve())
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd") == target:
                pids.append(int(proc.name))
    return pids


def _clear(cell_dir: Path, *, grace_s: float = 15.0) -> None:
    """Remove an earlier, unfinished attempt of a cell. A kernel orphaned by a killed runner (its working
    directory is the cell's) may write one more record before ipykernel's parent poller (1 s) stops it:
    wait for it to be gone first, or a new attempt could get its records too."""
    deadline = time.monotonic() + grace_s
    while pids := _processes_working_in(cell_dir):
        if time.monotonic() > deadline:
            raise StudyError(f"process(es) {', '.join(map(str, pids))} still work in {cell_dir} (a kernel left by "
                             f"a killed runner?); stop them and run again")
        time.sleep(0.1)
    shutil.rmtree(cell_dir, ignore_errors=True)


@dataclass(frozen=True)
class Execution:
    """How one execution of the cell notebook ended (wall_s None: it never started)."""

    state: str  # done | failed
    wall_s: float | None
    error: str | None = None
    notebook_cell: int | None = None  # the notebook cell that raised


def execute_notebook(notebook: Path, parameters: Mapping[str, Any], work_dir: Path, *, timeout_s: int = 0
                     ) -> Execution:
    """Execute the cell notebook with papermill (kernel ``llmfirst-kit``, working directory ``work_dir``,
    the executed notebook saved there after every notebook cell). The one way a grid cell is executed: by
    the local runner in the cell's directory, by a Dask worker in a temporary directory."""
    import papermill as pm

    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(work_dir / EXECUTED), parameters=dict(parameters),
                            kernel_name=KERNEL_NAME, cwd=str(work_dir), progress_bar=False, log_output=False,
                            request_save_on_cell_execute=True, start_timeout=180, execution_timeout=timeout_s or None)
    except pm.PapermillExecutionError as exc:
        return Execution("failed", time.perf_counter() - t0, f"{exc.ename}: {exc.evalue}", exc.exec_count)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # the kernel died, could not start, timed out...
        return Execution("failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    return Execution("done", time.perf_counter() - t0)


def _fresh(cell_dir: Path) -> None:
    """An empty cell directory: an interrupted or failed attempt is redone from scratch, no duplicated records."""
    if cell_dir.exists():
        _clear(cell_dir)
    cell_dir.mkdir(parents=True)


def _record_cell(cell: GridCell, cell_dir: Path, execution: Execution, **where: str) -> CellResult:
    """The cell's marker, written once its files are in ``cell_dir``: FAILED.json with the error, or DONE.json
    (``where``: e.g. the Dask worker and host that ran the cell, recorded in the marker)."""
    if execution.state == "failed":
        _write_json(cell_dir / FAILED, {"cell": cell.id, "error": execution.error,
                                        **({"notebook_cell": execution.notebook_cell}
                                           if execution.notebook_cell is not None else {}),
                                        **({"wall_s": execution.wall_s} if execution.wall_s is not None else {}),
                                        "failed_at": _now(), **where})
        return CellResult(cell.id, "failed", execution.wall_s, execution.error)
    records = [r for r in read_log(cell_dir / RECORDS) if isinstance(r, RunRecord)] \
        if (cell_dir / RECORDS).is_file() else []
    # the marker comes last: the records were fsync'ed (run by run, or as received from a Dask worker), so a
    # marker always means complete records
    _write_json(cell_dir / DONE, {"cell": cell.id, "runs": len(records), "wall_s": execution.wall_s,
                                  "finished_at": _now(), "parameters": cell.parameters, **where})
    return CellResult(cell.id, "done", execution.wall_s, runs=len(records))


def _execute_cell(spec: StudySpec, cell: GridCell, cell_dir: Path) -> CellResult:
    _fresh(cell_dir)
    return _record_cell(cell, cell_dir, execute_notebook(spec.notebook, cell.parameters, cell_dir,
                                                         timeout_s=spec.cell_timeout_s))


# (spec, the cells to run, the study directory, the progress bar, echo) -> each cell's result as it finishes
CellRunner = Callable[[StudySpec, list[GridCell], Path, Any, Callable[[str], Any]], Iterator[CellResult]]


def _run_local(spec: StudySpec, cells: list[GridCell], out: Path, bar: Any, echo: Callable[[str], Any]
               ) -> Iterator[CellResult]:
    """The local executor: the cells one after another in this process's kernel subprocesses."""
    for cell in cells:
        bar.set_postfix_str(cell.id)
        try:
            result = _execute_cell(spec, cell, out / "cells" / cell.id)
        except KeyboardInterrupt:
            bar.close()
            echo(f"interrupted during {cell.id}: that cell will be redone; run the same command again to resume")
            raise
        yield result


def short_error(error: str | None) -> str | None:
    """An error on one line, without the list of accepted parameters (kept in FAILED.json)."""
    if error is None:
        return None
    return " ".join(error.split("\naccepted:")[0].split())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


EXECUTORS = ("local", "dask")


def run_study(study: str | os.PathLike[str] | Mapping[str, Any], *, output_dir: str | os.PathLike[str] | None = None,
              progress: bool = True, report: bool = True, judge: bool = True,
              echo: Callable[[str], Any] | None = None,
              executor: str = "local", scheduler: str | Client | None = None) -> StudyResult:
    """Run (or resume) a study: every unfinished grid cell is executed with papermill; finished cells
    are skipped; failed cells are recorded and retried on the next invocation. Builds the report at the
    end when ``report`` and at least one cell is done; before it, when ``judge``, the quality phase
    (:mod:`llmfirst_kit.study_quality`: the judge gate, then each configuration judged pairwise against the
    baseline's answers; resumable).

    ``executor="local"`` runs the cells one after another here; ``executor="dask"`` sends them to the
    workers of a Dask scheduler (``scheduler``: an address such as ``tcp://HOST:8786`` or a
    ``distributed.Client``; see :mod:`llmfirst_kit.study_dask`). Either way this process alone writes the
    study directory: the lock, the markers, ``status.json`` and the report."""
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise InvalidInput(f"executor {executor!r} is unknown; accepted: {', '.join(EXECUTORS)}")
    if scheduler is not None and executor != "dask":
        raise InvalidInput("a scheduler is used by the dask executor only: --executor dask --scheduler tcp://HOST:8786")
    echo = echo or (lambda text: print(text, file=sys.stderr))
    t0 = time.perf_counter()
    spec = load_study(study, output_dir=output_dir)
    check_kernel()
    if not spec.notebook.is_file():
        raise InvalidInput(f"study notebook {spec.notebook} does not exist")
    results: dict[str, CellResult] = {}
    with contextlib.ExitStack() as stack:
        run_cells: CellRunner = _run_local
        if executor == "dask":  # connected first: an unreachable scheduler fails before anything is written
            from . import study_dask

            run_cells = functools.partial(study_dask.run_cells, stack.enter_context(study_dask.connect(scheduler)))
        out = spec.output_dir
        out.mkdir(parents=True, exist_ok=True)
        cells = expand_grid(spec)
        stack.enter_context(_exclusive(out))
        stack.enter_context(_sigterm_as_interrupt())
        _check_same_study(out, spec, cells)
        finished = sum(cell_state(out / "cells" / c.id) == "done" for c in cells)
        echo(f"study {spec.name}: {len(cells)} cells ({finished} already done) -> {out}")
        pending = [c for c in cells if cell_state(out / "cells" / c.id) != "done"]
        build_errors: dict[tuple[str, str], str] = {}
        for cell in {(c.backend, c.model, c.quantization): c for c in pending}.values():  # finished cells need none
            build_errors |= _prepare_variants(cell.parameters, echo)
        if not (out / ENVIRONMENT).is_file():
            env = capture_environment(spec)
            _write_json(out / ENVIRONMENT, env)
            echo(f"environment recorded: {env['cpu']['model']}, {env['n_threads']} threads, memory bandwidth "
                 f"{env.get('bandwidth_gb_per_s', 0):.1f} GB/s")
        to_run = []
        for cell in cells:
            cell_dir = out / "cells" / cell.id
            if cell_state(cell_dir) == "done":
                results[cell.id] = CellResult(cell.id, "skipped")
            elif (cell.model, cell.quantization) in build_errors:
                _fresh(cell_dir)
                error = build_errors[(cell.model, cell.quantization)]
                results[cell.id] = _record_cell(cell, cell_dir, Execution("failed", None, error))
            else:
                to_run.append(cell)
        bar = stack.enter_context(tqdm(total=len(cells), initial=len(results), unit="cell", disable=not progress,
                                       file=sys.stderr, dynamic_ncols=True))
        with contextlib.closing(run_cells(spec, to_run, out, bar, echo)) as finishing:
            for result in finishing:
                results[result.id] = result
                bar.update()
                if result.state == "failed":
                    bar.write(f"cell {result.id} failed: {short_error(result.error)}", file=sys.stderr)
        bar.close()
        results_in_order = [results[c.id] for c in cells]
        wall = time.perf_counter() - t0
        outcome = StudyResult(out, results_in_order, wall)
        _write_json(out / STATUS, {"finished_at": _now(), "wall_s": wall,
                                   "cells": [dataclasses.asdict(c) for c in results_in_order]})
        if judge and any(cell_state(out / "cells" / c.id) == "done" for c in cells):
            try:  # the quality phase: the judge gate, then every configuration against the baseline
                from .study_quality import judge_study

                outcome.judging = judge_study(out, echo=echo)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # the cells' results stay; a rerun judges what is missing
                outcome.judging_error = f"{type(exc).__name__}: {exc}"
            outcome.wall_s = time.perf_counter() - t0
        if report and any(cell_state(out / "cells" / c.id) == "done" for c in cells):
            try:
                outcome.report = build_report(out)
            except Exception as exc:  # the cells' results stay; `llmfirst study report DIR` can retry
                outcome.report_error = f"{type(exc).__name__}: {exc}"
            outcome.wall_s = time.perf_counter() - t0
    return outcome


# ======================================================================================= results

@dataclass
class StudyResults:
    """Everything a study directory holds, loaded."""

    directory: Path
    spec: dict[str, Any]
    environment: dict[str, Any]
    cells: list[dict[str, Any]]  # id, model, quantization, preset, state, error, wall_s, runs
    runs: list[RunRecord]
    quality: list[dict[str, Any]]
    baseline_cell: str | None = None  # the id of the cell whose answers are the baseline system's

    @property
    def slo(self) -> SLO:
        p = self.spec["parameters"]
        return SLO(ttft_s=p.get("ttft_slo_s", 3.0), tpot_s=p.get("tpot_slo_s", 0.1), e2e_s=p.get("e2e_slo_s", 120.0))

    @property
    def bandwidth_gb_per_s(self) -> float | None:
        return self.environment.get("bandwidth_gb_per_s")


def load_results(study_dir: str | os.PathLike[str]) -> StudyResults:
    """Records of finished cells only (a cell without its DONE marker is incomplete and left out)."""
    d = Path(study_dir)
    if not (d / STUDY_FILE).is_file():
        raise InvalidInput(f"{d} is not a study directory (no {STUDY_FILE}); run `llmfirst study run STUDY.yaml`")
    study = json.loads((d / STUDY_FILE).read_text(encoding="utf-8"))
    env = json.loads((d / ENVIRONMENT).read_text(encoding="utf-8")) if (d / ENVIRONMENT).is_file() else {}
    cells, runs, qual = [], [], []
    for c in study["cells"]:
        cdir = d / "cells" / c["id"]
        state = cell_state(cdir)
        row = {**c, "state": state, "error": None, "wall_s": None, "runs": None}
        if state == "done":
            done = json.loads((cdir / DONE).read_text(encoding="utf-8"))
            row.update(wall_s=done.get("wall_s"), runs=done.get("runs"))
            if (cdir / RECORDS).is_file():
                runs += [r for r in read_log(cdir / RECORDS) if isinstance(r, RunRecord)]
            if (cdir / QUALITY).is_file():
                qual += json.loads((cdir / QUALITY).read_text(encoding="utf-8"))
        elif state == "failed":
            failed = json.loads((cdir / FAILED).read_text(encoding="utf-8"))
            row.update(error=failed.get("error"), wall_s=failed.get("wall_s"))
        cells.append(row)
    return StudyResults(directory=d, spec=study["spec"], environment=env, cells=cells, runs=runs, quality=qual,
                        baseline_cell=study.get("baseline_cell"))


def config_label(model: str, quantization: str, preset: str) -> str:
    return f"{model}@{quantization} · {preset}"


def runs_table(results: StudyResults):
    """One row per run (warm-up runs included, marked): labels, the run metrics without the judge's time
    (``metrics.runs_frame``), the answer call's decode tokens/s, the strategy the model decided."""
    import pandas as pd

    runs = results.runs
    df = runs_frame([latency_view(r) for r in runs], results.slo)
    if df.empty:
        return df
    from .study_quality import is_complete, is_truncated

    df["complete"] = [bool(is_complete(r)) for r in runs]
    df["truncated"] = [bool(is_truncated(r)) for r in runs]
    answer_tps, strategy, judge_status = [], [], []
    for r in runs:
        visible = [s for s in latency_view(r).stages if s.visible]
        answer_tps.append(call_metrics(visible[-1].call)["tokens_per_s"] if visible else None)
        d = r.decisions.get("strategy")
        strategy.append(d["value"]["strategy"] if d and d.get("status") == "decided" and d.get("value") else None)
        judge_status.append(r.quality.get("status") if r.quality else None)
    df["answer_tokens_per_s"] = pd.to_numeric(pd.Series(answer_tps, index=df.index), errors="coerce")
    df["strategy"] = strategy
    df["judge_status"] = judge_status
    df["quality"] = pd.to_numeric(df["quality"], errors="coerce")
    df["config"] = [config_label(m, q, p) for m, q, p in zip(df["model"], df["quantization"], df["preset"])]
    return df


LATENCY = ("user_ttft_s", "answer_tpot_s", "e2e_s")


def _model_bytes(results: StudyResults) -> dict[str, int]:
    """Model id -> file size (embedded) or Ollama's size."""
    out = {}
    for row in results.environment.get("model_files", []):
        if row.get("name") and row.get("size"):
            out[row["name"]] = row["size"]
    return out


def summary_table(results: StudyResults):
    """One row per model x quantization x preset, failed cells included with their error: latency
    percentiles and median CIs, decode speed and MBU, judge score and retention vs the baseline,
    perplexity / KL, SLO pass rate, strategy decisions, and whether the configuration meets every target
    (p95 latencies under the SLOs, retention >= the quality target). Warm-up and failed runs excluded."""
    import pandas as pd

    from .study_quality import quality_columns

    spec, slo = results.spec, results.slo
    df = runs_table(results)
    groups = dict(iter(df.groupby("cell"))) if not df.empty and "cell" in df else {}
    sizes = _model_bytes(results)
    file_quality = {(q["model"], q["quantization"]): q for q in results.quality}
    quality = quality_columns(results)
    rows = []
    for cell in results.cells:
        backend = cell.get("backend") or spec["parameters"].get("backend", "embedded")
        qname, shipped = quantization_label(backend, cell["model"], cell["quantization"])
        mid = safe_model_id(backend, cell["model"], cell["quantization"])
        runs = groups.get(cell["id"])
        real = runs[~runs["warmup"].astype(bool)] if runs is not None else None
        ok = real[real["status"] == "ok"] if real is not None else None
        row: dict[str, Any] = {
            "model": cell["model"], "quantization": qname, "shipped": shipped, "preset": cell["preset"],
            "backend": backend, "model_id": mid, "cell": cell["id"], "cell_state": cell["state"],
            "cell_error": short_error(cell["error"]), "cell_wall_s": cell["wall_s"],
            "n_runs": 0 if ok is None else len(ok),
            "n_errors": 0 if real is None else int((real["status"] != "ok").sum()),
            "n_complete": 0 if ok is None else int(ok["complete"].astype(bool).sum()),
            "truncation_rate": None if ok is None or not len(ok) else float(ok["truncated"].astype(bool).mean()),
        }
        row.update(_latency_columns(ok))
        row["model_bytes"] = sizes.get(mid) if mid else None
        row["bandwidth_gb_per_s"] = results.bandwidth_gb_per_s
        row["mbu"] = mbu(row["model_bytes"], row["answer_tokens_per_s_p50"], row["bandwidth_gb_per_s"])
        scored = ok["quality"].dropna() if ok is not None else pd.Series(dtype=float)
        row["judge_score_mean"] = float(scored.mean()) if len(scored) else None
        row["judge_scored"] = len(scored)
        qc = dict(quality.get(cell["id"], {}))
        qc.pop("truncation_rate", None)  # the same share, from the runs above
        row.update(qc)
        q = file_quality.get((cell["model"], qname)) or {}
        row.update(perplexity=q.get("perplexity"), reference_perplexity=q.get("reference_perplexity"),
                   kl_mean=q.get("kl_mean"), kl_top1_agreement=q.get("top1_agreement"), quality_tokens=q.get("tokens"))
        row.update(_run_rates(ok, cell["preset"]))
        row.update(_verdict(row, slo, spec.get("quality_target", 0.8)))
        rows.append(row)
    return pd.DataFrame(rows)


def _latency_columns(ok) -> dict[str, Any]:
    """p50 / p95 (``metrics.percentiles``) of each latency and the decode speed, and the median's CI. E2E is
    taken over complete answers only: the end of an answer cut off at the token limit is not the end."""
    out: dict[str, Any] = {}
    complete = ok[ok["complete"].astype(bool)] if ok is not None and len(ok) else None
    for col in (*LATENCY, "answer_tokens_per_s"):
        frame = complete if col == "e2e_s" else ok
        pct = percentiles(frame, columns=[col], q=(50, 95)).iloc[0] if frame is not None and len(frame) else {}
        for p in (50, 95):
            value = pct.get(f"{col}_p{p}") if len(pct) else None
            out[f"{col}_p{p}"] = None if value is None or value != value else float(value)  # NaN -> None
        if col in LATENCY:
            low, high, coverage = median_ci(frame[col].tolist() if frame is not None else [])
            out[f"{col}_p50_ci_low"], out[f"{col}_p50_ci_high"] = low, high
            if col == "user_ttft_s":
                out["median_ci_coverage"] = coverage
    return out


def _run_rates(ok, preset: str) -> dict[str, Any]:
    """Share of runs meeting every SLO (an undefined TPOT -- a one-token answer -- is not a miss), share of
    staged runs whose strategy was decided and agreement of the decision with the query's label, mean
    LLM-first compliance."""
    if ok is None or ok.empty:
        return {"slo_pass_rate": None, "strategy_decided_rate": None, "strategy_agreement": None,
                "compliance_mean": None}
    passed = (ok["slo_ttft"] == True) & (ok["slo_e2e"] == True) & (ok["slo_tpot"] != False)  # noqa: E712
    decided = ok[ok["strategy"].notna()]
    agree = (decided["strategy"] == decided["category"]).mean() if len(decided) and "category" in decided else None
    return {"slo_pass_rate": float(passed.mean()),
            "strategy_decided_rate": len(decided) / len(ok) if preset.startswith("staged") else None,
            "strategy_agreement": None if agree is None else float(agree),
            "compliance_mean": float(ok["compliance"].astype(float).mean())}


def _verdict(row: Mapping[str, Any], slo: SLO, quality_target: float) -> dict[str, Any]:
    ttft, tpot, e2e = row["user_ttft_s_p95"], row["answer_tpot_s_p95"], row["e2e_s_p95"]
    latency = None if ttft is None or e2e is None else bool(
        ttft < slo.ttft_s and e2e < slo.e2e_s and (tpot is None or tpot < slo.tpot_s))
    low = row.get("retention_ci_low")  # None when there is no verdict (no baseline, failed gate, ...)
    quality = None if low is None or row.get("quality_retention") is None else bool(low >= quality_target)
    return {"meets_latency": latency, "meets_quality": quality, "meets_all": bool(latency and quality)}


# ======================================================================================= the report

# nbconvert's lab template without its CDN scripts (require.js, MathJax): the report loads nothing from the
# network; plotly.js is embedded by `show`.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
"""


def build_report(study_dir: str | os.PathLike[str], *, notebook: str | os.PathLike[str] | None = None
                 ) -> dict[str, str]:
    """``summary.csv``, then the summary notebook executed into ``report.ipynb`` and converted to
    ``report.html`` (inputs hidden, plotly.js embedded: opens offline)."""
    import jinja2
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    d = Path(study_dir).resolve()
    results = load_results(d)
    check_kernel()
    table = summary_table(results)
    tmp = d / f".{SUMMARY_CSV}.tmp{os.getpid()}"
    table.to_csv(tmp, index=False)
    os.replace(tmp, d / SUMMARY_CSV)
    executed = d / "report.ipynb"
    pm.execute_notebook(str(notebook or SUMMARY_NOTEBOOK), str(executed), parameters={"study_dir": str(d)},
                        kernel_name=KERNEL_NAME, cwd=str(d), progress_bar=False, log_output=False)
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
    html = d / "report.html"
    tmp_html = d / f".report.html.tmp{os.getpid()}"
    tmp_html.write_text(body, encoding="utf-8")
    os.replace(tmp_html, html)
    return {"summary": str(d / SUMMARY_CSV), "report": str(html), "notebook": str(executed)}


_plotlyjs_shown = False


def show(fig: Any) -> None:
    """Display a plotly figure in a report notebook: the plotly mimetype for JupyterLab, and HTML for
    nbconvert with plotly.js embedded in the first figure (no CDN, no MathJax), so the HTML opens offline."""
    global _plotlyjs_shown
    from IPython.display import display

    html = fig.to_html(full_html=False, include_plotlyjs=not _plotlyjs_shown, include_mathjax=False)
    _plotlyjs_shown = True
    display({"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/html": html}, raw=True)


__all__ = [
    "CELL_PARAMETERS", "CellParams", "Query", "load_queries", "validate_parameters", "notebook_parameters",
    "run_cell", "measure_cell_quality", "latency_view", "load_study", "expand_grid", "run_study", "StudySpec",
    "StudyResult", "load_results", "runs_table", "summary_table", "build_report", "show",
]
