"""The parameters of one grid cell (one execution of the cell notebook, ``llmfirst_kit/assets/study.ipynb``):
one pydantic model, :class:`CellParams` (its fields are the schema, each with its help text as the field's
description; the notebook's ``parameters`` cell holds the defaults and a test keeps the two in step), its
checks before any model call (:func:`validate_parameters`, :func:`notebook_parameters`), and the error
format that lists every problem, then what is accepted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Mapping, get_origin

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      ValidationInfo, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from ..backends import BACKENDS, capabilities
from ..errors import InvalidInput, KitError
from ..metrics import SLO
from ..pipeline import PRESET_NAMES, parse_preset
from .quantization import SHIPPED, is_known_quantization, local_files, model_id, quant_types
from .queries import Query, load_queries

CACHE_MODES = ("auto", "reuse", "cold")
TYPES_ONLY = "types_only"  # validation context key: check names and types, not values (a study file's check)
PROBLEMS = "problems"  # the pydantic error type of a validator's collected value problems (ctx["problems"])

_IPYTHON_NAMES = re.compile(r"^_i?\d+$")  # _i7, _7: IPython's per-execution history names
BEFORE_NAME = "_names_before_parameters"  # the notebook's snapshot of its globals above the parameters cell


def _tuple_to_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# a list of str (a tuple is taken too), each name stripped
Names = Annotated[list[str], BeforeValidator(_tuple_to_list), AfterValidator(lambda xs: [x.strip() for x in xs])]
Counts = Annotated[list[int], BeforeValidator(_tuple_to_list)]
Rates = Annotated[list[float], BeforeValidator(lambda v: [float(x) if isinstance(x, int) and not isinstance(x, bool)
                                                          else x for x in _tuple_to_list(v)]
                                              if isinstance(v, (list, tuple)) else v)]


def problem_error(problems: list[str]) -> PydanticCustomError:
    """The error a validator raises with every value problem it found (formatted by :func:`describe_errors`)."""
    return PydanticCustomError(PROBLEMS, "{text}", {"text": "; ".join(problems), PROBLEMS: problems})


class CellParams(BaseModel):
    """Validated parameters of one notebook execution. The notebook's ``parameters`` cell sets every field
    (its defaults); one execution = one grid cell: the runner passes one-element lists; by hand, any
    lists work. Values are checked (files, presets, model files: no model is loaded) unless the
    validation context says ``types_only``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    backend: str = Field(description=f"one of: {', '.join(BACKENDS)}")
    models: Names = Field(description="model names: embedded registry names or .gguf paths; Ollama or "
                                      "OpenAI-compatible server names")
    quantizations: Names = Field(description="embedded: 'shipped' or a type built by `llmfirst models quantize` "
                                             "(Q8_0, Q4_0, ...); ollama: a tag suffix (model-<q>, e.g. q8_0) or "
                                             "'default'")
    presets: Names = Field(description=f"pipeline presets: {', '.join(PRESET_NAMES)}, each with optional "
                                       "+rewrite, +revise (e.g. staged+revise)")
    queries_file: str = Field(description="JSONL (or CSV) with id, lang, category, query (default: the kit's 72 "
                                          "queries)")
    query_ids: Names = Field(description="query ids to run, in this order ([] = the first query_limit queries)")
    query_limit: int = Field(description="without query_ids: run the first N queries (0 = all)")
    repeats: int = Field(description="measured runs of each query")
    concurrency: Counts = Field(description="load levels, closed loop: requests kept in flight over the queries "
                                            "(a grid axis: one cell per level; [1] = one at a time)")
    rates: Rates = Field(description="load levels, open loop: Poisson arrivals at this many requests/s (a grid "
                                     "axis beside concurrency; [] = none)")
    parallel: int = Field(description="embedded: calls the engine decodes at once (0 = the study's largest "
                                      "concurrency, at least 4)")
    warmup_runs: int = Field(description="runs before measuring, per model x quantization x preset (recorded, "
                                         "marked warmup)")
    seed: int = Field(description="sampling seed")
    temperature: float = Field(description="sampling temperature")
    max_tokens: int = Field(description="max output tokens of a stage")
    ttft_slo_s: float = Field(description="SLO: user-visible time to first token (s)")
    tpot_slo_s: float = Field(description="SLO: time per output token of the answer (s)")
    e2e_slo_s: float = Field(description="SLO: end to end (s)")
    judge_model: str = Field(description="the model that scores every answer 0-100 in its run (the pipeline's "
                                         "review stage: absolute, no baseline; '' = none). Quality vs the "
                                         "baseline: the study's quality_judge")
    cache: str = Field(description="KV cache: auto (cold on embedded, reuse on ollama) | reuse | cold")
    n_threads: int = Field(description="embedded decode threads (0 = all cores)")
    n_ctx: int = Field(description="embedded context size")
    perplexity_text: str = Field(description="text for perplexity / KL of embedded files ('' = skip)")
    perplexity_tokens: int = Field(description="tokens of the text to score")
    ollama_host: str = Field(description="Ollama host ('' = $OLLAMA_HOST or the client's default)")
    openai_base_url: str = Field(description="OpenAI-compatible server URL ('' = $OPENAI_BASE_URL or "
                                             "http://127.0.0.1:8000/v1)")
    openai_response_format: str = Field(description="how JSON schemas are sent to that server: json_schema (vLLM, "
                                                    "SGLang, llama-server) | json_object (llama-cpp-python's "
                                                    "server)")
    output_dir: str = Field(description="where this execution writes records.jsonl (and quality.json)")
    study_name: str = Field(description="label: the study")
    cell: str = Field(description="label: the grid cell")

    _queries: list[Query] = PrivateAttr(default_factory=list)

    @property
    def queries(self) -> list[Query]:
        """The queries to run (``queries_file`` read with ``query_ids`` / ``query_limit``)."""
        return self._queries

    @property
    def slo(self) -> SLO:
        return SLO(ttft_s=self.ttft_slo_s, tpot_s=self.tpot_slo_s, e2e_s=self.e2e_slo_s)

    @property
    def effective_cache(self) -> str:
        if self.cache != "auto":
            return self.cache
        return "cold" if capabilities(self.backend).cold_cache else "reuse"

    @model_validator(mode="after")
    def _check_values(self, info: ValidationInfo) -> CellParams:
        """Every value problem at once (runs only once names and types are right)."""
        if (info.context or {}).get(TYPES_ONLY):
            return self
        problems = self._value_problems()
        if problems:
            raise problem_error(problems)
        return self

    def _value_problems(self) -> list[str]:
        problems: list[str] = []
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r} is unknown; accepted: {', '.join(BACKENDS)}")
        for name in ("models", "quantizations", "presets"):
            names = getattr(self, name)
            if not names or any(not x for x in names):
                problems.append(f"{name} must be a non-empty list of non-empty names")
        for preset in self.presets:
            try:
                parse_preset(preset)
            except InvalidInput as exc:
                problems.append(str(exc))
        if not self.concurrency and not self.rates:
            problems.append("concurrency and rates are both empty: give at least one load level (concurrency: [1])")
        if any(n < 1 for n in self.concurrency):
            problems.append(f"concurrency levels must be >= 1, got {self.concurrency}")
        if any(not r > 0 for r in self.rates):
            problems.append(f"rates must be > 0 requests/s, got {self.rates}")
        for name, low in (("query_limit", 0), ("repeats", 1), ("warmup_runs", 0), ("max_tokens", 1), ("parallel", 0),
                          ("n_threads", 0), ("n_ctx", 256), ("perplexity_tokens", 16)):
            if getattr(self, name) < low:
                problems.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {float(self.temperature)}")
        for name in ("ttft_slo_s", "tpot_slo_s", "e2e_slo_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {float(getattr(self, name))}")
        if self.cache not in CACHE_MODES:
            problems.append(f"cache {self.cache!r} is unknown; accepted: {', '.join(CACHE_MODES)}")
        elif self.cache == "cold" and not (self.backend in BACKENDS and capabilities(self.backend).cold_cache):
            problems.append(f"cache 'cold' is not possible with {self.backend} (no per-request switch); use 'auto' "
                            f"or 'reuse'")
        from ..backends.openai import RESPONSE_FORMAT_STYLES

        if self.openai_response_format not in RESPONSE_FORMAT_STYLES:
            problems.append(f"openai_response_format {self.openai_response_format!r} is unknown; accepted: "
                            f"{', '.join(RESPONSE_FORMAT_STYLES)}")
        if not self.output_dir.strip():
            problems.append("output_dir must name a directory")
        if self.perplexity_text and not Path(self.perplexity_text).is_file():
            problems.append(f"perplexity_text {self.perplexity_text!r} does not exist; pass a text file or ''")
        try:
            self._queries = load_queries(self.queries_file, ids=self.query_ids, limit=self.query_limit)
        except InvalidInput as exc:
            problems.append(str(exc))
        if local_files(self.backend):
            problems += _model_file_problems(self)
        return problems


