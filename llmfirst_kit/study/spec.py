"""The study file and its grid: a YAML file (or a dict) of the cell notebook's parameters -- ``models``,
``quantizations`` and ``presets`` are the grid's axes -- plus the runner's own keys. One pydantic model,
:class:`StudyFile`: the runner's keys are its fields (the baseline system, its judge and the judge gate are
those of :class:`QualitySettings`, its base), every other key is a notebook parameter, checked by names and
types against :class:`~.params.CellParams` (one left out gets the notebook's default). :func:`load_study`
checks it, :func:`expand_grid` makes one :class:`GridCell` per model x quantization x preset x load level
(``concurrency`` / ``rates``), with the baseline system's cell (:func:`baseline_cell`, one request at a time)
first.
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..backends import BACKENDS, DEFAULT_BACKEND
from ..errors import InvalidInput
from ..pipeline import parse_preset
from ..quality.judge import REASONS_TOKENS
from .load import LoadLevel, engine_parallel, load_levels
from .notebooks import STUDY_NOTEBOOK, notebook_defaults
from .params import CellParams, accepted, check_names_and_types, describe_errors, invalid, problem_error
from .quantization import SHIPPED

RUNNER_SET = ("output_dir", "study_name", "cell")  # notebook parameters the runner sets itself
PATH_KEYS = ("queries_file", "perplexity_text", "notebook", "output_dir")


REFERENCE_MODEL = "qwen2.5-coder-1.5b"  # the default baseline and judge


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Names = Annotated[tuple[str, ...], BeforeValidator(_list_to_tuple)]  # a list of str (YAML) or a tuple


class QualitySettings(BaseModel):
    """The baseline system, its judge and the judge gate (study-level keys of the same names). Values are
    checked on construction (:meth:`problems`, every problem at once)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    baseline_model: str = Field(REFERENCE_MODEL, description="the baseline system every configuration is judged "
                                "against: this model ... (default qwen2.5-coder-1.5b; '' = no baseline, no quality "
                                "verdicts)")
    baseline_backend: str = Field(DEFAULT_BACKEND, description="... on this backend (default embedded) ...")
    baseline_preset: str = Field("direct", description="... with this preset (default direct) ...")
    baseline_quantization: str = Field(SHIPPED, description="... at this quantization (default shipped) ...")
    baseline_max_tokens: int = Field(512, description="... and this max tokens per stage, large enough for complete "
                                     "answers (default 512)")
    quality_judge: str = Field(REFERENCE_MODEL, description="the model that judges each configuration's answers "
                               "against the baseline's, pairwise in both orders (default qwen2.5-coder-1.5b; '' = "
                               "no judging)")
    quality_judge_backend: str = Field(DEFAULT_BACKEND, description="the judge's backend (default embedded)")
    second_judge: str = Field("", description="judges the configurations answered by the judge model itself, so "
                              "that no model only judges itself ('' = those configurations get no quality verdict; "
                              "default '')")
    judge_max_tokens: int = Field(REASONS_TOKENS, description="max tokens of a judgment's reasons (the verdict is a choice "
                                  "read after them; default 160)")
    gate_answers: int = Field(8, description="baseline answers the judge gate plants bad answers from, 5 kinds each "
                              "(default 8)")
    gate_kinds: Names = Field(("other_query", "truncated", "wrong_language", "prompt_echo", "empty", "fact_changed"),
                              description="kinds of planted bad answers: other_query, truncated, wrong_language, "
                              "prompt_echo, empty, fact_changed (one key fact made wrong by the judge model; "
                              "default all)")
    judge_references: bool = Field(True, description="reference-guided judging: the judge sees each query's "
                                   "reference key facts as data (llmfirst bench judge measures both; default true)")
    gate_threshold: float = Field(0.9, description="gate accuracy below which a judge cannot judge: no quality "
                                  "verdict (default 0.9)")
    bootstrap_samples: int = Field(2000, description="bootstrap resamples of the retention interval (default 2000; "
                                   "seeded by `seed`)")
    quality_target: float = Field(0.8, description="meets quality: the retention interval's lower bound >= this "
                                  "(default 0.8)")
    comparisons: Names = Field((), description="head-to-head comparisons, each 'CANDIDATE vs REFERENCE' (two of the "
                               "study's presets, e.g. 'staged vs direct', 'direct+rewrite vs direct'), judged pairwise "
                               "per model x quantization after the same gate; +revise presets are also judged revised "
                               "vs their own draft (default none)")

    def study_presets(self) -> tuple[str, ...] | None:
        """The presets the comparisons must name (None: not checked; a :class:`StudyFile` has its own)."""
        return None

    @model_validator(mode="after")
    def _check_values(self) -> QualitySettings:
        problems = self.problems(self.study_presets())
        if problems:
            raise problem_error(problems)
        return self

    def problems(self, presets: tuple[str, ...] | None = None) -> list[str]:
        """Every value problem; with ``presets``, a comparison must name two of them."""
        out = []
        labels = []
        for p in presets or ():
            try:
                labels.append(parse_preset(p).label)
            except InvalidInput:
                pass  # the cell parameters' check names it
        for text in self.comparisons:
            try:
                pair = parse_comparison(text)
            except InvalidInput as exc:
                out.append(str(exc))
                continue
            missing = [p for p in pair if p not in labels]
            if missing and presets is not None:
                out.append(f"comparison {text!r}: {', '.join(missing)} is not one of the study's presets "
                           f"({', '.join(labels)}); add it to presets")
        for name in ("baseline_backend", "quality_judge_backend"):
            if getattr(self, name) not in BACKENDS:
                out.append(f"{name} {getattr(self, name)!r} is unknown; accepted: {', '.join(BACKENDS)}")
        try:
            parse_preset(self.baseline_preset)
        except InvalidInput as exc:
            out.append(f"baseline_preset: {exc}")
        for name, low in (("baseline_max_tokens", 1), ("judge_max_tokens", 16), ("gate_answers", 1),
                          ("bootstrap_samples", 100)):
            if getattr(self, name) < low:
                out.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        from ..quality.gate import ALL_KINDS as KINDS

        unknown = [k for k in self.gate_kinds if k not in KINDS]
        if unknown or not self.gate_kinds:
            out.append(f"gate_kinds must be a non-empty list of: {', '.join(KINDS)}; got {list(self.gate_kinds)}")
        if not 0 < self.gate_threshold <= 1 or not 0 < self.quality_target <= 1:
            out.append("gate_threshold and quality_target must be in (0, 1]")
        return out


