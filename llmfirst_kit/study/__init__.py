"""Studies: "which model, quantization and pipeline meets TTFT < 3 s, TPOT < 100 ms, E2E < 120 s and
quality >= 80 % of the baseline?", answered by a grid of papermill executions that can be resumed.

Each layer usable alone, one module each (lower ones never import higher ones):

- :mod:`.quantization` a model at a quantization: the backend's model id, table labels, building variants
- :mod:`.queries` the queries file; :mod:`.params` one cell's parameters: the pydantic model :class:`CellParams`
- :mod:`.store` the study directory: file names, cell markers, the runner's lock, :func:`load_results`
- :mod:`.notebooks` the cell and summary notebooks, the kernel, one papermill execution
- :mod:`.cell` what runs inside the cell notebook: :func:`run_cell`, :func:`measure_cell_quality`
- :mod:`.spec` the study file (the pydantic model :class:`StudyFile`) and its grid: :func:`load_study`,
  :func:`expand_grid`, :func:`baseline_cell`
- :mod:`.provenance` ``environment.json``: the machine, the kernel, the model files
- :mod:`.executors` the ``local`` and ``dask`` executors of grid cells, registered by name
- :mod:`.quality` the quality phase after the cells: the judge gate, pairwise judging, retention
- :mod:`.summary` :func:`runs_table`, :func:`summary_table`; :mod:`.report` ``summary.csv`` and ``report.html``
- :mod:`.runner` :func:`run_study` (``llmfirst study run STUDY.yaml``): all of the above, resumable

Labels (query category, language, repeat) are recorded beside each run for evaluation only; no model
ever sees them and nothing is decided from them.

This package re-exports the names notebooks and scripts use (``import llmfirst_kit.study as kit_study``).
"""

from __future__ import annotations

from .cell import JUDGE_STAGES, latency_view, make_backend, measure_cell_quality, run_cell
from .executors import EXECUTORS, CellResult, Executor, get_executor
from ..data import STUDY_NOTEBOOK, SUMMARY_NOTEBOOK
from .notebooks import KERNEL_NAME, PROJECT_ROOT, Execution, check_kernel, execute_notebook, notebook_defaults
from .params import CACHE_MODES, CellParams, accepted_parameters, notebook_parameters, short_error, validate_parameters
from .provenance import capture_environment
from .quantization import SHIPPED, model_id, quantization_label, safe_model_id
from .queries import Query, load_queries
from .report import build_report, show
from .runner import StudyResult, run_study
from .spec import GridCell, QualitySettings, StudyFile, StudySpec, baseline_cell, expand_grid, load_study
from .store import (DONE, ENVIRONMENT, EXECUTED, FAILED, QUALITY, RECORDS, STATUS, STUDY_FILE, SUMMARY_CSV,
                    StudyError, StudyResults, cell_state, load_results)
from .summary import config_label, runs_table, summary_table

__all__ = [
    "CACHE_MODES", "DONE", "ENVIRONMENT", "EXECUTED", "EXECUTORS", "FAILED", "JUDGE_STAGES",
    "KERNEL_NAME", "PROJECT_ROOT", "QUALITY", "RECORDS", "SHIPPED", "STATUS", "STUDY_FILE", "STUDY_NOTEBOOK",
    "SUMMARY_CSV", "SUMMARY_NOTEBOOK", "CellParams", "CellResult", "Execution", "Executor", "GridCell",
    "QualitySettings", "Query", "StudyError", "StudyFile", "StudyResult", "StudyResults", "StudySpec",
    "accepted_parameters",
    "baseline_cell", "build_report", "capture_environment", "cell_state", "check_kernel", "config_label",
    "execute_notebook", "expand_grid", "get_executor", "latency_view", "load_queries", "load_results", "load_study",
    "make_backend", "measure_cell_quality", "model_id", "notebook_defaults", "notebook_parameters",
    "quantization_label", "run_cell", "run_study", "runs_table", "safe_model_id", "short_error", "show",
    "summary_table", "validate_parameters",
]
