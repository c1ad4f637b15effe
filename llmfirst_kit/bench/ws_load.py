"""``llmfirst bench serve``: a load benchmark of the WebSocket API -- N concurrent clients, each sending its
queries one after another over one connection, every run's messages checked for loss, duplication and
order (:func:`~llmfirst_kit.serve.ws_protocol.check_run_messages`). Reports client-side user-visible TTFT
and E2E percentiles, the server's own figures and runs per minute, and whether the clients competed with the
server for cores: all clients run on this process's event-loop thread, whose CPU time / wall time over the
load is checked against :data:`~llmfirst_kit.metrics.CLIENT_CPU_BOUND` (``client_competed``; the server it
starts runs in other threads of this process, so the process's own CPU time would count the server too).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput
from ..metrics import CLIENT_CPU_BOUND, client_cpu_check, percentiles
from ..serve import ServerConfig, ServerThread
from ..serve.security import host_name, is_loopback
from ..serve.ws_protocol import check_run_messages

BENCH_QUERIES = (
    "What is the capital of France?",
    "Explain what a hash table is.",
    "Give two tips for writing clear code.",
    "What does HTTP stand for?",
    "Why do leaves change colour in autumn?",
)
MAX_BENCH_CLIENTS = 200
MAX_BENCH_QUERIES = 50


@dataclass
class _ClientRun:
    client: int
    index: int
    sent_ns: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    first_visible_ns: int | None = None
    last_visible_ns: int | None = None

    def row(self) -> dict[str, Any]:
        last = self.messages[-1] if self.messages else {}
        metrics = last.get("metrics") or {}
        gap = lambda t: None if t is None else (t - self.sent_ns) / 1e9  # noqa: E731
        return {"client": self.client, "query": self.index, "run_id": last.get("run_id"),
                "status": last.get("status") if last.get("type") == "complete" else last.get("code", "incomplete"),
                "messages": len(self.messages), "user_ttft_s": gap(self.first_visible_ns),
                "e2e_s": gap(self.last_visible_ns), "server_user_ttft_s": metrics.get("user_ttft_s"),
                "server_e2e_s": metrics.get("e2e_s"), "problems": check_run_messages(self.messages)}


async def _client_session(url: str, client: int, queries: int, request: dict[str, Any],
                          headers: dict[str, str]) -> list[_ClientRun]:
    """One benchmark client: its queries one after another over one connection."""
    from websockets.asyncio.client import connect

    runs = []
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=60) as ws:
        for i in range(queries):
            query = BENCH_QUERIES[(client + i) % len(BENCH_QUERIES)]
            run = _ClientRun(client, i, time.perf_counter_ns())
            runs.append(run)
            await ws.send(json.dumps({**request, "query": query, "ref": f"c{client}q{i}"}))
            while True:
                message = json.loads(await ws.recv())
                now = time.perf_counter_ns()
                if message["type"] == "error" and message["run_id"] is None:  # refused
                    run.messages.append(message)
                    break
                run.messages.append(message)
                if message["type"] == "chunk" and message["visible"]:
                    run.first_visible_ns = run.first_visible_ns or now
                    run.last_visible_ns = now
                if message["type"] == "complete":
                    break
    return runs


async def bench_serve_async(clients: int = 20, queries: int = 3, *, model: str = "smollm2-135m",
                            preset: str = "direct", max_tokens: int = 32, timeout_s: float = 300.0,
                            url: str | None = None, token: str | None = None,
                            n_threads: int | None = None, client_cpu_bound: float = CLIENT_CPU_BOUND,
                            parallel: int | None = None) -> dict[str, Any]:
    """Load benchmark of the WebSocket API: ``clients`` concurrent connections, each sending ``queries``
    queries one after another. Starts its own server on a free loopback port unless given the ``url`` of a
    loopback one. Bounded: at most 200 clients x 50 queries, and ``timeout_s`` for the whole load, after which
    it stops and reports what finished. ``n_threads`` and ``parallel`` set the decoding threads and the sequences
    decoded at once of the server it starts.
    Returns client-side user-visible TTFT and E2E percentiles (p50/p95,
    from sending the query), the server's own figures, runs per minute, and every delivery problem found."""
    if not 0 < clients <= MAX_BENCH_CLIENTS or not 0 < queries <= MAX_BENCH_QUERIES:
        raise InvalidInput(f"clients must be 1..{MAX_BENCH_CLIENTS} and queries 1..{MAX_BENCH_QUERIES}, "
                           f"got {clients} and {queries}")
    if url is not None and not is_loopback(host_name(url) or ""):
        raise InvalidInput(f"the load benchmark only targets loopback servers, not {url!r}")
    if url is not None:
        return await _bench(url, clients, queries, model, preset, max_tokens, timeout_s, token, client_cpu_bound)
    config = ServerConfig(default_model=model, max_connections=clients + 8, preload=(model,), n_threads=n_threads,
                          parallel=parallel)
    server = await asyncio.to_thread(ServerThread(config=config).start)
    try:
        return {"parallel": server.app.state.kit.embedded.parallel} | await _bench(server.ws_url, clients, queries, model, preset, max_tokens, timeout_s, token,
                            client_cpu_bound)
    finally:
        await asyncio.to_thread(server.stop)


