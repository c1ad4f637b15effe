"""The runner (:func:`run_study`, ``llmfirst study run STUDY.yaml``): expands the grid, has an executor run
every unfinished cell (papermill, kernel ``llmfirst-kit``; locally or on Dask workers), resumes (a cell is
finished only when its ``DONE.json`` marker has been written after its records; an unfinished cell
directory is removed and the cell redone), records a failing cell's error and goes on, records the
environment once (``environment.json``), then runs the quality phase and builds the report. The baseline
system is a cell too, run first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .._fs import utc_now
from ..errors import InvalidInput
from .executors import get_executor
from .executors.base import CellResult, record_cell
from .notebooks import KERNEL_NAME, Execution, check_kernel, notebook_defaults
from .params import short_error
from .provenance import capture_environment
from .quality import judge_study
from .quantization import prepare_variants
from .report import build_report
from .spec import GridCell, StudySpec, baseline_cell, expand_grid, load_study
from .store import ENVIRONMENT, STATUS, STUDY_FILE, StudyError, cell_state, fresh_cell_dir, runner_lock, write_json

if TYPE_CHECKING:
    from distributed import Client


@dataclass
class StudyResult:
    output_dir: Path
    cells: list[CellResult]
    wall_s: float
    report: dict[str, str] | None = None
    report_error: str | None = None
    judging: dict[str, Any] | None = None  # counts of the quality phase (judge gate and pairwise judgments)
    judging_error: str | None = None

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.state == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.report_error is None and self.judging_error is None

    def describe(self) -> str:
        done = [c for c in self.cells if c.state == "done"]
        skipped = [c for c in self.cells if c.state == "skipped"]
        lines = [f"study {self.output_dir}: {len(self.cells)} cells: {len(done)} run now, {len(skipped)} already "
                 f"done (skipped), {len(self.failed)} failed; wall time {self.wall_s:.1f} s"]
        lines += [f"  FAILED {c.id}: {short_error(c.error)}" for c in self.failed]
        if self.judging:
            lines.append("  quality phase: " + ", ".join(f"{k} {v}" for k, v in self.judging.items()))
        if self.judging_error:
            lines.append(f"  the quality judging failed: {self.judging_error}")
        if self.report_error:
            lines.append(f"  the report failed: {self.report_error}")
        if self.report:
            lines += [f"  {k}: {v}" for k, v in self.report.items()]
        return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill PID`` stops the runner like Ctrl-C: papermill then shuts the kernel down. (On SIGKILL the
    kernel notices its parent is gone and exits by itself: ipykernel's parent poller.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_same_study(out: Path, spec: StudySpec, cells: list[GridCell]) -> None:
    """A directory holds one study: resuming with different shared parameters would mix two studies.
    The grid may grow (new models, quantizations or presets add cells)."""
    path = out / STUDY_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        axes = ("models", "quantizations", "presets", "concurrency", "rates")
        before = {k: v for k, v in old["spec"]["parameters"].items() if k not in axes}
        now = {k: v for k, v in spec.parameters.items() if k not in axes}
        # a parameter the notebook gained since (e.g. openai_base_url), left at its default, changes nothing
        defaults = notebook_defaults(spec.notebook)
        changed = sorted(k for k in before.keys() | now.keys()
                         if before.get(k, defaults.get(k)) != now.get(k, defaults.get(k)))
        if changed:
            raise StudyError(f"{out} holds a study run with different parameters ({', '.join(changed)}); use "
                             f"another output directory (--out) or delete {out}")
        known = {c["id"]: c for c in old["cells"]}
        cells_json = [*old["cells"], *(_cell_json(c) for c in cells if c.id not in known)]
    else:
        cells_json = [_cell_json(c) for c in cells]
    baseline = baseline_cell(spec, [c for c in cells if c.role == "grid"])
    write_json(path, {"spec": spec.to_dict(), "cells": cells_json, "kernel": KERNEL_NAME,
                      "baseline_cell": baseline.id if baseline else None})


def _cell_json(c: GridCell) -> dict[str, Any]:
    return {"id": c.id, "model": c.model, "quantization": c.quantization, "preset": c.preset, "role": c.role,
            "backend": c.backend, "load": c.load}


def run_study(study: str | os.PathLike[str] | Mapping[str, Any], *, output_dir: str | os.PathLike[str] | None = None,
              progress: bool = True, report: bool = True, judge: bool = True,
              echo: Callable[[str], Any] | None = None,
              executor: str = "local", scheduler: str | Client | None = None) -> StudyResult:
    """Run (or resume) a study: every unfinished grid cell is executed with papermill; finished cells
    are skipped; failed cells are recorded and retried on the next invocation. Builds the report at the
    end when ``report`` and at least one cell is done; before it, when ``judge``, the quality phase
    (:mod:`llmfirst_kit.study.quality`: the judge gate, then each configuration judged pairwise against the
    baseline's answers; resumable).

    ``executor="local"`` runs the cells one after another here; ``executor="dask"`` sends them to the
    workers of a Dask scheduler (``scheduler``: an address such as ``tcp://HOST:8786`` or a
    ``distributed.Client``; see :mod:`llmfirst_kit.study.executors.dask`). Either way this process alone
    writes the study directory: the lock, the markers, ``status.json`` and the report."""
    from tqdm.auto import tqdm

    cell_executor = get_executor(executor, scheduler=scheduler)  # an unknown executor or option fails first
    echo = echo or (lambda text: print(text, file=sys.stderr))
    t0 = time.perf_counter()
    spec = load_study(study, output_dir=output_dir)
    check_kernel()
    if not spec.notebook.is_file():
        raise InvalidInput(f"study notebook {spec.notebook} does not exist")
    results: dict[str, CellResult] = {}
    with contextlib.ExitStack() as stack:
        # entered first (dask: connected): an unreachable scheduler fails before anything is written
        running = stack.enter_context(cell_executor)
        out = spec.output_dir
        out.mkdir(parents=True, exist_ok=True)
        cells = expand_grid(spec)
        stack.enter_context(runner_lock(out))
        stack.enter_context(_sigterm_as_interrupt())
        _check_same_study(out, spec, cells)
        finished = sum(cell_state(out / "cells" / c.id) == "done" for c in cells)
        echo(f"study {spec.name}: {len(cells)} cells ({finished} already done) -> {out}")
        pending = [c for c in cells if cell_state(out / "cells" / c.id) != "done"]
        build_errors: dict[tuple[str, str], str] = {}
        for cell in {(c.backend, c.model, c.quantization): c for c in pending}.values():  # finished cells need none
            build_errors |= prepare_variants(cell.parameters, echo)
        if not (out / ENVIRONMENT).is_file():
            env = capture_environment(spec)
            write_json(out / ENVIRONMENT, env)
            echo(f"environment recorded: {env['cpu']['model']}, {env['n_threads']} threads, memory bandwidth "
                 f"{env.get('bandwidth_gb_per_s', 0):.1f} GB/s")
        to_run = []
        for cell in cells:
            cell_dir = out / "cells" / cell.id
            if cell_state(cell_dir) == "done":
                results[cell.id] = CellResult(cell.id, "skipped")
            elif (cell.model, cell.quantization) in build_errors:
                fresh_cell_dir(cell_dir)
                error = build_errors[(cell.model, cell.quantization)]
                results[cell.id] = record_cell(cell, cell_dir, Execution("failed", None, error))
            else:
                to_run.append(cell)
        bar = stack.enter_context(tqdm(total=len(cells), initial=len(results), unit="cell", disable=not progress,
                                       file=sys.stderr, dynamic_ncols=True))
        with contextlib.closing(running.run_cells(spec, to_run, out, bar, echo)) as finishing:
            for result in finishing:
                results[result.id] = result
                bar.update()
                if result.state == "failed":
                    bar.write(f"cell {result.id} failed: {short_error(result.error)}", file=sys.stderr)
        bar.close()
        results_in_order = [results[c.id] for c in cells]
        wall = time.perf_counter() - t0
        outcome = StudyResult(out, results_in_order, wall)
        write_json(out / STATUS, {"finished_at": utc_now(), "wall_s": wall,
                                  "cells": [dataclasses.asdict(c) for c in results_in_order]})
        if judge and any(cell_state(out / "cells" / c.id) == "done" for c in cells):
            try:  # the quality phase: the judge gate, then every configuration against the baseline
                outcome.judging = judge_study(out, echo=echo)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # the cells' results stay; a rerun judges what is missing
                outcome.judging_error = f"{type(exc).__name__}: {exc}"
            outcome.wall_s = time.perf_counter() - t0
        if report and any(cell_state(out / "cells" / c.id) == "done" for c in cells):
            try:
                outcome.report = build_report(out)
            except Exception as exc:  # the cells' results stay; `llmfirst study report DIR` can retry
                outcome.report_error = f"{type(exc).__name__}: {exc}"
            outcome.wall_s = time.perf_counter() - t0
    return outcome