def parse_comparison(text: str) -> tuple[str, str]:
    """``"staged vs direct"`` -> ("staged", "direct"): the candidate preset and its reference."""
    cand, sep, ref = str(text).partition(" vs ")
    if not sep or not cand.strip() or not ref.strip():
        raise InvalidInput(f"comparison {text!r} is not 'CANDIDATE vs REFERENCE' (two preset names, e.g. "
                           f"'staged vs direct')")
    return parse_preset(cand.strip()).label, parse_preset(ref.strip()).label


QUALITY_KEYS = tuple(QualitySettings.model_fields)


class StudyFile(QualitySettings):
    """A study file's keys: the runner's own (these fields and :class:`QualitySettings`'), every other key a
    notebook parameter (``parameters``: names and types checked by :class:`~.params.CellParams`; one left
    out gets the notebook's default; ``models`` and ``presets`` are required)."""

    name: str = Field("", description="the study's name (default: the file name)")
    output_dir: str = Field("", description="the study directory (relative to the study file)")
    notebook: str = Field("", description="the cell notebook (default the kit's own, llmfirst_kit/assets/study.ipynb)")
    cell_timeout_s: int = Field(0, description="papermill timeout of one notebook cell, 0 = none (default 0)")
    exclude: Names = Field((), description="grid cells left out: shell-style patterns matched against cell ids, "
                           "e.g. 'smollm2-135m@Q3_K_S--*' (default none)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the cell notebook's parameters (every "
                                       "key that is not the runner's)")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        """The flat study file -> the runner's keys + ``parameters`` (every other key)."""
        if not isinstance(data, Mapping):
            return data
        runner = {k: v for k, v in data.items() if k in cls.model_fields and k != "parameters"}
        return {**runner, "parameters": {k: v for k, v in data.items() if k not in runner}}

    @field_validator("parameters")
    @classmethod
    def _notebook_parameters(cls, values: dict[str, Any]) -> dict[str, Any]:
        problems = [f"{k} is set by the runner for each cell; remove it" for k in values if k in RUNNER_SET]
        problems += check_names_and_types({k: v for k, v in values.items() if k not in RUNNER_SET},
                                          require_all=False)
        problems += [f"{axis} is required (a list)" for axis in ("models", "presets") if axis not in values]
        if problems:
            raise problem_error(problems)
        return values

    def study_presets(self) -> tuple[str, ...] | None:
        return tuple(self.parameters.get("presets") or ())

    def quality(self) -> QualitySettings:
        return QualitySettings(**{k: getattr(self, k) for k in QUALITY_KEYS})


