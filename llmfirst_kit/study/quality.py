"""A study's quality phase: after the cells have answered, the judge gate, then pairwise judging of every
configuration against the baseline system, then retention per configuration.

Why after the cells, in the runner's process: a configuration is judged against the *baseline's* answers
to the same queries, which another cell produced; and the judge model is loaded once for the whole study.
(With the Dask executor the cells run on the workers; the judging runs where the runner runs.)

- **Which queries**: an answer is the text of the pipeline's ``answer`` stage; it is complete when that call
  ended on its own (``finish_reason == "stop"``), not on the token limit. The judged queries are those the
  baseline answered completely; on them every configuration's answer is judged as its user saw it, cut off or
  not (a model that loops until the limit is judged on its loops). The same queries for every configuration: a
  configuration's own truncation does not choose which of its answers are judged. Below half of the queries
  answered completely by the baseline, no configuration gets a verdict (raise ``max_tokens``).
- **Which judge**: ``quality_judge`` (default the 1.5B model), on ``quality_judge_backend``. A configuration
  answered by that very model (same backend and model file) is judged by ``second_judge`` instead, so that no
  model only judges itself; without a second judge it gets no quality verdict.
- **The gate first**: each judge used is gated on planted bad answers built from the baseline's complete
  answers (``llmfirst_kit.quality.gate``); below ``gate_threshold`` its verdicts are not shown.
- **Identical answers** (the candidate's text equals the baseline's, e.g. a Q8_0 variant decoding greedily)
  are ties by definition and are not sent to the judge; they are counted (``identical_answers``).
- **Resumable**: every judged pair is appended (fsync'ed) to ``DIR/judging/judgments.jsonl``, keyed by the
  run ids it compares; a rerun judges only what is missing, and a redone cell (new run ids) is judged again.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

from ..backends import DEFAULT_BACKEND
from ..errors import KitError
from ..pipeline import parse_preset
from ..quality.facts import key_fact_recall, mean_recall, reference_sentences
from ..quality.language import language_match
from ..quality.gate import (GATE_THRESHOLD, KINDS, GatePair, GateResult, RealAnswer, fact_changed_pairs, gate_result,
                            planted_pairs)
from ..quality.judge import PROMPT_VERSION, REASONS_TOKENS, REFERENCE_PROMPT_VERSION, PairwiseJudge
from ..quality.retention import Outcome, Retention, bootstrap_ci, judgment_outcome, query_score, retention
from ..records import RunRecord
from ..sync import gather_at_most
from .load import quality_cells
from .quantization import SHIPPED, safe_model_id
from .queries import load_queries
from .spec import parse_comparison
from .store import StudyResults, load_results

JUDGING = "judging"
JUDGMENTS = "judgments.jsonl"
MIN_COMPLETE_SHARE = 0.5  # below this share of complete baseline answers no configuration gets a quality verdict


# ------------------------------------------------------------------------------------------ answers

def answer_call(rec: RunRecord):
    """The call that produced the run's answer (:meth:`RunRecord.answer_call`: its last visible stage)."""
    return rec.answer_call()


def draft_call(rec: RunRecord):
    """The draft a ``+revise`` run's revision improved on: its ``answer`` stage (the presets' name for it)."""
    return next((s.call for s in reversed(rec.stages) if s.name == "answer"), None)


def revised(rec: RunRecord) -> bool:
    """The judge decided to revise the run's answer and the revision ran (``+revise`` presets)."""
    return any(s.name == "revision" for s in rec.stages)


def answer_text(rec: RunRecord) -> str:
    call = answer_call(rec)
    return call.text if call is not None else ""


def is_complete(rec: RunRecord) -> bool | None:
    """True: the answer ended on its own; False: cut off at the token limit (or failed); None: no answer."""
    call = answer_call(rec)
    if call is None:
        return None
    return rec.status == "ok" and call.finish_reason == "stop"


def answered(rec: RunRecord) -> bool:
    """The run answered: its answer ended on its own or on the token limit (what its user saw either way)."""
    call = answer_call(rec)
    return rec.status == "ok" and call is not None and call.finish_reason in ("stop", "length")


