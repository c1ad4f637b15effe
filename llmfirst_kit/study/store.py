"""The study directory: its file names, the state of a cell (its DONE / FAILED marker), the one-runner lock,
durable JSON writes, and loading everything a finished (or partly finished) study holds.

Layout::

    DIR/study.json  environment.json  status.json  summary.csv  report.ipynb  report.html
    DIR/judging/judgments.jsonl   (every gate pair and every judged pair, with both orders' verdicts)
    DIR/cells/<model>@<quantization>--<preset>/records.jsonl  quality.json  study.ipynb  DONE.json | FAILED.json

A cell is finished only when its ``DONE.json`` marker has been written atomically after its records.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .._fs import atomic_write, utc_now
from ..errors import InvalidInput, KitError
from ..metrics import SLO
from ..records import RunRecord
from ..sinks.jsonl import read_log

RECORDS = "records.jsonl"
QUALITY = "quality.json"
EXECUTED = "study.ipynb"
DONE = "DONE.json"
FAILED = "FAILED.json"
STUDY_FILE = "study.json"
ENVIRONMENT = "environment.json"
STATUS = "status.json"
SUMMARY_CSV = "summary.csv"


class StudyError(KitError):
    code = "study_failed"


def write_json(path: Path, data: Any) -> None:
    """Atomic (``_fs.atomic_write``: a temporary file, fsync'ed, renamed over ``path``), then the directory
    fsync'ed, so that a marker, once written, survives a crash of the machine too."""
    atomic_write(path, json.dumps(data, ensure_ascii=False, indent=1, default=str))
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ======================================================================================= cells

def cell_state(cell_dir: Path) -> str:
    if (cell_dir / DONE).is_file():
        return "done"
    if (cell_dir / FAILED).is_file():
        return "failed"
    return "incomplete" if cell_dir.exists() else "pending"


def cell_records(cell_dir: Path) -> list[RunRecord]:
    """The run records a cell has written (none without a records file)."""
    return [r for r in read_log(cell_dir / RECORDS) if isinstance(r, RunRecord)] \
        if (cell_dir / RECORDS).is_file() else []


def mark_failed(cell_dir: Path, cell_id: str, error: str | None, *, wall_s: float | None = None,
                notebook_cell: int | None = None, **where: str) -> None:
    """FAILED.json with the error (``notebook_cell``: the notebook cell that raised; ``where``: e.g. the Dask
    worker and host that ran the cell)."""
    write_json(cell_dir / FAILED, {"cell": cell_id, "error": error,
                                   **({"notebook_cell": notebook_cell} if notebook_cell is not None else {}),
                                   **({"wall_s": wall_s} if wall_s is not None else {}),
                                   "failed_at": utc_now(), **where})


def mark_done(cell_dir: Path, cell_id: str, *, wall_s: float | None, parameters: dict[str, Any], **where: str
              ) -> int:
    """DONE.json, written once the cell's files are in ``cell_dir``; returns the number of its records."""
    runs = len(cell_records(cell_dir))
    # the marker comes last: the records were fsync'ed (run by run, or as received from a Dask worker), so a
    # marker always means complete records
    write_json(cell_dir / DONE, {"cell": cell_id, "runs": runs, "wall_s": wall_s, "finished_at": utc_now(),
                                 "parameters": parameters, **where})
    return runs


def _processes_working_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (Linux ``/proc``; elsewhere none are found)."""
    target = str(directory.resolve())
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd") == target:
                pids.append(int(proc.name))
    return pids


def _clear(cell_dir: Path, *, grace_s: float = 15.0) -> None:
    """Remove an earlier, unfinished attempt of a cell. A kernel orphaned by a killed runner (its working
    directory is the cell's) may write one more record before ipykernel's parent poller (1 s) stops it:
    wait for it to be gone first, or a new attempt could get its records too."""
    deadline = time.monotonic() + grace_s
    while pids := _processes_working_in(cell_dir):
        if time.monotonic() > deadline:
            raise StudyError(f"process(es) {', '.join(map(str, pids))} still work in {cell_dir} (a kernel left by "
                             f"a killed runner?); stop them and run again")
        time.sleep(0.1)
    shutil.rmtree(cell_dir, ignore_errors=True)


def fresh_cell_dir(cell_dir: Path) -> None:
    """An empty cell directory: an interrupted or failed attempt is redone from scratch, no duplicated records."""
    if cell_dir.exists():
        _clear(cell_dir)
    cell_dir.mkdir(parents=True)


# ======================================================================================= the runner's lock

@contextlib.contextmanager
def runner_lock(directory: Path) -> Iterator[None]:
    """One runner per study directory: a second one fails at once (not ``_fs.file_lock``, which waits). The
    lock dies with its process; the lock file is removed on exit (re-checked after locking, so a runner
    never holds a lock on a file another one just removed)."""
    import fcntl

    path = directory / ".lock"
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StudyError(f"another runner is working on {directory}; wait for it or stop it") from None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()  # removed by a runner that just finished: lock the new file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


# ======================================================================================= results

@dataclass
class StudyResults:
    """Everything a study directory holds, loaded."""

    directory: Path
    spec: dict[str, Any]
    environment: dict[str, Any]
    cells: list[dict[str, Any]]  # id, model, quantization, preset, state, error, wall_s, runs
    runs: list[RunRecord]
    quality: list[dict[str, Any]]
    baseline_cell: str | None = None  # the id of the cell whose answers are the baseline system's

    @property
    def slo(self) -> SLO:
        p = self.spec["parameters"]
        return SLO(ttft_s=p.get("ttft_slo_s", 3.0), tpot_s=p.get("tpot_slo_s", 0.1), e2e_s=p.get("e2e_slo_s", 120.0))

    @property
    def bandwidth_gb_per_s(self) -> float | None:
        return self.environment.get("bandwidth_gb_per_s")


def load_results(study_dir: str | os.PathLike[str]) -> StudyResults:
    """Records of finished cells only (a cell without its DONE marker is incomplete and left out)."""
    d = Path(study_dir)
    if not (d / STUDY_FILE).is_file():
        raise InvalidInput(f"{d} is not a study directory (no {STUDY_FILE}); run `llmfirst study run STUDY.yaml`")
    study = json.loads((d / STUDY_FILE).read_text(encoding="utf-8"))
    env = json.loads((d / ENVIRONMENT).read_text(encoding="utf-8")) if (d / ENVIRONMENT).is_file() else {}
    cells, runs, qual = [], [], []
    for c in study["cells"]:
        cdir = d / "cells" / c["id"]
        state = cell_state(cdir)
        row = {**c, "state": state, "error": None, "wall_s": None, "runs": None}
        if state == "done":
            done = json.loads((cdir / DONE).read_text(encoding="utf-8"))
            row.update(wall_s=done.get("wall_s"), runs=done.get("runs"))
            runs += cell_records(cdir)
            if (cdir / QUALITY).is_file():
                qual += json.loads((cdir / QUALITY).read_text(encoding="utf-8"))
        elif state == "failed":
            failed = json.loads((cdir / FAILED).read_text(encoding="utf-8"))
            row.update(error=failed.get("error"), wall_s=failed.get("wall_s"))
        cells.append(row)
    return StudyResults(directory=d, spec=study["spec"], environment=env, cells=cells, runs=runs, quality=qual,
                        baseline_cell=study.get("baseline_cell"))
