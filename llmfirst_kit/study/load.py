"""Load as a study dimension: the grid's load levels (``concurrency``: closed loop, N requests kept in flight
over the cell's queries; ``rates``: open loop, Poisson arrivals at R requests/s), running a cell's queries at
its level (:func:`run_at_load`), and the operator's answer (:func:`capacity_table`): per configuration, the
highest load at which it meets every latency target at p95 *and* its quality verdict holds.

Capacity at target is read in order of load: the highest level such that it and every lower level meet the
latency targets (a level that misses ends the count, so a lucky higher level never counts). Quality is judged
once per configuration, on the answers of its lowest load level (at temperature 0 they should not depend on
load; where batching flips a near-tie they can, and the summary counts those answers as ``answers_differ``):
without a quality verdict (no baseline, a judge that failed its gate, answers cut off) the capacity is "not
decided", never a level; with a verdict that fails, "none". The baseline system's own configuration holds its
quality by definition (it is the reference).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from ..settings import DEFAULT_PARALLEL

CLOSED, OPEN = "concurrency", "rate"
NOT_DECIDED, NONE = "not decided", "none"


@dataclass(frozen=True)
class LoadLevel:
    kind: str  # concurrency | rate
    value: float

    @property
    def key(self) -> str:
        """``c4`` (4 in flight) or ``r0.5`` (0.5 requests/s): the cell id's suffix and the records' label."""
        return f"c{int(self.value)}" if self.kind == CLOSED else f"r{self.value:g}"

    def parameters(self) -> dict[str, Any]:
        """The cell notebook's parameters for this one level."""
        if self.kind == CLOSED:
            return {"concurrency": [int(self.value)], "rates": []}
        return {"concurrency": [], "rates": [float(self.value)]}

    def labels(self) -> dict[str, Any]:
        return {"load": self.key, "concurrency": int(self.value) if self.kind == CLOSED else None,
                "rate": float(self.value) if self.kind == OPEN else None}


def load_levels(parameters: Mapping[str, Any]) -> list[LoadLevel]:
    """The levels of a study's (or a cell's) parameters: each concurrency, then each rate."""
    return ([LoadLevel(CLOSED, int(n)) for n in parameters.get("concurrency", [1])]
            + [LoadLevel(OPEN, float(r)) for r in parameters.get("rates", [])])


def parse_key(key: str | None) -> LoadLevel:
    """A cell's load key back to its level ("" -- a study without load levels -- is one at a time)."""
    if not key:
        return LoadLevel(CLOSED, 1)
    return LoadLevel(CLOSED, int(key[1:])) if key[0] == "c" else LoadLevel(OPEN, float(key[1:]))


def engine_parallel(parameters: Mapping[str, Any]) -> int:
    """Sequences the embedded engine decodes at once in every cell of a study: ``parallel``, or (0) the largest
    concurrency level and at least the engine's default, so that all levels run on one deployment."""
    return int(parameters.get("parallel") or max([DEFAULT_PARALLEL, *parameters.get("concurrency", [1])]))


async def run_at_load(level: LoadLevel, jobs: Sequence[Callable[[], Awaitable[Any]]], *, seed: int = 0,
                      key: str = "") -> None:
    """Run ``jobs`` at ``level``: closed loop, ``level.value`` workers taking the next job as one ends; open
    loop, each job started at its Poisson arrival time (seeded by ``seed`` and ``key``: the same schedule on
    every rerun), however many are in flight. (The level's wall time is read from its records.)"""
    from ..metrics import arrival_offsets

    t0 = time.perf_counter()
    if level.kind == CLOSED:
        queue = list(jobs)[::-1]

        async def worker() -> None:
            while queue:
                await queue.pop()()

        await asyncio.gather(*(worker() for _ in range(min(int(level.value), len(queue)) or 1)))
    else:
        offsets = arrival_offsets("poisson", level.value, len(jobs), seed, key)

        async def at(offset: float, job: Callable[[], Awaitable[Any]]) -> None:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            await job()

        await asyncio.gather(*(at(o, j) for o, j in zip(offsets, jobs)))