async def _bench(url: str, clients: int, queries: int, model: str, preset: str, max_tokens: int,
                 timeout_s: float, token: str | None, client_cpu_bound: float = CLIENT_CPU_BOUND) -> dict[str, Any]:
    request = {"model": model, "preset": preset, "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    warmup = await _client_session(url, 0, 1, request, headers)  # loads the model and warms caches: excluded
    t0, cpu0 = time.perf_counter(), time.thread_time()
    sessions = [asyncio.create_task(_client_session(url, c, queries, request, headers)) for c in range(clients)]
    done, pending = await asyncio.wait(sessions, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall_s, cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
    rows = [run.row() for task in done if not task.exception() for run in task.result()]
    failures = [f"{type(t.exception()).__name__}: {t.exception()}" for t in done if t.exception()]
    summary = _bench_summary(rows, warmup[0].row(), failures, clients, queries, wall_s, bool(pending), url,
                             dict(request))
    return {**summary, **client_cpu_check(cpu_s, wall_s, client_cpu_bound)}


def _bench_summary(rows: list[dict[str, Any]], warmup: dict[str, Any], failures: list[str], clients: int,
                   queries: int, wall_s: float, timed_out: bool, url: str, request: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    ok = [r for r in rows if r["status"] == "ok" and not r["problems"]]
    columns = ["user_ttft_s", "e2e_s", "server_user_ttft_s", "server_e2e_s"]
    stats: dict[str, Any] = {}
    if ok:
        stats = percentiles(pd.DataFrame(ok), columns=columns, q=(50, 95)).iloc[0].to_dict()
        stats.pop("n", None)
    return {
        "url": url, **request, "clients": clients, "queries_per_client": queries, "runs_expected": clients * queries,
        "runs_completed": len(ok), "runs_with_problems": [r for r in rows if r["status"] != "ok" or r["problems"]],
        "client_failures": failures, "timed_out": timed_out, "wall_s": wall_s,
        "runs_per_min": len(ok) / wall_s * 60 if wall_s > 0 else None,
        **{k: (None if pd.isna(v) else float(v)) for k, v in stats.items()},
        "warmup": {k: warmup[k] for k in ("status", "user_ttft_s", "e2e_s")},
    }


def bench_serve(clients: int = 20, queries: int = 3, **options: Any) -> dict[str, Any]:
    """Synchronous :func:`bench_serve_async` (``llmfirst bench serve``)."""
    from ..sync import run_sync

    return run_sync(bench_serve_async(clients, queries, **options))


def format_bench(result: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    def s(key: str) -> str:
        value = result.get(key)
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"{result['clients']} clients x {result['queries_per_client']} queries, model {result['model']}, "
        f"preset {result['preset']}, max_tokens {result['max_tokens']}",
        f"runs completed: {result['runs_completed']}/{result['runs_expected']} in {result['wall_s']:.1f} s "
        f"({result['runs_per_min'] or 0:.1f} runs/min){' -- timed out' if result['timed_out'] else ''}",
        f"user-visible TTFT (client)  p50 {s('user_ttft_s_p50')} s   p95 {s('user_ttft_s_p95')} s",
        f"E2E (client)                p50 {s('e2e_s_p50')} s   p95 {s('e2e_s_p95')} s",
        f"user-visible TTFT (server)  p50 {s('server_user_ttft_s_p50')} s   p95 {s('server_user_ttft_s_p95')} s",
    ]
    for run in result["runs_with_problems"][:5]:
        lines.append(f"problem: client {run['client']} query {run['query']}: {run['status']} {run['problems']}")
    lines += [f"client failure: {f}" for f in result["client_failures"][:5]]
    if result.get("client_competed"):
        lines.append(f"the clients used {result['client_cpu_cores']:.2f} cores (bound {result['client_cpu_bound']:g}): "
                     f"they competed with the server for CPU; these latencies include the clients' own delay")
    return "\n".join(lines)
