"""What every executor is and shares: the :class:`Executor` protocol, a cell's :class:`CellResult`, and
:func:`record_cell`, which writes a finished cell's marker into its directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from ..notebooks import Execution
from ..spec import GridCell, StudySpec
from ..store import mark_done, mark_failed


@dataclass
class CellResult:
    id: str
    state: str  # done | failed | skipped (done by an earlier invocation)
    wall_s: float | None = None
    error: str | None = None
    runs: int | None = None


class Executor(Protocol):
    """Executes grid cells. Entered before the runner writes anything (the dask executor connects to its
    scheduler then, so that an unreachable one fails first); :meth:`run_cells` yields each cell's result as it
    finishes, its files and marker (:func:`record_cell`) already in ``out/cells/<id>``. The runner alone
    writes the rest of the study directory: the lock, ``status.json``, the quality phase and the report."""

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: Any) -> None: ...

    def run_cells(self, spec: StudySpec, cells: list[GridCell], out: Path, bar: Any, echo: Callable[[str], Any]
                  ) -> Iterator[CellResult]:
        """``bar``: the runner's tqdm progress bar (the executor names the cell it works on); ``echo``: where
        messages go."""
        ...


def record_cell(cell: GridCell, cell_dir: Path, execution: Execution, **where: str) -> CellResult:
    """The cell's marker, written once its files are in ``cell_dir``: FAILED.json with the error, or DONE.json
    (``where``: e.g. the Dask worker and host that ran the cell, recorded in the marker)."""
    if execution.state == "failed":
        mark_failed(cell_dir, cell.id, execution.error, wall_s=execution.wall_s,
                    notebook_cell=execution.notebook_cell, **where)
        return CellResult(cell.id, "failed", execution.wall_s, execution.error)
    runs = mark_done(cell_dir, cell.id, wall_s=execution.wall_s, parameters=cell.parameters, **where)
    return CellResult(cell.id, "done", execution.wall_s, runs=runs)
