"""Load sweep: latency, throughput and goodput of one backend as load grows (``llmfirst bench load``).

Two ways to apply load, one level at a time:

- **closed loop** (``arrival="concurrency"``): ``requests`` calls with at most ``concurrency`` in flight (a pool
  of workers pulling from one queue, like vLLM ``bench serve --max-concurrency``); a new call starts when one
  ends, so the client slows down with the server and never queues;
- **open loop** (``arrival="constant"`` or ``"poisson"``): ``requests`` calls sent on a schedule at ``rate``
  requests per second, whatever the server does: evenly spaced (constant), or with exponential gaps drawn from
  a generator seeded by ``seed`` and the level (Poisson; the same schedule on every rerun). Every call is
  timed from its SCHEDULED send time too: ``client_queue_s`` = actual send - scheduled send (the client
  itself fell behind), and TTFT / E2E from the scheduled time beside the usual ones (from the actual send).

Each call is one plain chat completion of a packaged study query (``llmfirst_kit/assets/queries/``) -- the
serving engine is measured here, not the pipeline. Per level (formulas in
:func:`llmfirst_kit.metrics.load_level_metrics`): TTFT / TPOT / E2E p50/p95/p99 over the calls that finished,
overall output tokens/s, requests/s, errors, goodput (requests/s that met every SLO, judged from the scheduled
time), quality-aware goodput where a ``quality`` check is given (those that also passed it; checked after the
last level, so judging never competes with the load), and whether the load client competed with the engine
for cores (its event-loop thread's CPU time / wall time above ``client_cpu_bound``).

Crash-safe: with ``jsonl=PATH`` every call is appended to the file (one line, flushed and fsynced) as it
ends, and each level's start and end are lines too. Running the same sweep with the same file resumes it:
levels that finished are skipped (by their key, e.g. ``poisson@2rps``) and an unfinished one is run again
whole (its wall time, arrival schedule and client CPU must come from one uninterrupted run; the lines of the
interrupted attempt stay in the file and are ignored). :func:`summarize_file` rebuilds the summary from the
file alone, and :func:`figure_file` the chart.

Bounded in count and time: at most ``requests`` calls a level, and a deadline for the whole sweep (calls
still running then are cancelled and counted as such). It stops early when a level's error rate passes
``max_error_rate`` (checked as calls finish, once a few have), and does not go on to higher levels.

Targets: the embedded model in this process, an Ollama server (``backend="ollama"``), any OpenAI-compatible
server (``backend="openai"``: vLLM, SGLang, llama-server), or the kit's own server (``llmfirst serve``, which
speaks both APIs; ``serve_kit=True`` starts one on a free loopback port).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence

from ..backends import DEFAULT_BACKEND, Backend, CallRequest, backend_options, capabilities, get_backend
from ..data import QUERIES
from ..errors import BackendUnavailable, InvalidInput, UnknownModel
from ..metrics import (CLIENT_CPU_BOUND, DEFAULT_SLO, SLO, arrival_offsets, client_cpu_check, load_level_metrics,
                       slo_dict)
from ..records import CallRecord
from ..sync import gather_at_most

QUERIES_FILE = QUERIES
MIN_CALLS_BEFORE_STOPPING = 4  # the error rate of one or two calls says little
CLOSED_LOOP = "concurrency"
OPEN_LOOP = ("constant", "poisson")
ARRIVALS = (CLOSED_LOOP, *OPEN_LOOP)
FILE_VERSION = 1
KIT_SERVER_API = "ollama"  # the API of the kit's own server that --serve-kit loads unless told otherwise
JUDGED_AT_ONCE = 4  # quality checks run together after the load (the judge's engine batches them)

# A quality check for quality-aware goodput: (query, the call's record) -> passed? (None: no verdict).
QualityCheck = Callable[[str, CallRecord], Awaitable[bool | None]]


@dataclass(frozen=True)
class LevelSpec:
    """One level: ``arrival`` and its load, a concurrency (closed loop) or a rate in requests/s (open loop)."""

    arrival: str
    load: float

    @property
    def key(self) -> str:
        """The level's name in the JSONL file (what a resumed sweep skips by)."""
        if self.arrival == CLOSED_LOOP:
            return f"concurrency={int(self.load)}"
        return f"{self.arrival}@{self.load:g}rps"


