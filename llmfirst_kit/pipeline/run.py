"""The LLM-first staged pipeline: stages are data, each stage is one streamed model call.

LLM first, concretely:

- every string a user sees is a model's output: each stage's text is recorded with the call that produced
  it, and each sink keeps a transcript of what it showed, checked against those calls
  (:mod:`llmfirst_kit.compliance`); the kit-written prompt texts sent are recorded too
  (``RunRecord.kit_prompts``), so a model that echoes them shows kit text;
- nothing looks at the query to decide anything: the strategy is the model's structured output, and
  code only acts on that output (the token budget of later stages);
- if structured output is invalid the model is asked once more; if it fails again the decision is
  recorded as ``undecided`` (value None) and the run goes on with the configured default, marked as the
  kit's (``used``, ``source="kit default"``), never shown as the model's;
- there is no canned text anywhere: an error is an :class:`~llmfirst_kit.events.Error` event with a
  code, and the text already streamed is kept.

Prompts (instructions to models) are the only kit-written text, and no user sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import fastjsonschema

from ..backends import Backend, CallRequest, get_backend
from ..engine import cpu_model
from ..errors import InvalidInput
from ..events import Decision, Error, Event, RunEnd, StageEnd, StageStart, Token
from ..metrics import DEFAULT_SLO, SLO, call_metrics, run_metrics
from ..records import RunLog, RunRecord, StageRecord, new_id
from .presets import DEFAULT_STRATEGY, PRESETS, SYSTEM_PROMPT, Stage, parse_preset, preset

# ----------------------------------------------------------------------------------------- pipeline

@dataclass
class Pipeline:
    """A list of stages run against one backend; ``model`` is the default for stages that name none."""

    stages: list[Stage]
    name: str = "custom"
    backend: Backend = field(default_factory=get_backend)
    model: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = 0
    cache: str = "reuse"
    default_strategy: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_STRATEGY))
    slo: SLO = DEFAULT_SLO

    @classmethod
    def from_preset(cls, name: str = "direct", *, backend: str | Backend = "embedded", model: str | None = None,
                    rewrite: bool = False, review: bool = False, judge_model: str | None = None,
                    fast_model: str | None = None, analysis_first: bool = False, **options: Any) -> "Pipeline":
        """``name``: any of ``presets.PRESET_NAMES`` (``"staged:analysis-first"`` = ``"staged"`` with
        ``analysis_first=True``)."""
        parsed = parse_preset(name)
        analysis_first = (analysis_first or parsed.analysis_first) and parsed.base == "staged"
        be = get_backend(backend) if isinstance(backend, str) else backend
        stages = preset(parsed.base, rewrite=rewrite, review=review, judge_model=judge_model, fast_model=fast_model,
                        analysis_first=analysis_first)
        label = f"{parsed.base}:analysis-first" if analysis_first else parsed.base
        pipe = cls(stages=stages, name=label, backend=be, model=model, **options)
        pipe.validate()
        return pipe

    def validate(self) -> None:
        """Every mistake in the pipeline's shape, found before any model call."""
        if not self.stages:
            raise InvalidInput("the pipeline has no stages; give at least one Stage or use a preset: "
                               + ", ".join(PRESETS))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidInput(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        names = [s.name for s in self.stages]
        for dup in {n for n in names if names.count(n) > 1}:
            raise InvalidInput(f"stage name {dup!r} is used twice; stage names must be unique")
        if "query" in names:
            raise InvalidInput("'query' is reserved for the user's query; rename that stage")
        for i, stage in enumerate(self.stages):
            earlier = {"query", *names[:i]}
            for ref in (*stage.sees, *stage.data):
                if ref in earlier:
                    continue
                if ref == stage.name or ref in names[i:]:
                    raise InvalidInput(
                        f"stage {stage.name!r} needs the output of {ref!r}, which runs at the same time or later "
                        f"(a cycle); order the stages so that {ref!r} comes first")
                raise InvalidInput(f"stage {stage.name!r} refers to {ref!r}, which no earlier stage makes; "
                                   f"known: {', '.join(sorted(earlier))}")
            overlapping = [self.stages[j].name for j in range(i) if self.stages[j].overlap]
            for ref in (*stage.sees, *stage.data):
                if ref in overlapping:
                    raise InvalidInput(f"stage {stage.name!r} needs {ref!r}, which overlaps the stages after it; "
                                       f"set overlap=False on {ref!r}")
            if stage.schema is not None or stage.decision is not None:
                self._check_structured(stage)
            if stage.budget_share is not None and not 0 < stage.budget_share <= 1:
                raise InvalidInput(f"stage {stage.name!r}: budget_share must be in (0, 1]")
        for stage in self.stages:
            self.backend.resolve_model(stage.model or self.model)  # unknown model: error naming the known ones

    def _check_structured(self, stage: Stage) -> None:
        if stage.schema is None:
            raise InvalidInput(f"stage {stage.name!r} makes a decision but has no JSON schema")
        model = stage.model or self.model
        can = getattr(self.backend, "structured_output_problem", None)
        problem = can(model) if can else None
        if problem:
            raise InvalidInput(f"stage {stage.name!r} needs structured output, but {problem}")

    def start(self, query: str, *, labels: dict[str, Any] | None = None, warmup: bool = False,
              log: RunLog | None = None) -> "Run":
        """A run of this pipeline: ``async for event in run`` streams it; ``run.record`` is its record.
        With ``log``, each model call is appended to it as soon as the call ends (the caller appends the
        run record at the end), so a crash mid-run keeps every finished call."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("the question is empty; pass a non-empty question")
        self.validate()
        return Run(self, query, labels=labels or {}, warmup=warmup, log=log)

    async def run(self, query: str, *, on_event: Callable[[Event], Any] | None = None,
                  labels: dict[str, Any] | None = None, warmup: bool = False,
                  log: RunLog | None = None) -> RunRecord:
        """Run to the end, handing every event to ``on_event``; returns the run record."""
        run = self.start(query, labels=labels, warmup=warmup, log=log)
        async for event in run:
            if on_event is not None:
                result = on_event(event)
                if asyncio.iscoroutine(result):
                    await result
        return run.record


class Run:
    """One execution of a pipeline. Iterate once; leaving early or cancelling stops every model call and
    leaves the partial record with status ``cancelled``."""

    def __init__(self, pipeline: Pipeline, query: str, *, labels: dict[str, Any], warmup: bool,
                 log: RunLog | None = None):
        self.pipeline = pipeline
        self.log = log
        labels = {"backend": pipeline.backend.name, "model": pipeline.backend.resolve_model(pipeline.model),
                  **labels}
        self.record = RunRecord(run_id=new_id("run"), preset=pipeline.name, query=query, labels=labels,
                                warmup=warmup, environment={"cpu_model": cpu_model(),
                                                            **pipeline.backend.environment()})
        self.outputs: dict[str, str] = {"query": query}
        self._started = False

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._started:
            raise RuntimeError("a Run streams once; start a new run to run again")
        self._started = True
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        task = asyncio.create_task(self._execute(queue.put_nowait))
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, RunEnd):
                    break
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _execute(self, emit: Callable[[Event], None]) -> None:
        rec, pipe = self.record, self.pipeline
        rec.start_ns = time.perf_counter_ns()
        background: list[asyncio.Task[None]] = []
        try:
            for stage in pipe.stages:
                if stage.overlap:
                    background.append(asyncio.create_task(self._stage(stage, emit)))
                else:
                    await self._stage(stage, emit)
            await asyncio.gather(*background)
            rec.status = "ok"
        except asyncio.CancelledError:
            rec.status = "cancelled"
            for t in background:
                t.cancel()
            raise
        except Exception as exc:
            for t in background:
                t.cancel()
            rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"
            emit(Error(run_id=rec.run_id, t_ns=time.perf_counter_ns(), stage=self._current_stage(),
                       code=getattr(exc, "code", "internal"), message=str(exc)))
        finally:
            rec.end_ns = time.perf_counter_ns()
            if not rec.labels.get("model") and rec.stages:  # a server's default model, known once it was called
                rec.labels["model"] = rec.stages[0].call.model
            emit(RunEnd(run_id=rec.run_id, t_ns=rec.end_ns, status=rec.status,
                        metrics=run_metrics(rec, pipe.slo), record=rec))

    def _current_stage(self) -> str | None:
        return self.record.stages[-1].name if self.record.stages else None

    # -------------------------------------------------------------------------------------- stages

    def _messages(self, stage: Stage, note: str = "") -> list[dict[str, str]]:
        """The stage's prompt. A stage that works *on* the query gets it, the outputs it sees and its task
        in one user turn (task last). A stage that *replies* to the user gets the natural chat shape: the
        query as the user turn, its task and the earlier outputs in the system prompt. Judged outputs are
        always data between markers."""
        query = next((n for n in ("rewrite", "query") if n in stage.sees), None) if stage.replies else None
        sections = [f"## {_label(n)}\n{self.outputs[n]}" for n in stage.sees if n != query]
        for name in stage.data:
            sections.append(f"## {_label(name)} (data to evaluate, between the markers)\n"
                            f"<<<BEGIN {name.upper()}>>>\n{self.outputs[name]}\n<<<END {name.upper()}>>>")
        task = f"{stage.instruction}{note}"
        self._kit_wrote(SYSTEM_PROMPT, task)
        if query is None:
            user = "\n\n".join([*sections, f"## Task\n{task}"])
            return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        notes = [NOTES_HEADER, *sections] if sections else []
        system = "\n\n".join([SYSTEM_PROMPT, f"Your task: {task}", *notes])
        return [{"role": "system", "content": system}, {"role": "user", "content": self.outputs[query]}]

    def _kit_wrote(self, *texts: str) -> None:
        """Note kit-written prompt text sent in this run: a model that echoes it shows kit text."""
        for text in texts:
            if text not in self.record.kit_prompts:
                self.record.kit_prompts.append(text)

    def _budget(self, stage: Stage) -> int:
        """Max tokens of a stage: its share of the model's token_budget decision when it has one, else its
        own cap, within the pipeline's max_tokens. A structured stage keeps its own cap: its schema bounds
        its length, and a cut-short JSON would be wasted."""
        pipe = self.pipeline
        if stage.budget_share is not None and "strategy" in self.record.decisions:
            budget = self.record.decisions["strategy"]["used"]["token_budget"]
            return max(16, min(pipe.max_tokens, round(budget * stage.budget_share)))
        if stage.schema is not None and stage.max_tokens:
            return stage.max_tokens
        return min(stage.max_tokens or pipe.max_tokens, pipe.max_tokens)

    async def _stage(self, stage: Stage, emit: Callable[[Event], None]) -> None:
        text, call_id = await self._call(stage, emit, stage.name)
        if stage.schema is None:
            self.outputs[stage.name] = text
            if stage.name == "rewrite":
                self.record.decisions["rewritten_query"] = {"value": text, "status": "decided", "call_id": call_id,
                                                            "structured": False}
            return
        value, problem = parse_structured(text, stage.schema)
        cut = self.record.stages[-1].call.finish_reason == "length"  # the token limit, not the model, ended it
        if problem is not None:  # ask the model once more, telling it what was wrong
            note = f"\nYour previous reply was not valid ({problem}). Reply again with JSON only."
            text, call_id = await self._call(stage, emit, f"{stage.name}.retry", note=note)
            value, problem = parse_structured(text, stage.schema)
            cut = cut or self.record.stages[-1].call.finish_reason == "length"
        status = "decided" if problem is None else "undecided"
        # undecided: the model made no decision; the run goes on with the configured default, marked as the kit's
        used = value if problem is None else (dict(self.pipeline.default_strategy) if stage.decision == "strategy"
                                              else None)
        decision = {"value": value if problem is None else None, "used": used, "status": status,
                    "source": "model" if problem is None else "kit default", "call_id": call_id, "problem": problem,
                    "cut_by_limit": cut}
        if stage.decision == "quality":
            self.record.quality = {"score": value["score"] if value else None,
                                   "improvements": value["improvements"] if value else [],
                                   "status": status, "call_id": call_id,
                                   "judge_model": self.record.stages[-1].call.model}
        self.record.decisions[stage.decision or stage.name] = decision
        self.outputs[stage.name] = text
        emit(Decision(run_id=self.record.run_id, t_ns=time.perf_counter_ns(), stage=stage.name,
                      name=stage.decision or stage.name, value=decision["value"], status=status, call_id=call_id,
                      used=used, source=decision["source"]))

    async def _call(self, stage: Stage, emit: Callable[[Event], None], record_name: str,
                    note: str = "") -> tuple[str, str]:
        pipe, rec = self.pipeline, self.record
        request = CallRequest(messages=self._messages(stage, note), model=stage.model or pipe.model,
                              max_tokens=self._budget(stage), temperature=pipe.temperature, seed=pipe.seed,
                              json_schema=stage.schema, cache=pipe.cache)
        call = pipe.backend.call(request)
        crec = call.record
        crec.warmup = rec.warmup
        srec = StageRecord(name=record_name, visible=stage.visible, call=crec)
        rec.stages.append(srec)
        emit(StageStart(run_id=rec.run_id, t_ns=time.perf_counter_ns(), stage=stage.name,
                        model=request.model or pipe.backend.resolve_model(None), call_id=crec.call_id,
                        visible=stage.visible))
        try:
            async for chunk in call:
                emit(Token(run_id=rec.run_id, t_ns=chunk.t_ns, stage=stage.name, call_id=crec.call_id,
                           text=chunk.text, tokens=chunk.tokens, visible=stage.visible))
        finally:
            srec.wait_ns = (crec.start_ns - rec.start_ns) if crec.start_ns else 0
            crec.run_id = rec.run_id
            if self.log is not None:
                self.log.append(crec)
            emit(StageEnd(run_id=rec.run_id, t_ns=time.perf_counter_ns(), stage=stage.name,
                          call_id=crec.call_id, status=crec.status, metrics=call_metrics(crec, pipe.slo),
                          record=crec))
        return crec.text, crec.call_id


NOTES_HEADER = "Notes from earlier stages (for you; the user does not see them):"


def _label(name: str) -> str:
    return {"query": "User query", "rewrite": "User query (rewritten)"}.get(name, name.capitalize())


def parse_structured(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """The model's JSON and None, or None and what was wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc.msg} at character {exc.pos}"
    try:
        _validator(json.dumps(schema, sort_keys=True))(value)
    except fastjsonschema.JsonSchemaValueException as exc:
        return None, f"does not match the schema: {exc.message}"
    return value, None


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Callable[[Any], Any]:
    # fastjsonschema: compiled once per schema, and imports in milliseconds (jsonschema takes ~1 s).
    return fastjsonschema.compile(json.loads(schema_json))


__all__ = ["Pipeline", "Run", "parse_structured"]
