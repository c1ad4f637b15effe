"""The local executor: the cells one after another, each notebook executed by papermill in a kernel
subprocess of this process, in the cell's own directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import InvalidInput
from ..notebooks import execute_notebook
from ..spec import GridCell, StudySpec
from ..store import fresh_cell_dir
from .base import CellResult, record_cell


def execute_cell(spec: StudySpec, cell: GridCell, cell_dir: Path) -> CellResult:
    fresh_cell_dir(cell_dir)
    return record_cell(cell, cell_dir, execute_notebook(spec.notebook, cell.parameters, cell_dir,
                                                        timeout_s=spec.cell_timeout_s))


class LocalExecutor:
    def __init__(self, *, scheduler: Any = None):
        if scheduler is not None:
            raise InvalidInput("a scheduler is used by the dask executor only: --executor dask --scheduler "
                               "tcp://HOST:8786")

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def run_cells(self, spec: StudySpec, cells: list[GridCell], out: Path, bar: Any, echo: Callable[[str], Any]
                  ) -> Iterator[CellResult]:
        for cell in cells:
            bar.set_postfix_str(cell.id)
            try:
                result = execute_cell(spec, cell, out / "cells" / cell.id)
            except KeyboardInterrupt:
                bar.close()
                echo(f"interrupted during {cell.id}: that cell will be redone; run the same command again to resume")
                raise
            yield result