@dataclass
class LoadLevel:
    """What one level left: its calls (each with its scheduled send time, None in a closed loop), the quality
    verdicts if judged, the level's wall time, why it ended early, and the load client's CPU time."""

    spec: LevelSpec
    records: list[CallRecord] = field(default_factory=list)
    scheduled_ns: list[int | None] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    quality: list[bool | None] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: str | None = None  # why this level ended early: "error rate", "time limit", "interrupted"
    client_cpu_s: float = 0.0  # the event-loop thread's CPU time over the level (the load client)
    process_cpu_s: float = 0.0  # the whole process's (includes an engine that runs in this process)
    attempt: str = ""  # which run of this level (a resumed sweep runs an interrupted level again)

    @property
    def concurrency(self) -> int | None:
        return int(self.spec.load) if self.spec.arrival == CLOSED_LOOP else None

    def metrics(self, slo: SLO = DEFAULT_SLO, client_cpu_bound: float = CLIENT_CPU_BOUND) -> dict[str, Any]:
        errors = list(dict.fromkeys(r.error for r in self.records if r.error))
        open_loop = self.spec.arrival != CLOSED_LOOP
        quality = self.quality if any(v is not None for v in self.quality) else None
        return {"level": self.spec.key, "arrival": self.spec.arrival, "concurrency": self.concurrency,
                "rate_rps": self.spec.load if open_loop else None,
                **load_level_metrics(self.records, self.wall_s, slo, scheduled_ns=self.scheduled_ns, quality=quality),
                **client_cpu_check(self.client_cpu_s, self.wall_s, client_cpu_bound),
                "process_cpu_s": self.process_cpu_s, "stopped": self.stopped, "error_messages": errors[:3]}


