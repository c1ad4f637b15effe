"""The parameters of one grid cell (one execution of the cell notebook, ``llmfirst_kit/assets/study.ipynb``):
the schema (:data:`CELL_PARAMETERS`, kept in step with the notebook's ``parameters`` cell by a test), their
checks before any model call (:func:`validate_parameters`, :func:`notebook_parameters`), and the error
format that lists what is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..backends import BACKENDS, capabilities
from ..errors import InvalidInput, KitError
from ..metrics import SLO
from ..pipeline import PRESET_NAMES, parse_preset
from .quantization import SHIPPED, is_known_quantization, local_files, model_id, quant_types
from .queries import Query, load_queries

CACHE_MODES = ("auto", "reuse", "cold")


@dataclass(frozen=True)
class Param:
    kind: type  # str, int, float, bool or list (of str)
    help: str


# The parameters of assets/study.ipynb (its `parameters` cell holds the defaults; a test keeps the two
# in step). One execution = one grid cell: the runner passes one-element lists; by hand, any lists work.
CELL_PARAMETERS: dict[str, Param] = {
    "backend": Param(str, f"one of: {', '.join(BACKENDS)}"),
    "models": Param(list, "model names: embedded registry names or .gguf paths; Ollama or OpenAI-compatible "
                          "server names"),
    "quantizations": Param(list, "embedded: 'shipped' or a type built by `llmfirst models quantize` (Q8_0, Q4_0, "
                                 "...); ollama: a tag suffix (model-<q>, e.g. q8_0) or 'default'"),
    "presets": Param(list, f"pipeline presets: {', '.join(PRESET_NAMES)}, each with optional +rewrite, +revise "
                           "(e.g. staged+revise)"),
    "queries_file": Param(str, "JSONL (or CSV) with id, lang, category, query (default: the kit's 72 queries)"),
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


def type_name(kind: type) -> str:
    return "list of str" if kind is list else kind.__name__


def accepted_parameters() -> str:
    return "".join(f"\n  {name} ({type_name(p.kind)}): {p.help}" for name, p in CELL_PARAMETERS.items())


def type_problem(name: str, value: Any, kind: type) -> str | None:
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        list: isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
    }[kind]
    return None if ok else f"{name} must be {type_name(kind)}, got {type(value).__name__} {value!r}"


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
        return "cold" if capabilities(self.backend).cold_cache else "reuse"


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
        if name in accepted and (p := type_problem(name, value, accepted[name].kind)):
            problems.append(p)
    return problems


def raise_invalid(problems: list[str], accepted: str) -> None:
    if problems:
        raise InvalidInput("invalid study parameters:\n  - " + "\n  - ".join(problems) + f"\naccepted:{accepted}")


def validate_parameters(values: Mapping[str, Any]) -> CellParams:
    """Names, types and values of a cell's parameters, checked before any model call (no model is loaded).
    Name and type problems are listed together, then value problems, each time with the accepted
    parameters."""
    raise_invalid(check_names_and_types(values), accepted_parameters())
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
        try:
            parse_preset(preset)
        except InvalidInput as exc:
            problems.append(str(exc))
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
    elif v["cache"] == "cold" and not (v["backend"] in BACKENDS and capabilities(v["backend"]).cold_cache):
        problems.append(f"cache 'cold' is not possible with {v['backend']} (no per-request switch); use 'auto' or "
                        f"'reuse'")
    from ..backends.openai import RESPONSE_FORMAT_STYLES

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
    if local_files(v["backend"]):
        problems += _model_file_problems(v)
    raise_invalid(problems, accepted_parameters())
    return CellParams(**v, queries=queries)


def _model_file_problems(v: Mapping[str, Any]) -> list[str]:
    """Every model file the cell needs exists (registry, built variant or path): no model is loaded."""
    from ..models import resolve

    problems = [f"quantization {q!r} is unknown; accepted: shipped, {', '.join(quant_types())}"
                for q in v["quantizations"] if not is_known_quantization(q)]
    names = [(m, q) for m in v["models"] for q in v["quantizations"] if is_known_quantization(q)]
    names += [(v["judge_model"], SHIPPED)] if v["judge_model"] else []
    for model, quant in dict.fromkeys(names):
        try:
            resolve(model_id(v["backend"], model, quant))
        except KitError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))


def notebook_parameters(namespace: Mapping[str, Any], before: set[str]) -> CellParams:
    """The parameters of a running study notebook: every name defined since ``before`` (a snapshot of the
    globals taken in the cell above the ``parameters`` cell), so a misspelt name that papermill injected
    shows up as an unknown parameter instead of being silently ignored."""
    names = [k for k in namespace if k not in before and k != BEFORE_NAME and not _IPYTHON_NAMES.match(k)]
    return validate_parameters({k: namespace[k] for k in names})


def short_error(error: str | None) -> str | None:
    """An error on one line, without the list of accepted parameters (kept in FAILED.json)."""
    if error is None:
        return None
    return " ".join(error.split("\naccepted:")[0].split())