def _model_file_problems(p: CellParams) -> list[str]:
    """Every model file the cell needs exists (registry, built variant or path): no model is loaded."""
    from ..models import resolve

    problems = [f"quantization {q!r} is unknown; accepted: shipped, {', '.join(quant_types())}"
                for q in p.quantizations if not is_known_quantization(q)]
    names = [(m, q) for m in p.models for q in p.quantizations if is_known_quantization(q)]
    names += [(p.judge_model, SHIPPED)] if p.judge_model else []
    for model, quant in dict.fromkeys(names):
        try:
            resolve(model_id(p.backend, model, quant))
        except KitError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))


def type_name(annotation: Any) -> str:
    """A field's type as the error messages name it: str, int, float, bool, list of str."""
    if get_origin(annotation) in (list, tuple):
        args = [a for a in getattr(annotation, "__args__", ()) if a is not Ellipsis]
        return f"list of {getattr(args[0], '__name__', 'str') if args else 'str'}"
    return getattr(annotation, "__name__", str(annotation))


def accepted(fields: Mapping[str, FieldInfo]) -> str:
    """The lines after "accepted:": every field with its type and help (its description)."""
    return "".join(f"\n  {name} ({type_name(f.annotation)}): {f.description}" for name, f in fields.items())


def accepted_parameters() -> str:
    return accepted(CellParams.model_fields)