def quality_cells(cells: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Cell id -> the id of the cell whose answers are judged for its configuration (model x quantization x
    preset x backend x role): the lowest closed-loop level, else the lowest rate. Only done cells count."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for c in cells:
        if c.get("state", "done") == "done":
            key = (c.get("backend"), c["model"], c["quantization"], c["preset"], c.get("role", "grid"))
            groups.setdefault(key, []).append(c)
    out = {}
    for group in groups.values():
        first = min(group, key=lambda c: (parse_key(c.get("load")).kind != CLOSED, parse_key(c.get("load")).value))
        out |= {c["id"]: first["id"] for c in group}
    return out


def _first_miss(row: Mapping[str, Any], slo: Any) -> str:
    """What a level missed, e.g. "TTFT p95 4.1 s >= 3 s"."""
    if row.get("cell_state") != "done":
        return "the cell did not finish"
    misses = []
    for name, col, limit, scale, unit in (("TTFT", "user_ttft_s_p95", slo.ttft_s, 1, "s"),
                                          ("TPOT", "answer_tpot_s_p95", slo.tpot_s, 1000, "ms"),
                                          ("E2E", "e2e_s_p95", slo.e2e_s, 1, "s")):
        value = row.get(col)
        if value is None or value != value:  # None or NaN; an undefined TPOT (one-token answers) is no miss
            misses += [] if name == "TPOT" else [f"{name} not measured"]
        elif value >= limit:
            misses.append(f"{name} p95 {value * scale:.3g} {unit} >= {limit * scale:g} {unit}")
    return ", ".join(misses) or "a latency target missed"


def _true(value: Any) -> bool:
    return value is not None and value == value and bool(value)


def capacity_table(summary: Any, slo: Any) -> Any:
    """One row per configuration (backend x model x quantization x preset; the baseline system's own cell, when
    it is not a grid cell, left out): the levels measured, its quality verdict, and the capacity at target per
    kind of load (``capacity_concurrency``, ``capacity_rate``: the level, "none" or "not decided"; empty where
    no level of that kind was run), with ``capacity_note`` saying what ended the count."""
    import pandas as pd

    if summary is None or summary.empty:
        return pd.DataFrame()
    rows = []
    grid = summary[summary["cell_role"] != "baseline"] if "cell_role" in summary else summary
    for (backend, model, quant, preset), group in grid.groupby(["backend", "model", "quantization", "preset"],
                                                                sort=False):
        is_baseline = bool((group["role"] == "baseline").any()) if "role" in group else False
        judged = group[group["quality_cell"] == group["cell"]] if "quality_cell" in group else group.iloc[:1]
        verdict = True if is_baseline else (judged["meets_quality"].iloc[0] if len(judged) else None)
        verdict = None if verdict is None or verdict != verdict else bool(verdict)  # NaN -> None
        note = (judged["quality_note"].iloc[0] if len(judged) and "quality_note" in judged else None) or ""
        row: dict[str, Any] = {"backend": backend, "model": model, "quantization": quant, "preset": preset,
                               "levels": ", ".join(group["load"].astype(str)),
                               "quality": "baseline" if is_baseline else {None: NOT_DECIDED, True: "holds",
                                                                           False: "fails"}[verdict],
                               "quality_retention": None if is_baseline or not len(judged)
                               else judged["quality_retention"].iloc[0],
                               "retention_ci_low": None if is_baseline or not len(judged)
                               else judged["retention_ci_low"].iloc[0]}
        notes = []
        for kind in (CLOSED, OPEN):
            levels = group[group["load_kind"] == kind].sort_values("load_value")
            col = f"capacity_{kind}"
            if levels.empty:
                row[col] = ""
                continue
            if verdict is None:
                row[col] = NOT_DECIDED
                notes.append(f"no quality verdict ({note or 'not judged'})")
                continue
            if verdict is False:
                row[col] = NONE
                notes.append("quality below target")
                continue
            capacity = None
            for _, level in levels.iterrows():
                if _true(level.get("meets_latency")):
                    capacity = level["load"]
                    continue
                notes.append(f"{level['load']}: {_first_miss(level, slo)}")
                break
            row[col] = NONE if capacity is None else _level_text(capacity)
        row["capacity_note"] = "; ".join(dict.fromkeys(notes))
        rows.append(row)
    return pd.DataFrame(rows)


def _level_text(key: str) -> str:
    level = parse_key(key)
    return f"{int(level.value)}" if level.kind == CLOSED else f"{level.value:g} rps"


__all__ = ["CLOSED", "NONE", "NOT_DECIDED", "OPEN", "LoadLevel", "capacity_table", "engine_parallel", "load_levels",
           "parse_key", "quality_cells", "run_at_load"]