def parse_concurrency(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``; anything else is an error naming the expected form."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(c <= 0 for c in levels):
        raise InvalidInput(f"--concurrency must be positive integers separated by commas, e.g. 1,2,4,8; got {text!r}")
    return levels


def parse_rates(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]`` (requests per second); anything else names the expected form."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        rates = []
    if not rates or any(not (r > 0) or r == float("inf") for r in rates):
        raise InvalidInput(f"--rates must be positive request rates (requests/s) separated by commas, e.g. "
                           f"0.5,1,2,4; got {text!r}")
    return rates


def sweep_queries(limit: int = 0) -> list[str]:
    from ..study.queries import load_queries

    return [q.query for q in load_queries(QUERIES_FILE, limit=limit)]


# ------------------------------------------------------------------------------------ the JSONL file

class SweepLog:
    """The sweep's lines: kept in memory and, given a path, appended to that file as they happen (one JSON
    object a line, flushed and fsynced, so a killed sweep loses at most the line being written)."""

    def __init__(self, path: str | os.PathLike[str] | None, header: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.lines: list[dict[str, Any]] = []
        self._file = None
        if self.path is not None and self.path.exists():
            self.lines = read_lines(self.path)
            old = next((ln for ln in self.lines if ln.get("type") == "sweep"), None)
            if old is not None and old.get("key") != header["key"]:
                raise InvalidInput(f"{self.path} holds a different sweep ({_describe(old['config'])}); this one is "
                                   f"{_describe(header['config'])}; give a new file, or delete it to start over")
            self.resumed = old is not None
        else:
            self.resumed = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = self.path.read_bytes() if self.path.exists() else b""
            if data and not data.endswith(b"\n"):  # a line cut by a crash: drop it (read_lines skipped it)
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            self._file = open(self.path, "a", encoding="utf-8")
        if not self.resumed:
            self.append(header)

    def append(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        if self._file is not None:
            self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _describe(config: dict[str, Any]) -> str:
    return (f"{config.get('backend')} {config.get('model') or '(server default)'} at {config.get('target')}, "
            f"{config.get('arrival')} {config.get('levels')}, {config.get('requests')} requests, "
            f"max_tokens {config.get('max_tokens')}")


def read_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The file's lines as dicts; a last line cut short by a crash is skipped (any other bad line is an error)."""
    text = Path(path).read_text(encoding="utf-8")
    raw = text.split("\n")
    out = []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in raw[i + 1:]):
                raise InvalidInput(f"{path}: line {i + 1} is not JSON; it is not a load-sweep file, or it was "
                                   f"edited") from None
    return out


def _levels_from_lines(lines: list[dict[str, Any]]) -> dict[str, LoadLevel]:
    """Per level key, the attempt that counts: the latest that finished (not cut by the time limit), else the
    latest cut by it, else the latest interrupted one (no end line: a crash; wall time from its calls)."""
    config = next(ln for ln in lines if ln.get("type") == "sweep")["config"]
    specs = {LevelSpec(config["arrival"], v).key: LevelSpec(config["arrival"], v) for v in config["levels"]}
    attempts: dict[str, list[str]] = {}
    ends: dict[str, dict[str, Any]] = {}
    calls: dict[str, list[dict[str, Any]]] = {}
    verdicts: dict[tuple[str, int], bool | None] = {}
    for ln in lines:
        kind = ln.get("type")
        if kind == "level_start":
            attempts.setdefault(ln["level"], []).append(ln["attempt"])
        elif kind == "level_end":
            ends[ln["attempt"]] = ln
        elif kind == "request":
            calls.setdefault(ln["attempt"], []).append(ln)
        elif kind == "quality":
            verdicts[(ln["attempt"], ln["index"])] = ln["passed"]
    out: dict[str, LoadLevel] = {}
    for key, tries in attempts.items():
        if key not in specs:
            continue
        finished = [a for a in tries if a in ends and ends[a].get("stopped") != "time limit"]
        timed_out = [a for a in tries if a in ends]
        attempt = (finished or timed_out or tries)[-1]
        level = LoadLevel(specs[key])
        rows = sorted(calls.get(attempt, []), key=lambda r: r["index"])
        for row in rows:
            level.records.append(CallRecord.from_dict(row["record"]))
            level.scheduled_ns.append(row.get("scheduled_ns"))
            level.queries.append(row.get("query", ""))
            level.quality.append(verdicts.get((attempt, row["index"])))
        end = ends.get(attempt)
        if end is not None:
            level.wall_s, level.stopped = end["wall_s"], end.get("stopped")
            level.client_cpu_s, level.process_cpu_s = end.get("client_cpu_s", 0.0), end.get("process_cpu_s", 0.0)
        else:
            level.stopped = "interrupted"
            starts = [s if s is not None else r.start_ns for r, s in zip(level.records, level.scheduled_ns)]
            last = max((r.end_ns for r in level.records), default=0)
            level.wall_s = (last - min(starts)) / 1e9 if starts else 0.0
        level.attempt = attempt
        out[key] = level
    return out


def summarize(lines: list[dict[str, Any]], slo: SLO | None = None,
              client_cpu_bound: float | None = None) -> dict[str, Any]:
    """The sweep's JSON-ready summary (``levels``: one row per level, in the sweep's order) from its lines
    alone. ``slo`` / ``client_cpu_bound``: judge against these instead of the ones the sweep recorded."""
    header = next((ln for ln in lines if ln.get("type") == "sweep"), None)
    if header is None:
        raise InvalidInput("no sweep header in these lines; not a load-sweep file")
    config = header["config"]
    slo = slo or SLO(**config["slo"])
    bound = config.get("client_cpu_bound", CLIENT_CPU_BOUND) if client_cpu_bound is None else client_cpu_bound
    levels = _levels_from_lines(lines)
    ordered = [levels[k] for k in (LevelSpec(config["arrival"], v).key for v in config["levels"]) if k in levels]
    warm = next((ln["warmup"] for ln in reversed(lines) if ln.get("type") == "warmup"), None)
    end = next((ln for ln in reversed(lines) if ln.get("type") == "sweep_end"), None)
    model = (end or {}).get("model") or config.get("model") or next(
        (r.model for lv in ordered for r in lv.records if r.model), "")
    stopped = (end or {}).get("stopped_early") if end else next(
        (lv.stopped for lv in ordered if lv.stopped), None)
    quality_asked = any(ln.get("type") == "quality" for ln in lines)
    closed = config["arrival"] == CLOSED_LOOP
    return {
        "benchmark": "load", "backend": config["backend"], "model": model, "target": config["target"],
        "arrival": config["arrival"], "seed": config["seed"],
        "requests_per_level": config["requests"], "max_tokens": config["max_tokens"],
        "max_error_rate": config["max_error_rate"], "time_limit_s": config["time_limit_s"], "warmup": warm,
        "stopped_early": stopped, "concurrency": [int(v) for v in config["levels"]] if closed else None,
        "rates_rps": None if closed else list(config["levels"]), "slo": slo_dict(slo), "client_cpu_bound": bound,
        "quality": "judged" if quality_asked else "not asked",
        "resumed_levels": (end or {}).get("resumed_levels", []),
        "levels": [lv.metrics(slo, bound) for lv in ordered],
    }


def summarize_file(path: str | os.PathLike[str], slo: SLO | None = None,
                   client_cpu_bound: float | None = None) -> dict[str, Any]:
    """:func:`summarize` of a sweep's JSONL file (what ``sweep(jsonl=path)`` wrote, finished or not)."""
    result = summarize(read_lines(path), slo, client_cpu_bound)
    result["jsonl"] = str(path)
    return result


def figure_file(path: str | os.PathLike[str], *, title: str | None = None) -> Any:
    """The sweep's chart (:func:`llmfirst_kit.sinks.charts.load_sweep`) rebuilt from its JSONL file alone."""
    from ..sinks.charts import load_sweep

    return load_sweep(summarize_file(path), title=title)


# ------------------------------------------------------------------------------------ running a level

async def _run_closed_level(backend: Backend, level: LoadLevel, requests: int, make_request: Callable[[int], CallRequest],
                            on_end: Callable[[int, int | None, CallRecord], None], deadline: float,
                            max_error_rate: float) -> None:
    pending = iter(range(requests))
    stop = asyncio.Event()

    async def worker() -> None:
        for i in pending:
            if stop.is_set():
                return
            await _one_call(backend, level, i, None, make_request, on_end, requests, max_error_rate, stop)

    workers = [asyncio.create_task(worker()) for _ in range(int(level.spec.load))]
    await _bounded(level, workers, deadline)


async def _run_open_level(backend: Backend, level: LoadLevel, requests: int, make_request: Callable[[int], CallRequest],
                          on_end: Callable[[int, int | None, CallRecord], None], deadline: float,
                          max_error_rate: float, seed: int) -> None:
    offsets = arrival_offsets(level.spec.arrival, level.spec.load, requests, seed, level.spec.key)
    stop = asyncio.Event()
    calls: list[asyncio.Task] = []
    t0 = time.perf_counter_ns()

    async def schedule() -> None:
        for i, offset in enumerate(offsets):
            scheduled = t0 + int(offset * 1e9)
            delay = (scheduled - time.perf_counter_ns()) / 1e9
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            calls.append(asyncio.create_task(_one_call(backend, level, i, scheduled, make_request, on_end, requests,
                                                       max_error_rate, stop)))
        await asyncio.gather(*calls, return_exceptions=True)

    await _bounded(level, [asyncio.create_task(schedule())], deadline, calls)


async def _one_call(backend: Backend, level: LoadLevel, i: int, scheduled: int | None,
                    make_request: Callable[[int], CallRequest], on_end: Callable[[int, int | None, CallRecord], None],
                    requests: int, max_error_rate: float, stop: asyncio.Event) -> None:
    call = backend.call(make_request(i))
    try:
        with contextlib.suppress(Exception):  # the record says what failed; the sweep goes on
            await call.collect()
    finally:
        if call.record.status == "running":  # cancelled before the call began
            call.record.status, call.record.finish_reason = "cancelled", "cancelled"
        on_end(i, scheduled, call.record)
    done = level.records
    failed = sum(r.status == "error" for r in done)
    if len(done) >= min(requests, MIN_CALLS_BEFORE_STOPPING) and failed / len(done) > max_error_rate:
        level.stopped = "error rate"
        stop.set()


async def _bounded(level: LoadLevel, tasks: list[asyncio.Task], deadline: float,
                   more: list[asyncio.Task] | None = None) -> None:
    """Wait for ``tasks`` until the sweep's deadline; then cancel them (and ``more``) and note the time limit."""
    t0 = time.perf_counter()
    cpu0, proc0 = time.thread_time(), _process_cpu()
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await asyncio.gather(*tasks)
    except TimeoutError:
        level.stopped = "time limit"
    finally:
        everything = [*tasks, *(more or [])]
        for t in everything:
            t.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
        level.wall_s = time.perf_counter() - t0
        level.client_cpu_s = time.thread_time() - cpu0
        level.process_cpu_s = _process_cpu() - proc0


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sweep_key(config: dict[str, Any]) -> str:
    """Same sweep = same backend, target, model, arrival, levels, request count and sampling, and queries."""
    keyed = {k: config[k] for k in ("backend", "target_name", "model", "arrival", "levels", "requests", "max_tokens",
                                     "temperature", "seed", "queries_sha256")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


async def sweep(backend: Backend, *, model: str | None = None, concurrency: Sequence[int] = (1, 2, 4, 8),
                requests: int = 16, max_tokens: int = 64, queries: Sequence[str] | None = None,
                max_error_rate: float = 0.5, time_limit_s: float = 600.0, warmup: bool = True,
                slo: SLO = DEFAULT_SLO, temperature: float = 0.0, arrival: str = CLOSED_LOOP,
                rates: Sequence[float] | None = None, seed: int = 0,
                jsonl: str | os.PathLike[str] | None = None, quality: QualityCheck | None = None,
                client_cpu_bound: float = CLIENT_CPU_BOUND, target_name: str | None = None) -> dict[str, Any]:
    """Run the sweep against ``backend``; returns a JSON-ready dict (``levels``: one row per level).

    ``arrival``: ``"concurrency"`` (closed loop over ``concurrency``), or ``"constant"`` / ``"poisson"`` (open
    loop over ``rates``, requests/s, Poisson gaps seeded by ``seed``). ``jsonl``: append every call to this
    file as it ends and resume from it (module docstring). ``quality``: an async check of each finished call
    (query, record) -> passed, run after the last level, for quality-aware goodput. ``target_name``: how the
    file's key names the target (default its URL); a server started afresh on a new port for each run (the
    CLI's ``--serve-kit``) is the same target under a fixed name, so that a rerun resumes."""
    if arrival not in ARRIVALS:
        raise InvalidInput(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if arrival == CLOSED_LOOP:
        if not concurrency or any(not isinstance(c, int) or c <= 0 for c in concurrency):
            raise InvalidInput(f"concurrency must be positive integers, e.g. [1, 2, 4, 8]; got {list(concurrency)!r}")
        loads: list[float] = [int(c) for c in concurrency]
    else:
        if not rates or any(not isinstance(r, (int, float)) or not r > 0 for r in rates):
            raise InvalidInput(f"an open-loop sweep ({arrival}) needs rates: positive requests/s, e.g. [0.5, 1, 2]; "
                               f"got {rates!r}")
        loads = [float(r) for r in rates]
    if requests <= 0:
        raise InvalidInput(f"requests must be a positive integer, got {requests!r}")
    if not time_limit_s > 0:
        raise InvalidInput(f"time_limit_s (--time-limit) must be a positive number of seconds, got {time_limit_s!r}")
    if not 0 <= max_error_rate <= 1:
        raise InvalidInput(f"max_error_rate (--max-error-rate) is a share between 0 and 1, got {max_error_rate!r}")
    if not client_cpu_bound > 0:
        raise InvalidInput(f"client_cpu_bound must be a positive number of cores, got {client_cpu_bound!r}")
    queries = list(queries or sweep_queries())
    model = backend.resolve_model(model)

    def make_request(i: int) -> CallRequest:
        return CallRequest(messages=[{"role": "user", "content": queries[i % len(queries)]}], model=model,
                           max_tokens=max_tokens, temperature=temperature, seed=i)

    config = {"version": FILE_VERSION, "backend": backend.name, "target": target_of(backend),
              "target_name": target_name or target_of(backend), "model": model,
              "arrival": arrival, "levels": loads, "requests": requests, "max_tokens": max_tokens,
              "temperature": temperature, "seed": seed,
              "queries_sha256": hashlib.sha256(json.dumps(queries).encode()).hexdigest(),
              "max_error_rate": max_error_rate, "time_limit_s": time_limit_s, "slo": slo_dict(slo),
              "client_cpu_bound": client_cpu_bound}
    log = SweepLog(jsonl, {"type": "sweep", "key": _sweep_key(config), "config": config})
    try:
        return await _sweep(backend, log, config, make_request, queries, warmup, quality, slo, client_cpu_bound)
    finally:
        log.close()


async def _sweep(backend: Backend, log: SweepLog, config: dict[str, Any], make_request: Callable[[int], CallRequest],
                 queries: list[str], warmup: bool, quality: QualityCheck | None, slo: SLO,
                 client_cpu_bound: float) -> dict[str, Any]:
    deadline = time.monotonic() + config["time_limit_s"]
    model = config["model"]
    done = {k: lv for k, lv in _levels_from_lines(log.lines).items() if lv.stopped not in ("time limit", "interrupted")}
    specs = [LevelSpec(config["arrival"], v) for v in config["levels"]]
    to_run = [s for s in specs if s.key not in done]
    resumed = [s.key for s in specs if s.key in done]
    if warmup and to_run and not any(done[k].stopped == "error rate" for k in resumed):
        # loads the model (embedded, or a server's cold load); excluded from every level
        call = backend.call(make_request(0))
        try:
            await call.collect()
        except (BackendUnavailable, UnknownModel):
            raise  # nothing to measure: no server there, or it has no such model
        except Exception:
            pass  # kept in the warm-up's record; the levels show whether it persists
        log.append({"type": "warmup", "warmup": {"status": call.record.status, "error": call.record.error,
                                                 "load_s": call.record.load_s}})
        model = model or call.record.model
    stopped: str | None = None
    for spec in specs:
        if spec.key in done:
            if done[spec.key].stopped == "error rate":
                stopped = "error rate"
                break
            continue
        if time.monotonic() >= deadline:
            stopped = "time limit"
            break
        attempt = uuid.uuid4().hex[:12]
        log.append({"type": "level_start", "level": spec.key, "attempt": attempt})
        level = LoadLevel(spec)

        def on_end(i: int, scheduled: int | None, record: CallRecord, level: LoadLevel = level,
                   attempt: str = attempt) -> None:
            level.records.append(record)
            level.scheduled_ns.append(scheduled)
            log.append({"type": "request", "level": level.spec.key, "attempt": attempt, "index": i,
                        "query": queries[i % len(queries)], "scheduled_ns": scheduled, "record": record.to_dict()})

        if spec.arrival == CLOSED_LOOP:
            await _run_closed_level(backend, level, config["requests"], make_request, on_end, deadline,
                                    config["max_error_rate"])
        else:
            await _run_open_level(backend, level, config["requests"], make_request, on_end, deadline,
                                  config["max_error_rate"], config["seed"])
        log.append({"type": "level_end", "level": spec.key, "attempt": attempt, "wall_s": level.wall_s,
                    "stopped": level.stopped, "client_cpu_s": level.client_cpu_s,
                    "process_cpu_s": level.process_cpu_s})
        if level.stopped:
            stopped = level.stopped
            break
    if quality is not None:
        await _judge(log, quality)
    # a server's default model (openai backend without a model) is known once a call has listed the models
    levels = _levels_from_lines(log.lines)
    model = model or next((r.model for lv in levels.values() for r in lv.records if r.model), "")
    log.append({"type": "sweep_end", "stopped_early": stopped, "model": model, "resumed_levels": resumed})
    result = summarize(log.lines, slo, client_cpu_bound)
    if log.path is not None:
        result["jsonl"] = str(log.path)
    return result


async def _judge(log: SweepLog, quality: QualityCheck, at_once: int = JUDGED_AT_ONCE) -> None:
    """The quality check of every finished call not yet judged (a resumed sweep judges only the new ones),
    ``at_once`` checks at a time (a batched engine judges them together)."""
    judged = {(ln["attempt"], ln["index"]) for ln in log.lines if ln.get("type") == "quality"}

    async def one(key: str, attempt: int, index: int, query: str, rec: CallRecord) -> None:
        passed = await quality(query, rec)
        log.append({"type": "quality", "level": key, "attempt": attempt, "index": index,
                    "passed": None if passed is None else bool(passed)})

    jobs = []
    for key, level in _levels_from_lines(log.lines).items():
        attempt = level.attempt
        for rec, query, row in zip(level.records, level.queries,
                                   sorted((ln for ln in log.lines if ln.get("type") == "request"
                                           and ln["attempt"] == attempt), key=lambda r: r["index"])):
            if rec.status != "ok" or (attempt, row["index"]) in judged:
                continue
            jobs.append(one(key, attempt, row["index"], query, rec))
    await gather_at_most(at_once, jobs)


def judge_check(judge: Any, baselines: Mapping[str, str] | Callable[[str], Awaitable[str | None]],
                references: Mapping[str, Sequence[str]] | None = None) -> QualityCheck:
    """A quality check from the pairwise judge (:class:`llmfirst_kit.quality.judge.PairwiseJudge`): a call
    passes when its answer holds against the baseline answer to the same query as a study counts it -- the
    win-or-tie probability averaged over both orders is at least 0.5 (an identical answer holds without a
    call); None (no verdict) when the query has no baseline answer or the judge decided neither order.
    ``baselines``: query -> answer, or an async function giving it (:func:`baseline_answers`); ``references``:
    query -> its reference key facts, shown to the judge as data (reference-guided judging)."""
    from ..quality.retention import judgment_outcome, query_score

    async def check(query: str, record: CallRecord) -> bool | None:
        baseline = baselines.get(query) if isinstance(baselines, Mapping) else await baselines(query)
        if baseline is None:
            return None
        if baseline.strip() == record.text.strip():
            return True
        judgments = await judge.compare(query, baseline, record.text, reference=(references or {}).get(query))
        score = query_score(judgment_outcome(j) for j in judgments)
        return None if score is None else score >= 0.5

    return check


def baseline_answers(backend: Backend, model: str, *, max_tokens: int = 512) -> Callable[[str], Awaitable[str | None]]:
    """The baseline system's answer to a query, asked of ``model`` on ``backend`` the first time the query is
    judged (after the load, so it never competes with it; temperature 0) and kept; None if the call failed."""
    answers: dict[str, str | None] = {}

    async def answer(query: str) -> str | None:
        if query not in answers:
            call = backend.call(CallRequest(messages=[{"role": "user", "content": query}], model=model,
                                            max_tokens=max_tokens, temperature=0.0, seed=0))
            with contextlib.suppress(Exception):
                await call.collect()
            answers[query] = call.record.text if call.record.status == "ok" else None
        return answers[query]

    return answer


def query_references(queries: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Query text -> its reference key facts, for the kit's own queries (``sweep_queries``)."""
    from ..quality.facts import reference_sentences
    from ..study.queries import load_queries

    wanted = set(queries) if queries is not None else None
    return {q.query: reference_sentences(q.facts, q.lang) for q in load_queries(QUERIES_FILE)
            if q.facts and (wanted is None or q.query in wanted)}


def target_of(backend: Backend) -> str:
    """Where the requests went: a server URL, or ``in-process``."""
    return backend.location


@contextlib.asynccontextmanager
async def load_target(backend: str = DEFAULT_BACKEND, *, host: str | None = None, base_url: str | None = None,
                      serve_kit: bool = False, model: str | None = None,
                      n_threads: int | None = None, parallel: int | None = None) -> AsyncIterator[Backend]:
    """The backend to load: by name, or (``serve_kit``) the kit's own server started on a free loopback
    port and reached through the API of ``backend`` when that is a server's (``openai``: its /v1 routes,
    ``ollama``: its /api routes), else (an in-process backend named) its Ollama-compatible API. ``parallel``: the
    sequences the kit's embedded engine decodes at once (``--serve-kit`` and the embedded backend)."""
    if serve_kit:
        from ..models import DEFAULT_MODEL
        from ..serve import ServerConfig, ServerThread

        name = model or DEFAULT_MODEL
        client = KIT_SERVER_API if capabilities(backend).in_process else backend
        with ServerThread(config=ServerConfig(default_model=name, n_threads=n_threads, parallel=parallel)) as srv:
            target = get_backend(client, **backend_options(client, model=name, host=srv.url,
                                                           base_url=f"{srv.url}/v1"))
            try:
                yield target
            finally:
                await target.aclose()
        return
    target = get_backend(backend, **backend_options(backend, host=host, base_url=base_url, n_threads=n_threads,
                                                    parallel=parallel))
    try:
        yield target
    finally:
        await target.aclose()


def format_sweep(result: dict[str, Any]) -> str:
    """A plain table for the terminal."""
    head = (f"load sweep: {result['backend']} {result['model']} at {result['target']}, {result['arrival']} "
            f"arrivals, {result['requests_per_level']} requests a level, max_tokens {result['max_tokens']}")
    open_loop = result["arrival"] != CLOSED_LOOP
    first = ("rate_rps",) if open_loop else ("concurrency",)
    queue = ("client_queue_s_p95", "ttft_from_scheduled_s_p95") if open_loop else ()
    cols = (*first, "ok", "errors", "ttft_s_p50", "ttft_s_p95", "ttft_s_p99", "tpot_s_p50", "tpot_s_p95",
            "e2e_s_p50", "e2e_s_p95", "e2e_s_p99", *queue, "output_tokens_per_s", "requests_per_s", "goodput_rps",
            *(("quality_goodput_rps",) if result.get("quality") == "judged" else ()), "client_cpu_cores")
    widths = [max(len(c), 9) for c in cols]
    lines = [head, " ".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    for row in result["levels"]:
        cells = [f"{row[c]:{w}.3f}" if isinstance(row[c], float) else f"{'n/a' if row[c] is None else row[c]:>{w}}"
                 for c, w in zip(cols, widths)]
        lines.append(" ".join(cells))
        lines += [f"    error: {msg}" for msg in row["error_messages"]]
        if row["client_competed"]:
            lines.append(f"    the load client used {row['client_cpu_cores']:.2f} cores (bound "
                         f"{row['client_cpu_bound']:g}): it competed with the engine for CPU; these latencies "
                         f"include the client's own delay")
    if result.get("quality") != "judged":
        lines.append("quality-aware goodput: not asked (no quality check given)")
    if result["stopped_early"]:
        lines.append(f"stopped early: {result['stopped_early']}")
    if result.get("jsonl"):
        lines.append(f"every request: {result['jsonl']}"
                     + (f" (resumed: {', '.join(result['resumed_levels'])} from the file)"
                        if result.get("resumed_levels") else ""))
    return "\n".join(lines)