def judged_queries(queries: Iterable[str], reference: Mapping[str, RunRecord],
                   candidate: Mapping[str, RunRecord]) -> list[str]:
    """The queries a comparison judges, in ``queries`` order: the reference (the baseline) answered completely,
    the candidate answered, cut off or not. The judging, the verdicts' completeness check and ``key_fact_diff``
    all use this one plan."""
    return [q for q in queries if reference.get(q) is not None and is_complete(reference[q])
            and candidate.get(q) is not None and answered(candidate[q])]


def is_truncated(rec: RunRecord) -> bool | None:
    call = answer_call(rec)
    return None if call is None else call.finish_reason == "length"


def cell_answers(runs: Iterable[RunRecord], cell: str) -> dict[str, RunRecord]:
    """Query id -> the cell's first measured successful run of that query (repeat 0 where there are several)."""
    out: dict[str, RunRecord] = {}
    for r in sorted((r for r in runs if r.labels.get("cell") == cell and not r.warmup and r.status == "ok"),
                    key=lambda r: r.labels.get("repeat", 0)):
        out.setdefault(str(r.labels.get("query_id")), r)
    return out


# -------------------------------------------------------------------------------------------- judges

@dataclass(frozen=True)
class JudgeChoice:
    model: str | None  # None: no judge may judge this configuration
    backend: str
    note: str | None = None  # why there is no judge, or that the second judge was used


def judge_for(cell: Mapping[str, Any], spec: Mapping[str, Any]) -> JudgeChoice:
    """The judge of a configuration: the quality judge, or the second judge when the configuration's own model
    (same backend, same file) is the quality judge."""
    judge, jb = spec.get("quality_judge") or "", spec.get("quality_judge_backend") or DEFAULT_BACKEND
    if not judge:
        return JudgeChoice(None, jb, "no quality_judge")
    backend = cell.get("backend") or spec["parameters"].get("backend", DEFAULT_BACKEND)
    mine = safe_model_id(backend, cell["model"], cell["quantization"])
    if backend == jb and mine is not None and mine == safe_model_id(jb, judge, SHIPPED):
        second = spec.get("second_judge") or ""
        if not second:
            return JudgeChoice(None, jb, f"answered by the judge model {judge} itself and no second_judge is set: "
                                         f"a model never only judges itself")
        return JudgeChoice(second, jb, f"judged by second_judge {second} (the quality judge answered it)")
    return JudgeChoice(judge, jb)


def _make_judge(model: str, backend_name: str, spec: Mapping[str, Any]) -> PairwiseJudge:
    from ..backends import backend_options, get_backend

    p = spec["parameters"]
    options = backend_options(backend_name, model=model, host=p.get("ollama_host") or None,
                              base_url=p.get("openai_base_url") or None, n_threads=p.get("n_threads") or None,
                              n_ctx=max(int(p.get("n_ctx") or 4096), 4096),  # room for two answers and a verdict
                              response_format_style=p.get("openai_response_format") or None)
    backend = get_backend(backend_name, **options)
    judge = PairwiseJudge(backend, model, max_tokens=int(spec.get("judge_max_tokens") or REASONS_TOKENS),
                          seed=int(p.get("seed") or 0))
    judge.check()
    return judge


# ----------------------------------------------------------------------------------------- the log

def _key(line: Mapping[str, Any]) -> tuple:
    return (line["type"], line["judge"], line.get("cell") or line.get("kind"), line["query_id"],
            line.get("baseline_run_id"), line.get("candidate_run_id"), line.get("prompt_version"))