# the study file's own keys
RUNNER_KEYS = ("name", "output_dir", "notebook", *QUALITY_KEYS, "cell_timeout_s", "exclude")


@dataclass
class StudySpec:
    name: str
    output_dir: Path
    notebook: Path
    parameters: dict[str, Any]  # notebook parameters shared by every cell (grid axes included as lists)
    quality: QualitySettings = field(default_factory=QualitySettings)
    cell_timeout_s: int = 0
    source: str | None = None
    exclude: tuple[str, ...] = ()  # grid cells left out (shell-style patterns over cell ids)

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
                "parameters": self.parameters, **self.quality.model_dump(),
                "cell_timeout_s": self.cell_timeout_s, "exclude": list(self.exclude), "source": self.source}


def accepted_study_keys() -> str:
    fields = StudyFile.model_fields
    keys = {**{k: fields[k] for k in RUNNER_KEYS},
            **{k: f for k, f in CellParams.model_fields.items() if k not in RUNNER_SET}}
    return accepted(keys)


def load_study(study: str | os.PathLike[str] | Mapping[str, Any], *, output_dir: str | os.PathLike[str] | None = None
               ) -> StudySpec:
    """A study from a YAML file or a dict. Keys are the notebook's parameters (``models``, ``quantizations``
    and ``presets`` are the grid's axes) plus the runner's own (:class:`StudyFile`); relative paths are
    relative to the YAML file (to the working directory for a dict). Unknown keys or wrong types fail here,
    listing what is accepted; model names are checked by each cell (an unknown model fails that cell only)."""
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
    try:
        sf = StudyFile.model_validate(data)
    except ValidationError as exc:
        raise invalid(describe_errors(exc, data, StudyFile), accepted_study_keys()) from None

    def resolve(p: str) -> str:
        return str((base / Path(p).expanduser()).resolve())

    data = dict(sf.parameters)
    for key in PATH_KEYS:
        if data.get(key):
            data[key] = resolve(data[key])
    name = sf.name or (Path(source).stem if source else "study")
    out = output_dir or (resolve(sf.output_dir) if sf.output_dir else None) or (Path.cwd() / "runs" / name)
    notebook = Path(resolve(sf.notebook) if sf.notebook else STUDY_NOTEBOOK)
    notebook_keys = [k for k in CellParams.model_fields if k not in RUNNER_SET]
    parameters = {k: v for k, v in notebook_defaults(notebook).items() if k in notebook_keys}
    for key in ("queries_file", "perplexity_text"):  # the notebook's defaults are relative to the notebook
        if parameters.get(key) and not Path(parameters[key]).is_absolute():
            parameters[key] = str((notebook.parent / parameters[key]).resolve())
    parameters.update(data)
    parameters.setdefault("quantizations", [SHIPPED])
    return StudySpec(name=name, output_dir=Path(out).expanduser().resolve(),
                     notebook=notebook, parameters=parameters, quality=sf.quality(),
                     cell_timeout_s=sf.cell_timeout_s, source=source, exclude=tuple(sf.exclude))


@dataclass(frozen=True)
class GridCell:
    id: str
    model: str
    quantization: str
    preset: str
    parameters: dict[str, Any]
    role: str = "grid"  # grid | baseline (the baseline system's answers, which the others are judged against)
    backend: str = ""
    load: str = ""  # the load level (LoadLevel.key: c4 = 4 in flight, r0.5 = 0.5 requests/s); "" = one at a time


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+=-]+", "_", text).strip("_") or "x"


