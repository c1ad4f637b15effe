"""Load sweep: latency and throughput of one backend as concurrency grows (``llmfirst bench load``).

For each concurrency level, ``requests`` calls are issued with at most that many in flight (a pool of
workers pulling from one queue, like vLLM ``bench serve --max-concurrency``). Each call is one plain chat
completion of a packaged study query (``llmfirst_kit/assets/queries/``) -- the serving engine is measured
here, not the pipeline.
Per level: TTFT / TPOT / E2E p50/p95/p99 over the calls that finished, overall output tokens/s, errors
(formulas in :func:`llmfirst_kit.metrics.load_level_metrics`).

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
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from ..backends import Backend, CallRequest, backend_options, get_backend
from ..data import QUERIES
from ..errors import BackendUnavailable, InvalidInput, UnknownModel
from ..metrics import DEFAULT_SLO, SLO, load_level_metrics, slo_dict
from ..records import CallRecord

QUERIES_FILE = QUERIES
MIN_CALLS_BEFORE_STOPPING = 4  # the error rate of one or two calls says little


@dataclass
class LoadLevel:
    concurrency: int
    records: list[CallRecord] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: str | None = None  # why this level ended early: "error rate", "time limit"

    def metrics(self, slo: SLO = DEFAULT_SLO) -> dict[str, Any]:
        errors = list(dict.fromkeys(r.error for r in self.records if r.error))
        return {"concurrency": self.concurrency, **load_level_metrics(self.records, self.wall_s, slo),
                "stopped": self.stopped, "error_messages": errors[:3]}


def parse_concurrency(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``; anything else is an error naming the expected form."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(c <= 0 for c in levels):
        raise InvalidInput(f"--concurrency must be positive integers separated by commas, e.g. 1,2,4,8; got {text!r}")
    return levels


def sweep_queries(limit: int = 0) -> list[str]:
    from ..study.queries import load_queries

    return [q.query for q in load_queries(QUERIES_FILE, limit=limit)]


async def _run_level(backend: Backend, level: LoadLevel, requests: int, make_request: Callable[[int], CallRequest],
                     deadline: float, max_error_rate: float) -> None:
    pending = iter(range(requests))
    stop = asyncio.Event()

    async def worker() -> None:
        for i in pending:
            if stop.is_set():
                return
            call = backend.call(make_request(i))
            level.records.append(call.record)
            with contextlib.suppress(Exception):  # the record says what failed; the sweep goes on
                await call.collect()
            done = [r for r in level.records if r.status != "running"]
            failed = sum(r.status == "error" for r in done)
            if len(done) >= min(requests, MIN_CALLS_BEFORE_STOPPING) and failed / len(done) > max_error_rate:
                level.stopped = "error rate"
                stop.set()

    t0 = time.perf_counter()
    workers = [asyncio.create_task(worker()) for _ in range(level.concurrency)]
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await asyncio.gather(*workers)
    except TimeoutError:
        level.stopped = "time limit"
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        level.wall_s = time.perf_counter() - t0


async def sweep(backend: Backend, *, model: str | None = None, concurrency: Sequence[int] = (1, 2, 4, 8),
                requests: int = 16, max_tokens: int = 64, queries: Sequence[str] | None = None,
                max_error_rate: float = 0.5, time_limit_s: float = 600.0, warmup: bool = True,
                slo: SLO = DEFAULT_SLO, temperature: float = 0.0) -> dict[str, Any]:
    """Run the sweep against ``backend``; returns a JSON-ready dict (``levels``: one row per level)."""
    if not concurrency or any(not isinstance(c, int) or c <= 0 for c in concurrency):
        raise InvalidInput(f"concurrency must be positive integers, e.g. [1, 2, 4, 8]; got {list(concurrency)!r}")
    if requests <= 0:
        raise InvalidInput(f"requests must be a positive integer, got {requests!r}")
    if not time_limit_s > 0:
        raise InvalidInput(f"time_limit_s (--time-limit) must be a positive number of seconds, got {time_limit_s!r}")
    if not 0 <= max_error_rate <= 1:
        raise InvalidInput(f"max_error_rate (--max-error-rate) is a share between 0 and 1, got {max_error_rate!r}")
    queries = list(queries or sweep_queries())
    model = backend.resolve_model(model)

    def make_request(i: int) -> CallRequest:
        return CallRequest(messages=[{"role": "user", "content": queries[i % len(queries)]}], model=model,
                           max_tokens=max_tokens, temperature=temperature, seed=i)

    deadline = time.monotonic() + time_limit_s
    warm: dict[str, Any] | None = None
    if warmup:  # loads the model (embedded, or a server's cold load); excluded from every level
        call = backend.call(make_request(0))
        try:
            await call.collect()
        except (BackendUnavailable, UnknownModel):
            raise  # nothing to measure: no server there, or it has no such model
        except Exception:
            pass  # kept in the warm-up's record; the levels show whether it persists
        warm = {"status": call.record.status, "error": call.record.error, "load_s": call.record.load_s}
        model = model or call.record.model
    levels: list[LoadLevel] = []
    stopped: str | None = None
    for c in concurrency:
        if time.monotonic() >= deadline:
            stopped = "time limit"
            break
        level = LoadLevel(concurrency=c)
        levels.append(level)
        await _run_level(backend, level, requests, make_request, deadline, max_error_rate)
        if level.stopped:
            stopped = level.stopped
            break
    # a server's default model (openai backend without a model) is known once a call has listed the models
    model = model or next((r.model for lv in levels for r in lv.records if r.model), "")
    return {
        "benchmark": "load", "backend": backend.name, "model": model, "target": target_of(backend),
        "requests_per_level": requests, "max_tokens": max_tokens, "max_error_rate": max_error_rate,
        "time_limit_s": time_limit_s, "warmup": warm, "stopped_early": stopped,
        "concurrency": list(concurrency), "slo": slo_dict(slo),
        "levels": [lv.metrics(slo) for lv in levels],
    }


def target_of(backend: Backend) -> str:
    """Where the requests went: a server URL, or ``in-process``."""
    return str(getattr(backend, "base_url", None) or getattr(backend, "host", None) or "in-process")


@contextlib.asynccontextmanager
async def load_target(backend: str = "embedded", *, host: str | None = None, base_url: str | None = None,
                      serve_kit: bool = False, model: str | None = None,
                      n_threads: int | None = None) -> AsyncIterator[Backend]:
    """The backend to load: by name, or (``serve_kit``) the kit's own server started on a free loopback
    port and reached through its OpenAI-compatible API (``backend="openai"``) or else its Ollama-compatible
    one."""
    if serve_kit:
        from ..models import DEFAULT_MODEL
        from ..serve import ServerConfig, ServerThread

        name = model or DEFAULT_MODEL
        with ServerThread(config=ServerConfig(default_model=name, n_threads=n_threads)) as srv:
            target = (get_backend("openai", model=name, base_url=f"{srv.url}/v1") if backend == "openai"
                      else get_backend("ollama", model=name, host=srv.url))
            try:
                yield target
            finally:
                await target.aclose()
        return
    target = get_backend(backend, **backend_options(backend, host=host, base_url=base_url, n_threads=n_threads))
    try:
        yield target
    finally:
        await target.aclose()


def format_sweep(result: dict[str, Any]) -> str:
    """A plain table for the terminal."""
    head = (f"load sweep: {result['backend']} {result['model']} at {result['target']}, "
            f"{result['requests_per_level']} requests a level, max_tokens {result['max_tokens']}")
    cols = ("concurrency", "ok", "errors", "ttft_s_p50", "ttft_s_p95", "ttft_s_p99", "tpot_s_p50", "tpot_s_p95",
            "e2e_s_p50", "e2e_s_p95", "e2e_s_p99", "output_tokens_per_s", "requests_per_s")
    lines = [head, " ".join(f"{c:>12}" for c in cols)]
    for row in result["levels"]:
        cells = [f"{row[c]:12.3f}" if isinstance(row[c], float) else f"{'n/a' if row[c] is None else row[c]:>12}"
                 for c in cols]
        lines.append(" ".join(cells))
        lines += [f"    error: {msg}" for msg in row["error_messages"]]
    if result["stopped_early"]:
        lines.append(f"stopped early: {result['stopped_early']}")
    return "\n".join(lines)