def describe_errors(exc: ValidationError, values: Mapping[str, Any], model: type[BaseModel], *,
                    require_all: bool = True) -> list[str]:
    """A pydantic error of ``model`` as problem lines: unknown names, missing names (unless not
    ``require_all``), the problems a field's validator collected, wrong types ("repeats must be int, got
    str '3'"), then the value problems the model's validator collected (``ctx["problems"]``)."""
    fields = model.model_fields
    unknown, missing, nested, values_problems = [], [], [], []
    types: dict[str, str] = {}
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == PROBLEMS:  # a field's own check (names and types of a nested part) or the values'
            (nested if name else values_problems).extend(err["ctx"][PROBLEMS])
        elif err["type"] == "extra_forbidden":
            unknown.append(name)
        elif err["type"] == "missing":
            missing.append(name)
        elif name in fields and name not in types:
            value = values.get(name, err["input"])
            line = f"{name} must be {type_name(fields[name].annotation)}, got {type(value).__name__} {value!r}"
            types[name] = line if err["type"].endswith("_type") else f"{line} ({err['msg']})"
        elif name not in fields:
            values_problems.append(f"{name}: {err['msg']}" if name else err["msg"])
    problems = [f"unknown parameter(s): {', '.join(sorted(unknown))}"] if unknown else []
    if missing and require_all:
        problems.append(f"missing parameter(s): {', '.join(missing)}")
    return problems + nested + list(types.values()) + values_problems


def check_names_and_types(values: Mapping[str, Any], *, require_all: bool = True) -> list[str]:
    """Problems with names and types only (no file or model lookups), by the :class:`CellParams` model;
    without ``require_all`` a parameter may be left out (a study file: the notebook's default)."""
    try:
        CellParams.model_validate(dict(values), context={TYPES_ONLY: True})
    except ValidationError as exc:
        return describe_errors(exc, values, CellParams, require_all=require_all)
    return []


def invalid(problems: list[str], accepted: str) -> InvalidInput:
    """The error listing every problem, then what is accepted (:func:`accepted`)."""
    return InvalidInput("invalid study parameters:\n  - " + "\n  - ".join(problems) + f"\naccepted:{accepted}")


def raise_invalid(problems: list[str], accepted: str) -> None:
    if problems:
        raise invalid(problems, accepted)


def validate_parameters(values: Mapping[str, Any]) -> CellParams:
    """Names, types and values of a cell's parameters, checked before any model call (no model is loaded).
    Name and type problems are listed together, then (once those are right) value problems, each time
    with the accepted parameters."""
    try:
        return CellParams.model_validate(dict(values))
    except ValidationError as exc:
        raise invalid(describe_errors(exc, values, CellParams), accepted_parameters()) from None


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