def expand_grid(spec: StudySpec) -> list[GridCell]:
    """models x quantizations x presets x load levels (``concurrency``, then ``rates``), in that order. The
    first preset of each model x quantization also measures perplexity / KL (once per model file). A study
    with the one default level (concurrency [1]) keeps cell ids without a load suffix."""
    p = spec.parameters
    levels = load_levels(p)
    one_at_a_time = levels == [LoadLevel("concurrency", 1)]
    parallel = engine_parallel(p)
    cells: list[GridCell] = []
    seen: set[str] = set()
    for model in p["models"]:
        short = Path(model).stem if model.endswith(".gguf") else model
        for quant in p["quantizations"]:
            for i, preset in enumerate(p["presets"]):
                for j, level in enumerate(levels):
                    cid = _slug(f"{short}@{quant}--{preset}" + ("" if one_at_a_time else f"--{level.key}"))
                    while cid in seen:
                        cid += "+"
                    seen.add(cid)
                    params = {**p, "models": [model], "quantizations": [quant], "presets": [preset],
                              **level.parameters(), "parallel": parallel,
                              "output_dir": str(spec.output_dir / "cells" / cid), "study_name": spec.name,
                              "cell": cid,
                              "perplexity_text": p.get("perplexity_text", "") if i == 0 and j == 0 else ""}
                    cells.append(GridCell(id=cid, model=model, quantization=quant, preset=preset,
                                          parameters=params, backend=p.get("backend", DEFAULT_BACKEND),
                                          load="" if one_at_a_time else level.key))
    cells = _without_excluded(cells, spec.exclude)
    baseline = baseline_cell(spec, cells)
    if baseline is not None and baseline not in cells:
        cells.insert(0, baseline)  # first: its answers are what every other cell is judged against
    return cells


def _without_excluded(cells: list[GridCell], patterns: Sequence[str]) -> list[GridCell]:
    """The grid minus the cells an ``exclude`` pattern matches; a pattern matching no cell is an error (a typo
    would otherwise run the cell it meant to leave out)."""
    unused = [p for p in patterns if not any(fnmatchcase(c.id, p) for c in cells)]
    if unused:
        raise InvalidInput(f"exclude: {', '.join(map(repr, unused))} matches no grid cell; the cells are: "
                           f"{', '.join(c.id for c in cells)}")
    kept = [c for c in cells if not any(fnmatchcase(c.id, p) for p in patterns)]
    if not kept:
        raise InvalidInput("exclude leaves no grid cell; remove a pattern")
    return kept


def baseline_cell(spec: StudySpec, grid: list[GridCell]) -> GridCell | None:
    """The cell that answers as the baseline system: a grid cell with exactly the baseline's settings, or a
    cell of its own (``baseline--...``; no perplexity, its own max tokens). None without a baseline."""
    q, p = spec.quality, spec.parameters
    if not q.baseline_model:
        return None
    for cell in grid:
        if (cell.backend == q.baseline_backend and cell.model == q.baseline_model
                and cell.quantization.lower() == q.baseline_quantization.lower() and cell.preset == q.baseline_preset
                and p.get("max_tokens") == q.baseline_max_tokens and cell.load in ("", "c1")):
            return cell
    short = Path(q.baseline_model).stem if q.baseline_model.endswith(".gguf") else q.baseline_model
    cid = _slug(f"baseline--{short}@{q.baseline_quantization}--{q.baseline_preset}")
    params = {**p, "backend": q.baseline_backend, "models": [q.baseline_model],
              "quantizations": [q.baseline_quantization], "presets": [q.baseline_preset],
              "max_tokens": q.baseline_max_tokens, "perplexity_text": "", **LoadLevel("concurrency", 1).parameters(),
              "parallel": engine_parallel(p),
              "output_dir": str(spec.output_dir / "cells" / cid), "study_name": spec.name, "cell": cid}
    return GridCell(id=cid, model=q.baseline_model, quantization=q.baseline_quantization, preset=q.baseline_preset,
                    parameters=params, role="baseline", backend=q.baseline_backend)
