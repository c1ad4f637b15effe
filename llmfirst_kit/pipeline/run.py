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
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

import fastjsonschema

from ..backends import Backend, CallRequest, get_backend
from ..engine import cpu_model
from ..errors import BackendError, InvalidInput
from ..events import Decision, Error, Event, RecordLog, RunEnd, StageEnd, StageStart, Token
from ..metrics import DEFAULT_SLO, SLO, call_metrics, run_metrics
from ..records import DecisionRecord, RunRecord, StageRecord, new_id
from .calibration import PLACEHOLDER, Prior, calibrated, option_prior
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
                    fast_model: str | None = None, analysis_first: bool = False, revise: bool = False,
                    **options: Any) -> "Pipeline":
        """``name``: any of ``presets.PRESET_NAMES`` with optional modifiers (``"staged:analysis-first"`` =
        ``"staged"`` with ``analysis_first=True``; ``"direct+rewrite+revise"`` = ``"direct"`` with
        ``rewrite=True, revise=True``). The pipeline's name is the parsed label, the keywords included."""
        parsed = parse_preset(name)
        parsed = replace(parsed, analysis_first=(analysis_first or parsed.analysis_first) and parsed.base == "staged",
                         rewrite=rewrite or parsed.rewrite, revise=revise or parsed.revise)
        be = get_backend(backend) if isinstance(backend, str) else backend
        stages = preset(parsed.base, rewrite=parsed.rewrite, review=review, judge_model=judge_model,
                        fast_model=fast_model, analysis_first=parsed.analysis_first, revise=parsed.revise)
        pipe = cls(stages=stages, name=parsed.label, backend=be, model=model, **options)
        pipe.validate()
        return pipe

    @property
    def query_stages(self) -> tuple[str, ...]:
        """The stages whose output is the query as rewritten (:attr:`Stage.replaces_query`)."""
        return tuple(s.name for s in self.stages if s.replaces_query)

    @property
    def plan_decision(self) -> str | None:
        """The decision that shapes the run's plan (:attr:`Stage.shapes_plan`), if a stage makes one."""
        return next((s.decision or s.name for s in self.stages if s.shapes_plan), None)

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
        planners = [s.name for s in self.stages if s.shapes_plan]
        if len(planners) > 1:
            raise InvalidInput(f"stages {', '.join(planners)} all shape the plan; at most one stage may set shapes_plan")
        for stage in self.stages:
            if (stage.shapes_plan or stage.reviews_answer) and stage.decision is None:
                raise InvalidInput(f"stage {stage.name!r} shapes the plan or reviews the answer, so it must make a "
                                   f"decision: give it decision= and a schema")
            if stage.replaces_query and (stage.schema is not None or stage.decision is not None):
                raise InvalidInput(f"stage {stage.name!r} replaces the query, so its output must be free text; "
                                   f"remove its schema and decision")
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
            if stage.calibrate and (set(stage.sees) - {"query", *self.query_stages} or stage.data):
                raise InvalidInput(f"stage {stage.name!r} is calibrated, so it must see only the query: its prior is "
                                   f"measured on other queries; set calibrate=False or sees=('query',)")
            if any(not isinstance(n, int) or n <= 0 for _, n in stage.budgets):
                raise InvalidInput(f"stage {stage.name!r}: every budget must be a positive number of tokens")
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
              log: RecordLog | None = None) -> "Run":
        """A run of this pipeline: ``async for event in run`` streams it; ``run.record`` is its record.
        With ``log``, each model call is appended to it as soon as the call ends (the caller appends the
        run record at the end), so a crash mid-run keeps every finished call."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("the question is empty; pass a non-empty question")
        self.validate()
        return Run(self, query, labels=labels or {}, warmup=warmup, log=log)

    async def run(self, query: str, *, on_event: Callable[[Event], Any] | None = None,
                  labels: dict[str, Any] | None = None, warmup: bool = False,
                  log: RecordLog | None = None) -> RunRecord:
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
                 log: RecordLog | None = None):
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
                if not self._runs(stage):  # the model's strategy left it out
                    continue
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

    def _messages(self, stage: Stage, note: str = "", tokens: int | None = None) -> list[dict[str, str]]:
        """The stage's prompt. A stage that works *on* the query gets it, the outputs it sees and its task
        in one user turn (task last). A stage that *replies* to the user gets the natural chat shape: the
        query as the user turn, its task and the earlier outputs in the system prompt. A ``query_first``
        stage gets the system prompt, then one user turn: the query first, then the outputs it sees and its task
        (so such stages share their prompt prefix). Judged outputs are always data between markers. A free-text
        stage is told its budget (``tokens``)."""
        query = next((n for n in (*self.pipeline.query_stages, "query") if n in stage.sees), None) \
            if stage.replies or stage.query_first else None
        if stage.system_prompt is not None and query is not None:  # a bare chat: no task, no budget, no notes
            self._kit_wrote(stage.system_prompt)
            return [{"role": "system", "content": stage.system_prompt}, {"role": "user", "content": self.outputs[query]}]
        rewritten = self.pipeline.query_stages
        sections = [f"## {_label(n, rewritten)}\n{self.outputs[n]}" for n in stage.sees
                    if n != query and n in self.outputs]
        for name in stage.data:
            sections.append(f"## {_label(name, rewritten)} (data to evaluate, between the markers)\n"
                            f"<<<BEGIN {name.upper()}>>>\n{self.outputs[name]}\n<<<END {name.upper()}>>>")
        budget = "" if stage.schema is not None or stage.choices or not tokens else BUDGET_NOTE.format(
            words=max(8, round(tokens * WORDS_PER_TOKEN)))
        # what the stage is told of earlier notes only when it has some (the simple path runs no earlier stage)
        with_notes = f" {stage.notes_instruction}" if stage.notes_instruction and sections else ""
        task = f"{stage.instruction}{with_notes}{budget}{note}"
        self._kit_wrote(SYSTEM_PROMPT, task)
        notes = [NOTES_HEADER, *sections] if sections else []
        if notes:
            self._kit_wrote(NOTES_HEADER)
        if query is None:
            user = "\n\n".join([*sections, f"## Task\n{task}"])
            return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        if stage.query_first:
            # one user turn, the query first: every query_first stage of the run begins with the same tokens (the
            # KV cache keeps them); a second user turn for the task cost answer quality (reports/staged/README.md)
            turn = "\n\n".join([self.outputs[query], *notes, f"Your task: {task}"])
            return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": turn}]
        system = "\n\n".join([SYSTEM_PROMPT, f"Your task: {task}", *notes])
        return [{"role": "system", "content": system}, {"role": "user", "content": self.outputs[query]}]

    def _strategy(self) -> str | None:
        """The strategy the run goes on with (the model's, or the kit's default when undecided), if decided yet."""
        name = self.pipeline.plan_decision
        d = self.record.decisions.get(name) if name else None
        used = d.used if d else None
        return used.get(name) if isinstance(used, dict) else None

    def _runs(self, stage: Stage) -> bool:
        """Whether the stage runs: always, unless the strategy taken is not one it runs for, or it runs ``when``
        a decision says so and the model did not decide that (code acts only on the model's structured output)."""
        strategy = self._strategy()
        if stage.runs_for and strategy is not None and strategy not in stage.runs_for:
            return False
        if stage.when:
            name, key = stage.when
            d = self.record.decisions.get(name)
            return bool(d and d.by_model and isinstance(d.value, dict) and d.value.get(key) is True)
        return True

    def _kit_wrote(self, *texts: str) -> None:
        """Note kit-written prompt text sent in this run: a model that echoes it shows kit text."""
        for text in texts:
            if text not in self.record.kit_prompts:
                self.record.kit_prompts.append(text)

    def _budget(self, stage: Stage) -> int:
        """Max tokens of a stage: its budget for the strategy taken when it has one, else its own cap, within
        the pipeline's max_tokens. A structured stage keeps its own cap: a cut-short JSON would be wasted."""
        pipe = self.pipeline
        budgets = dict(stage.budgets)
        strategy = self._strategy()
        if strategy in budgets:
            return min(budgets[strategy], pipe.max_tokens)
        if (stage.schema is not None or stage.choices) and stage.max_tokens:
            return stage.max_tokens
        return min(stage.max_tokens or pipe.max_tokens, pipe.max_tokens)

    async def _stage(self, stage: Stage, emit: Callable[[Event], None]) -> None:
        if self._as_choice(stage):
            return await self._choice(stage, emit)
        # a choice asked for as structured output instead, on a backend that cannot read it from probabilities
        note = JSON_NOTE.format(name=stage.decision or stage.name) if stage.choices else ""
        text, call_id = await self._call(stage, emit, stage.name, note=note)
        if stage.schema is None:
            self.outputs[stage.name] = text
            if stage.replaces_query:
                self.record.decisions["rewritten_query"] = DecisionRecord(
                    value=text, used=text, method="free text", call_id=call_id, structured=False)
            return
        value, problem = parse_structured(text, stage.schema)
        cut = self.record.stages[-1].call.finish_reason == "length"  # the token limit, not the model, ended it
        if problem is not None:  # ask the model once more, telling it what was wrong
            text, call_id = await self._call(stage, emit, f"{stage.name}.retry", note=note, retry_of=(text, problem))
            value, problem = parse_structured(text, stage.schema)
            cut = cut or self.record.stages[-1].call.finish_reason == "length"
        status = "decided" if problem is None else "undecided"
        # undecided: the model made no decision; the run goes on with the configured default, marked as the kit's
        used = value if problem is None else self._default(stage.decision or "")
        decision = DecisionRecord(value=value if problem is None else None, used=used, status=status,
                                  source="model" if problem is None else "kit default", call_id=call_id,
                                  problem=problem, cut_by_limit=cut)
        if stage.reviews_answer:
            self.record.quality = {"score": value["score"] if value else None,
                                   "improvements": value["improvements"] if value else [],
                                   "revise": value["revise"] if value else None,
                                   "status": status, "call_id": call_id,
                                   "judge_model": self.record.stages[-1].call.model}
        self._decided(stage, decision, text)
        emit(Decision(run_id=self.record.run_id, t_ns=time.perf_counter_ns(), stage=stage.name,
                      name=stage.decision or stage.name, value=decision.value, status=status, call_id=call_id,
                      used=used, source=decision.source))

    def _as_choice(self, stage: Stage) -> bool:
        """The stage's decision is read as a choice (one forward pass) when its backend can."""
        return bool(stage.choices) and self.pipeline.backend.capabilities.next_token_choice

    async def _choice(self, stage: Stage, emit: Callable[[Event], None]) -> None:
        """A decision among ``stage.choices``, read from the next-token probabilities after one prefill;
        a ``calibrate`` stage's probabilities are divided by the model's prior first (its decision is the
        largest result). The prior is measured before the decision's call, so that the stages after it find
        the decision's prompt in the KV cache."""
        prior = await self._prior(stage) if stage.calibrate else None
        text, call_id = await self._call(stage, emit, stage.name)
        crec = self.record.stages[-1].call
        name = stage.decision or stage.name
        decided = crec.status == "ok" and crec.choice is not None
        probabilities = dict(zip(crec.choice["options"], crec.choice["probabilities"])) if decided else None
        calibration = None
        if prior is not None:
            calibration = {"method": "batch", "prior": prior.probabilities, "queries": prior.queries,
                           "computed_s": prior.computed_s, "file": prior.file, "raw": probabilities}
            if probabilities is not None:
                probabilities = {o: round(p, 6) for o, p in calibrated(probabilities, prior.probabilities).items()}
        value = {name: max(probabilities, key=probabilities.__getitem__)} if probabilities else None
        used = value if decided else self._default(name)
        decision = DecisionRecord(
            value=value, used=used, status="decided" if decided else "undecided",
            source="model" if decided else "kit default", method="next-token choice", call_id=call_id,
            problem=None if decided else (crec.error or "no choice"), probabilities=probabilities,
            mass=crec.choice["mass"] if decided else None, calibration=calibration)
        self._decided(stage, decision, value[name] if value else text)
        emit(Decision(run_id=self.record.run_id, t_ns=time.perf_counter_ns(), stage=stage.name, name=name,
                      value=value, status=decision.status, call_id=call_id, used=used, source=decision.source,
                      probabilities=probabilities, calibration=calibration))

    async def _prior(self, stage: Stage) -> Prior:
        """The model's prior over the stage's options: its probabilities on the calibration queries, each asked
        with this stage's prompt (computed once per process for a backend, model, prompt and options)."""
        pipe = self.pipeline
        model = stage.model or pipe.model

        def messages_for(query: str) -> list[dict[str, str]]:
            other = Run(pipe, query, labels={}, warmup=True)
            for name in pipe.query_stages:  # a stage that sees the rewritten query: a calibration query in its place
                other.outputs[name] = query
            return other._messages(stage)

        async def probabilities_of(messages: list[dict[str, str]]) -> dict[str, float]:
            rec = await pipe.backend.call(CallRequest(messages=messages, model=model, max_tokens=1,
                                                      temperature=pipe.temperature, seed=pipe.seed,
                                                      choices=list(stage.choices), cache=pipe.cache)).collect()
            if rec.status != "ok" or rec.choice is None:
                raise BackendError(rec.error or "the backend returned no choice")
            return dict(zip(rec.choice["options"], rec.choice["probabilities"]))

        key = {"backend": pipe.backend.name, "host": pipe.backend.location,
               "model": pipe.backend.resolve_model(model), "prompt": messages_for(PLACEHOLDER),
               "options": list(stage.choices)}
        return await option_prior(key, list(stage.choices), messages_for, probabilities_of,
                                  lambda: pipe.backend.model_identity(model))

    def _default(self, name: str) -> Any:
        """What the run goes on with when the model made no decision ``name``: the configured default strategy
        (marked as the kit's); other decisions have none."""
        return dict(self.pipeline.default_strategy) if name == self.pipeline.plan_decision else None

    def _decided(self, stage: Stage, decision: DecisionRecord, text: str) -> None:
        """Record a decision; a strategy also records the plan it makes (which later stages run)."""
        name = stage.decision or stage.name
        self.record.decisions[name] = decision
        self.outputs[stage.name] = text
        if stage.shapes_plan:
            later = self.pipeline.stages[self.pipeline.stages.index(stage) + 1:]
            runs = [s for s in later if self._runs(s) or (s.when and self._runs(replace(s, when=())))]
            decision.plan = {"runs": [s.name for s in runs if not s.when],
                                "if_decided": [s.name for s in runs if s.when],  # e.g. the revision: the judge decides
                                "skipped": [s.name for s in later if s not in runs],
                                "budgets": {s.name: self._budget(s) for s in runs if not s.schema}}

    async def _call(self, stage: Stage, emit: Callable[[Event], None], record_name: str,
                    note: str = "", retry_of: tuple[str, str] | None = None) -> tuple[str, str]:
        """One call of ``stage``; ``retry_of``: (its invalid reply, what was wrong), sent back once."""
        pipe, rec = self.pipeline, self.record
        choice = self._as_choice(stage)
        tokens = self._budget(stage)
        messages = self._messages(stage, note, tokens)
        if retry_of is not None:
            messages = structured_retry(messages, *retry_of)
            self._kit_wrote(messages[-1]["content"])
        request = CallRequest(messages=messages, model=stage.model or pipe.model,
                              max_tokens=tokens, temperature=pipe.temperature, seed=pipe.seed,
                              json_schema=None if choice else stage.schema,
                              choices=list(stage.choices) if choice else None, cache=pipe.cache)
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
JSON_NOTE = ' Reply with JSON only: {{"{name}": "<that word>"}}.'
BUDGET_NOTE = " Use at most about {words} words, and end your reply within them."
WORDS_PER_TOKEN = 0.6  # English ~0.75 words a token, Korean fewer: told in words, kept well inside the tokens


def _label(name: str, rewritten: tuple[str, ...] = ()) -> str:
    if name == "query":
        return "User query"
    return "User query (rewritten)" if name in rewritten else name.capitalize()


def structured_retry(messages: list[dict[str, str]], reply: str, problem: str) -> list[dict[str, str]]:
    """The one structured-output retry (the pipeline's decisions, the judge's verdict elsewhere than embedded):
    the invalid reply stays in the conversation as the model's turn, and a user turn says what was wrong."""
    return [*messages, {"role": "assistant", "content": reply},
            {"role": "user", "content": f"Your reply was not valid ({problem}). Reply again with JSON only."}]


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


__all__ = ["Pipeline", "Run", "parse_structured", "structured_retry"]