def read_judgments(study_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(study_dir) / JUDGING / JUDGMENTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: that pair is judged again
                continue
    return out


class _Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def append(self, line: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------- the phase

def gate_answers(baseline: Mapping[str, RunRecord], queries: Mapping[str, Any], n: int) -> list[RealAnswer]:
    """Up to ``n`` complete baseline answers for the gate, alternating between the queries' languages (in
    query order), so that both languages are tested. An answer that misses one of its query's reference key
    facts is not known-good ("호주의 수도는 서울입니다." for the capital of Australia), so it is never a gate's
    real answer: a judge preferring a planted answer to it would be right, and the gate would fail a judge for
    the baseline's mistake. (Key facts only evaluate: they choose the gate's material, never an answer.)"""
    by_lang: dict[str, list[RealAnswer]] = {}
    for qid, q in queries.items():
        rec = baseline.get(qid)
        if rec is None or not is_complete(rec) or not answer_text(rec).strip():
            continue
        recall = key_fact_recall(answer_text(rec), q.facts)
        if recall is not None and recall < 1.0:
            continue
        by_lang.setdefault(q.lang, []).append(RealAnswer(query_id=qid, query=q.query, text=answer_text(rec),
                                                         lang=q.lang, twin=q.twin, facts=tuple(q.facts)))
    out: list[RealAnswer] = []
    lists = list(by_lang.values())
    i = 0
    while len(out) < n and any(i < len(lst) for lst in lists):
        out += [lst[i] for lst in lists if i < len(lst)]
        i += 1
    return out[:n]


def judge_version(spec: Mapping[str, Any]) -> str:
    """What a study's judgments are made with: the judge's prompt version, its reasons budget
    (``judge_max_tokens``) and, when it judges with references, the reference prompt's version. Stored with every
    judgment; a change in any means judging again."""
    version = f"{PROMPT_VERSION}+{int(spec.get('judge_max_tokens') or REASONS_TOKENS)}"
    return f"{version}+ref-{REFERENCE_PROMPT_VERSION}" if spec.get("judge_references") else version


def study_queries(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The study's queries by id (a KitError when its query file cannot be read)."""
    p = spec["parameters"]
    return {q.id: q for q in load_queries(p["queries_file"], ids=p.get("query_ids") or (),
                                          limit=p.get("query_limit") or 0)}


def gate_runs(spec: Mapping[str, Any], baseline: Mapping[str, RunRecord],
              queries: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Query id -> baseline run id of the answers the study's gate is built from now: gate lines of other
    answers (an older choice, a redone baseline) are not this gate's figure. ``queries``: the study's, if
    already read."""
    if queries is None:
        try:
            queries = study_queries(spec)
        except KitError:
            return {}
    reals = gate_answers(baseline, queries, int(spec.get("gate_answers") or 8))
    return {a.query_id: baseline[a.query_id].run_id for a in reals}


# what a failed gate's note tells the reader to do
STRONGER_JUDGE = "use a stronger quality_judge (any backend: quality_judge_backend)"

JUDGE_CONCURRENCY = 4  # pairs judged at once (two calls each, both orders): the embedded engine batches them


async def _at_once(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` with at most JUDGE_CONCURRENCY in flight (each logs its own judgment as it ends)."""
    await gather_at_most(JUDGE_CONCURRENCY, (job() for job in jobs))


async def _fact_changed(judge: PairwiseJudge, reals: list[RealAnswer], done: Mapping[Any, dict[str, Any]],
                        echo: Callable[[str], Any]) -> list[GatePair]:
    """The gate's ``fact_changed`` pairs, written by the judge model from the real answers; those already in the
    judgments log are read back (not written again), so a resumed study judges the same pairs."""
    known = {ln["query_id"]: GatePair(**ln["pair"]) for ln in done.values()
             if ln.get("type") == "gate" and ln.get("kind") == "fact_changed" and ln.get("judge") == judge.model
             and ln.get("pair")}
    missing = [a for a in reals if a.query_id not in known]
    written = await fact_changed_pairs(judge.backend, missing, model=judge.model,
                                       on_rejected=lambda a, why: echo(f"gate fact_changed {a.query_id}: {why}"))
    by_id = {**known, **{p.query_id: p for p in written}}
    return [by_id[a.query_id] for a in reals if a.query_id in by_id]


async def judge_study_async(study_dir: str | os.PathLike[str], *, echo: Callable[[str], Any] = print
                            ) -> dict[str, Any]:
    """Gate every judge the study needs, then judge every finished configuration against the baseline.
    Returns counts; the judgments are in ``DIR/judging/judgments.jsonl``."""
    d = Path(study_dir)
    res = load_results(d)
    spec = res.spec
    version = judge_version(spec)
    base_id = res.baseline_cell
    counts = {"gate_pairs": 0, "pairs": 0, "identical": 0, "skipped": 0}
    if not base_id or not spec.get("quality_judge"):
        echo("quality: no baseline or no quality_judge in this study: no quality verdicts")
        return counts
    base_cell = next((c for c in res.cells if c["id"] == base_id), None)
    if base_cell is None or base_cell["state"] != "done":
        echo(f"quality: the baseline cell {base_id} is not done: no quality verdicts")
        return counts
    p = spec["parameters"]
    queries = study_queries(spec)
    baseline = cell_answers(res.runs, base_id)
    done = {_key(line): line for line in read_judgments(d)}
    log = _Log(d / JUDGING / JUDGMENTS)
    judges: dict[tuple[str, str], PairwiseJudge] = {}
    judged_cell = quality_cells(res.cells)  # one judged cell per configuration: its lowest load level
    plan = [(c, judge_for(c, spec)) for c in res.cells
            if c["state"] == "done" and c["id"] != base_id and judged_cell.get(c["id"]) == c["id"]]
    versus = comparison_plan(res)
    needed = list(dict.fromkeys((j.model, j.backend) for _, j in plan if j.model))
    reals = gate_answers(baseline, queries, int(spec.get("gate_answers") or 8))
    kinds = list(spec.get("gate_kinds") or KINDS)
    planted = planted_pairs(reals, kinds=[k for k in kinds if k in KINDS], seed=int(p.get("seed") or 0))
    base_runs = {a.query_id: baseline[a.query_id].run_id for a in reals}
    refs = {qid: reference_sentences(q.facts, q.lang) for qid, q in queries.items()} \
        if spec.get("judge_references") else {}
    for model, backend in needed:
        judge = judges.setdefault((model, backend), _make_judge(model, backend, spec))
        pairs = planted + (await _fact_changed(judge, reals, done, echo) if "fact_changed" in kinds else [])
        t0 = time.perf_counter()
        jobs = []
        for pair in pairs:
            line = {"type": "gate", "judge": model, "judge_backend": backend, "prompt_version": version,
                    "kind": pair.kind,
                    "query_id": pair.query_id, "baseline_run_id": base_runs[pair.query_id], "candidate_run_id": None}
            if (done.get(_key(line)) or {}).get("pair") == pair.to_dict():
                continue  # judged already (a pair planted otherwise since, e.g. from more answers, is judged anew)

            async def gate_pair(pair: Any = pair, line: dict[str, Any] = line, judge: PairwiseJudge = judge,
                                model: str = model) -> None:
                js = await judge.compare(pair.query, pair.real, pair.planted, labels=("real", "planted"),
                                         reference=refs.get(pair.query_id))
                log.append({**line, "pair": pair.to_dict(), "judgments": [j.to_dict() for j in js]})
                counts["gate_pairs"] += 1
                echo(f"gate {model} {pair.kind} {pair.query_id}: {' / '.join(str(j.winner) for j in js)} "
                     f"({sum(j.seconds or 0 for j in js):.1f} s)")

            jobs.append(gate_pair)
        await _at_once(jobs)
        if pairs:
            echo(f"gate {model}: {len(pairs)} pairs in {time.perf_counter() - t0:.0f} s")
    jobs = []
    for cell, choice in plan:
        if choice.model is None:
            continue
        judge = judges[(choice.model, choice.backend)]
        mine = cell_answers(res.runs, cell["id"])
        judged = judged_queries(queries, baseline, mine)
        counts["skipped"] += len(queries) - len(judged)
        for qid in judged:
            q, b, c = queries[qid], baseline[qid], mine[qid]
            line = {"type": "pair", "judge": choice.model, "judge_backend": choice.backend,
                    "prompt_version": version, "cell": cell["id"],
                    "query_id": qid, "baseline_run_id": b.run_id, "candidate_run_id": c.run_id}
            if _key(line) in done:
                continue
            if answer_text(b).strip() == answer_text(c).strip():
                log.append({**line, "identical": True, "judgments": []})
                counts["identical"] += 1
                continue

            async def cell_pair(line: dict[str, Any] = line, q: Any = q, b: Any = b, c: Any = c,
                                judge: PairwiseJudge = judge) -> None:
                js = await judge.compare(q.query, answer_text(b), answer_text(c), labels=("baseline", "candidate"),
                                         reference=refs.get(line["query_id"]))
                log.append({**line, "identical": False, "judgments": [j.to_dict() for j in js]})
                counts["pairs"] += 1
                echo(f"judge {line['judge']} {line['cell']} {line['query_id']}: "
                     f"{' / '.join(str(j.winner) for j in js)} ({sum(j.seconds or 0 for j in js):.1f} s)")

            jobs.append(cell_pair)
    await _at_once(jobs)

    async def judge_pair(line: dict[str, Any], q: Any, ref: str, cand: str, echo_label: str) -> None:
        if _key(line) in done:
            return
        if ref.strip() == cand.strip():
            log.append({**line, "identical": True, "judgments": []})
            counts["identical"] += 1
            return
        js = await judges[(line["judge"], line["judge_backend"])].compare(q.query, ref, cand,
                                                                          labels=("baseline", "candidate"),
                                                                          reference=refs.get(line["query_id"]))
        log.append({**line, "identical": False, "judgments": [j.to_dict() for j in js]})
        counts["pairs"] += 1
        echo(f"{echo_label} {line['cell']} {line['query_id']}: {' / '.join(str(j.winner) for j in js)} "
             f"({sum(j.seconds or 0 for j in js):.1f} s)")

    # head to head: each comparison's candidate against its reference, same model and quantization
    jobs = []
    for cand, ref in versus:
        choice = judge_for(cand, spec)
        if choice.model is None or (choice.model, choice.backend) not in judges:
            continue
        mine, theirs = cell_answers(res.runs, cand["id"]), cell_answers(res.runs, ref["id"])
        judged = judged_queries(queries, theirs, mine)
        counts["skipped"] += len(queries) - len(judged)
        for qid in judged:
            q, c, r = queries[qid], mine[qid], theirs[qid]
            line = {"type": "versus", "judge": choice.model, "judge_backend": choice.backend,
                    "prompt_version": version, "cell": cand["id"], "reference_cell": ref["id"],
                    "query_id": qid, "baseline_run_id": r.run_id, "candidate_run_id": c.run_id}
            jobs.append(functools.partial(judge_pair, line, q, answer_text(r), answer_text(c), "versus"))
    # revised against its own draft, in every run where the judge decided to revise
    for cell, choice in plan:
        if choice.model is None or not parse_preset(cell["preset"]).revise:
            continue
        for qid, rec in cell_answers(res.runs, cell["id"]).items():
            if qid not in queries or not revised(rec) or not is_complete(rec):
                continue
            line = {"type": "revision", "judge": choice.model, "judge_backend": choice.backend,
                    "prompt_version": version, "cell": cell["id"], "query_id": qid,
                    "baseline_run_id": rec.run_id, "candidate_run_id": rec.run_id}
            jobs.append(functools.partial(judge_pair, line, queries[qid], draft_call(rec).text,
                                          answer_text(rec), "revision"))
    await _at_once(jobs)
    for judge in judges.values():
        await judge.backend.aclose()
    return counts


def comparison_plan(res: StudyResults) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(candidate cell, reference cell) for each of the study's ``comparisons``, per model x quantization,
    both cells done (the baseline system's cell can be a reference, never a candidate: it judges nothing)."""
    done = [c for c in res.cells if c["state"] == "done"]
    out = []
    for text in res.spec.get("comparisons") or ():
        cand, ref = parse_comparison(text)
        for c in done:
            if c["preset"] != cand or c["id"] == res.baseline_cell:
                continue
            r = next((x for x in done if x["preset"] == ref and x["model"] == c["model"]
                      and x["quantization"] == c["quantization"] and x.get("backend") == c.get("backend")), None)
            if r is not None:
                out.append((c, r))
    return out


def judge_study(study_dir: str | os.PathLike[str], *, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    from ..sync import run_sync

    return run_sync(judge_study_async(study_dir, echo=echo))


# --------------------------------------------------------------------------------------- results

def gate_results(study_dir: str | os.PathLike[str], lines: list[dict[str, Any]] | None = None,
                 threshold: float = GATE_THRESHOLD, current: Mapping[str, str] | None = None, *,
                 version: str) -> dict[str, GateResult]:
    """Judge model -> its gate result, from the judgment log (``current``: query id -> the baseline run id the
    gate must be built from; older lines, of a redone baseline, are left out; ``version``: the study's
    :func:`judge_version`)."""
    lines = read_judgments(study_dir) if lines is None else lines
    latest: dict[tuple, dict[str, Any]] = {}  # a pair judged again (planted anew) counts once, as last judged
    for line in lines:
        if line["type"] != "gate":
            continue
        if current is not None and current.get(line["query_id"]) != line["baseline_run_id"]:
            continue
        if line.get("prompt_version") != version:  # judged with another prompt or budget: not this judge's figure
            continue
        latest[_key(line)] = line
    by_judge: dict[str, list[tuple[GatePair, list[dict[str, Any]]]]] = {}
    backends: dict[str, str] = {}
    for line in latest.values():
        by_judge.setdefault(line["judge"], []).append((GatePair(**line["pair"]), line["judgments"]))
        backends[line["judge"]] = line.get("judge_backend", "")
    return {j: gate_result(v, threshold=threshold, judge_model=j, judge_backend=backends[j]) for j, v in by_judge.items()}


def pair_outcomes(lines: Iterable[Mapping[str, Any]]) -> tuple[dict[str, list[Outcome]], list[str | None], int]:
    """From judgment-log lines of one comparison: each query's outcomes (the verdicts' probabilities where the
    judge gave them, see ``retention.judgment_outcome``), the raw verdicts (for the first-position rate), and
    how many queries had identical answers (tied without a call)."""
    outcomes: dict[str, list[Outcome]] = {}
    positions: list[str | None] = []
    identical = 0
    for ln in lines:
        if ln.get("identical"):
            outcomes[ln["query_id"]] = ["tie", "tie"]
            identical += 1
        else:
            outcomes[ln["query_id"]] = [judgment_outcome(j) for j in ln["judgments"]]
            positions += [j["verdict"] for j in ln["judgments"]]
    return outcomes, positions, identical


def key_fact_difference(answers: Mapping[str, RunRecord], baseline: Mapping[str, RunRecord],
                        queries: Mapping[str, Any], *, n_boot: int, seed: int) -> dict[str, Any]:
    """Judge-free and lexical, beside the judge: the configuration's key-fact recall minus the baseline's, paired
    query by query over the judged queries (the baseline's answer complete, the configuration's answered, cut off
    or not), with a bootstrap interval. It still says something where a judge fails its gate; it misses a fact
    stated in other words, so it never gives a verdict."""
    diffs = []
    for q in judged_queries(queries, baseline, answers):
        mine, theirs = (key_fact_recall(answer_text(r), queries[q].facts) for r in (answers[q], baseline[q]))
        if mine is not None and theirs is not None:
            diffs.append(mine - theirs)
    low, high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    return {"key_fact_diff": sum(diffs) / len(diffs) if diffs else None, "key_fact_diff_ci_low": low,
            "key_fact_diff_ci_high": high, "key_fact_diff_queries": len(diffs)}


def quality_columns(res: StudyResults) -> dict[str, dict[str, Any]]:
    """Cell id -> its quality columns: the judge, its gate, retention with interval, order disagreement,
    key-fact recall, truncation, and why there is no verdict when there is none."""
    spec = res.spec
    p = spec["parameters"]
    target = float(spec.get("quality_target", 0.8))
    threshold = float(spec.get("gate_threshold", GATE_THRESHOLD))
    n_boot = int(spec.get("bootstrap_samples") or 2000)
    seed = int(p.get("seed") or 0)
    try:
        queries = study_queries(spec)
    except KitError:
        queries = {}
    base_id = res.baseline_cell
    baseline = cell_answers(res.runs, base_id) if base_id else {}
    base_complete = sum(bool(is_complete(r)) for r in baseline.values())
    lines = read_judgments(res.directory)
    version = judge_version(spec)
    gates = gate_results(res.directory, lines, threshold, gate_runs(spec, baseline, queries), version=version)
    out: dict[str, dict[str, Any]] = {}
    judged_cell = quality_cells(res.cells)
    # the judged cell of each configuration first: its other load levels take its verdict
    order = sorted(res.cells, key=lambda c: judged_cell.get(c["id"], c["id"]) != c["id"])
    for cell in order:
        answers = cell_answers(res.runs, cell["id"])
        complete = [r for r in answers.values() if is_complete(r)]
        truncated = [r for r in answers.values() if is_truncated(r)]
        recall = mean_recall(key_fact_recall(answer_text(r), queries[q].facts) if q in queries else None
                             for q, r in answers.items() if is_complete(r))
        row: dict[str, Any] = {
            "role": "baseline" if cell["id"] == base_id else cell.get("role", "grid"),
            "answers": len(answers), "complete_answers": len(complete),
            "truncation_rate": len(truncated) / len(answers) if answers else None,
            "key_fact_recall": recall,
            **(key_fact_difference(answers, baseline, queries, n_boot=n_boot, seed=seed)
               if base_id and cell["id"] != base_id else
               {"key_fact_diff": None, "key_fact_diff_ci_low": None, "key_fact_diff_ci_high": None,
                "key_fact_diff_queries": 0}),
            # every answer, complete or cut: its language is what the user saw either way
            "language_match": language_match((answer_text(r), queries[q].lang) for q, r in answers.items()
                                             if q in queries),
            "quality_judge": None, "gate_accuracy": None, "gate_passed": None,
            "quality_retention": None, "retention_ci_low": None, "retention_ci_high": None, "retention_queries": 0,
            "retention_cut_answers": 0,
            "order_disagreement": None, "first_position_rate": None, "identical_answers": 0,
            "retention_baseline": base_id, "quality_note": None,
        }
        out[cell["id"]] = row
        judged = judged_cell.get(cell["id"], cell["id"])
        row["quality_cell"] = judged
        if judged != cell["id"]:  # another load level of a judged configuration (judged first, above)
            verdict = {k: v for k, v in out[judged].items()
                       if k not in ("role", "answers", "complete_answers", "truncation_rate", "key_fact_recall",
                                    "language_match", "quality_cell", "answers_differ")
                       and not k.startswith("key_fact_diff")}
            theirs = cell_answers(res.runs, judged)
            row.update(verdict, answers_differ=sum(answer_text(r).strip() != answer_text(theirs[q]).strip()
                                                   for q, r in answers.items() if q in theirs))
            continue
        row["answers_differ"] = 0
        if cell["id"] == base_id:
            row["quality_note"] = "the baseline"
            continue
        if not base_id:
            row["quality_note"] = "no baseline in this study"
            continue
        if cell["state"] != "done":
            continue
        choice = judge_for(cell, spec)
        row["quality_judge"] = choice.model
        if choice.model is None:
            row["quality_note"] = choice.note
            continue
        mine = [ln for ln in lines if ln["type"] == "pair" and ln.get("cell") == cell["id"]
                and ln["judge"] == choice.model and ln.get("prompt_version") == version and baseline.get(ln["query_id"]) is not None
                and baseline[ln["query_id"]].run_id == ln["baseline_run_id"]
                and answers.get(ln["query_id"]) is not None and answers[ln["query_id"]].run_id == ln["candidate_run_id"]]
        outcomes, positions, row["identical_answers"] = pair_outcomes(mine)
        planned = judged_queries(queries, baseline, answers)  # what judge_study judges
        unjudged = sum(q not in outcomes for q in planned)
        row["retention_cut_answers"] = sum(bool(is_truncated(answers[q])) for q in outcomes)
        row["_query_scores"] = {q: query_score(o) for q, o in outcomes.items()}  # for quality-aware goodput
        r: Retention = retention(outcomes, positions=positions, target=target, n_boot=n_boot, seed=seed)
        gate = gates.get(choice.model)
        row.update(gate_accuracy=gate.accuracy if gate else None, gate_passed=gate.passed if gate else None,
                   order_disagreement=r.order_disagreement, first_position_rate=r.first_position_rate,
                   retention_queries=r.n_queries)
        if base_complete < MIN_COMPLETE_SHARE * len(baseline):
            row["quality_note"] = (f"the baseline's answers mostly cut off: {base_complete} of {len(baseline)} "
                                   f"complete; raise max_tokens")
        elif gate is None:
            row["quality_note"] = f"judge {choice.model} not gated (no complete baseline answers to plant from)"
        elif not gate.passed:
            acc = "n/a" if gate.accuracy is None else f"{gate.accuracy:.2f}"
            row["quality_note"] = f"judge cannot judge: gate accuracy {acc} < {threshold:g}; {STRONGER_JUDGE}"
        elif unjudged:  # a verdict over some of the queries would be over the ones judged first
            row["quality_note"] = (f"judging unfinished: {len(planned) - unjudged} of {len(planned)} queries judged; "
                                   f"run the study again to judge the rest")
        elif r.n_queries == 0:
            row["quality_note"] = "no query the baseline answered completely was judged"
        else:
            row.update(quality_retention=r.share, retention_ci_low=r.ci_low, retention_ci_high=r.ci_high)
            if choice.note:
                row["quality_note"] = choice.note
    return out


__all__ = ["JUDGING", "JUDGMENTS", "STRONGER_JUDGE", "JudgeChoice", "answer_call", "answer_text", "draft_call",
           "comparison_plan", "revised", "cell_answers", "gate_answers", "gate_results", "gate_runs", "judge_version",
           "study_queries", "answered", "is_complete", "judge_for", "judge_study", "judge_study_async",
           "judged_queries", "key_fact_difference", "pair_outcomes", "quality_columns", "read_judgments"]
