"""The notebooks of a study and how they are executed: the cell notebook (``study.ipynb``, one execution
per grid cell) and the summary notebook (``study_summary.ipynb``, the report) -- package data in
``llmfirst_kit/assets/`` (:mod:`llmfirst_kit.data`) --, the Jupyter kernel they run on, the cell notebook's
parameter defaults, and one papermill execution.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..data import STUDY_NOTEBOOK
from ..errors import InvalidInput
from .store import EXECUTED, StudyError

KERNEL_NAME = "llmfirst-kit"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the source checkout (studies/, tests/); not in a wheel


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise StudyError(f"Jupyter kernel {KERNEL_NAME!r} is not installed; run: {sys.executable} -m ipykernel "
                         f"install --sys-prefix --name {KERNEL_NAME} --display-name {KERNEL_NAME}") from None



def notebook_defaults(notebook: Path = STUDY_NOTEBOOK) -> dict[str, Any]:
    """The defaults in the notebook's ``parameters`` cell (as papermill reads them)."""
    import ast

    import papermill as pm

    if not notebook.is_file():
        raise InvalidInput(f"study notebook {str(notebook)!r} does not exist; set `notebook:` in the study file")
    out = {}
    for name, info in pm.inspect_notebook(str(notebook)).items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            out[name] = info["default"]
    return out


@dataclass(frozen=True)
class Execution:
    """How one execution of the cell notebook ended (wall_s None: it never started)."""

    state: str  # done | failed
    wall_s: float | None
    error: str | None = None
    notebook_cell: int | None = None  # the notebook cell that raised


def execute_notebook(notebook: Path, parameters: Mapping[str, Any], work_dir: Path, *, timeout_s: int = 0
                     ) -> Execution:
    """Execute the cell notebook with papermill (kernel ``llmfirst-kit``, working directory ``work_dir``,
    the executed notebook saved there after every notebook cell). The one way a grid cell is executed: by
    the local runner in the cell's directory, by a Dask worker in a temporary directory."""
    import papermill as pm

    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(notebook), str(work_dir / EXECUTED), parameters=dict(parameters),
                            kernel_name=KERNEL_NAME, cwd=str(work_dir), progress_bar=False, log_output=False,
                            request_save_on_cell_execute=True, start_timeout=180, execution_timeout=timeout_s or None)
    except pm.PapermillExecutionError as exc:
        return Execution("failed", time.perf_counter() - t0, f"{exc.ename}: {exc.evalue}", exc.exec_count)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # the kernel died, could not start, timed out...
        return Execution("failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    return Execution("done", time.perf_counter() - t0)
