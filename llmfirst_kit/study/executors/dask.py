"""Study grids on a Dask cluster: ``run_study(..., executor="dask", scheduler="tcp://HOST:8786")`` or
``llmfirst study run STUDY.yaml --executor dask --scheduler tcp://HOST:8786``.

Dask schedules; the runner stays the only writer of the study directory (lock, markers, ``status.json``,
the report). Each unfinished cell is submitted once, as a task whose key names the cell. Workers may be
other machines without the runner's filesystem, so a task carries by value what its cell needs (the
notebook, the parameters, the queries file and perplexity text), executes the notebook in a temporary
directory on the worker -- with :func:`llmfirst_kit.study.notebooks.execute_notebook`, as the local
executor does -- and returns the files it produced as bytes. The runner writes them into the cell's directory, then the
marker. Because a worker never writes the study directory, a task that Dask runs twice (a worker thought
lost that was not) cannot duplicate records.

A worker that dies mid-cell costs that cell only: Dask reruns the task on another worker (up to
``distributed.scheduler.allowed-failures`` times), or gives up with ``KilledWorker`` and the cell is
recorded FAILED with that reason, to be redone by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..._fs import atomic_write
from ...errors import InvalidInput, KitError
from ..notebooks import Execution, check_kernel, execute_notebook
from ..quantization import prepare_variants
from ..spec import GridCell, StudySpec
from ..store import ENVIRONMENT, EXECUTED, QUALITY, RECORDS, StudyError, fresh_cell_dir, write_json
from .base import CellResult, record_cell

if TYPE_CHECKING:
    from distributed import Client, Future

CELL_FILES = (RECORDS, QUALITY, EXECUTED)  # what a cell produces, sent back to the runner
INPUT_FILES = ("queries_file", "perplexity_text")  # path parameters whose files are sent to the worker
START_HINT = "start one with `dask scheduler` and workers with `dask worker tcp://HOST:8786 --nthreads 1`"


@contextlib.contextmanager
def connect(scheduler: str | Client | None) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler`` (or of dask's configured ``scheduler-address``), closed
    afterwards; a ``Client`` passed in is used as it is and left open."""
    import dask
    from distributed import Client

    if isinstance(scheduler, Client):
        yield scheduler
        return
    address = scheduler or dask.config.get("scheduler-address", None)
    if not address:
        raise InvalidInput(f"the dask executor needs a scheduler: --scheduler tcp://HOST:8786 ({START_HINT})")
    try:
        client = Client(address, set_as_default=False)
    except (OSError, ValueError) as exc:  # refused, timed out, not an address
        raise StudyError(f"Dask scheduler not reachable at {address} ({exc}); {START_HINT}, or run with "
                         f"--executor local") from None
    try:
        yield client
    finally:
        client.close()


# ======================================================================================= on a worker

@dataclass(frozen=True)
class CellTask:
    """Everything a worker needs to execute one cell, by value."""

    cell: str
    notebook_name: str
    notebook: str  # the notebook's JSON
    parameters: dict[str, Any]
    inputs: dict[str, tuple[str, bytes]]  # path parameter -> (file name, content)
    timeout_s: int


@dataclass(frozen=True)
class CellOutcome:
    execution: Execution
    files: dict[str, bytes]  # file name -> content, of CELL_FILES
    worker: str
    host: str


def make_task(spec: StudySpec, cell: GridCell) -> CellTask:
    """The cell's task. An input file missing here is not sent: the cell's own validation names it."""
    inputs = {}
    for name in INPUT_FILES:
        path = Path(cell.parameters.get(name) or "")
        if path.name and path.is_file():
            inputs[name] = (path.name, path.read_bytes())
    return CellTask(cell=cell.id, notebook_name=spec.notebook.name, notebook=spec.notebook.read_text(encoding="utf-8"),
                    parameters=cell.parameters, inputs=inputs, timeout_s=spec.cell_timeout_s)


def execute_task(task: CellTask) -> CellOutcome:
    """Runs on a worker: write the inputs into a temporary directory, point the path parameters at them,
    build a missing quantized variant into this machine's cache, execute the notebook there and return the
    files it produced. Failures are returned, not raised, so that Dask never retries a cell that failed."""
    from distributed import get_worker

    worker = get_worker().address
    with tempfile.TemporaryDirectory(prefix=f"llmfirst-{task.cell}-") as tmp:
        work_dir = Path(tmp) / "cell"
        work_dir.mkdir()
        parameters = {**task.parameters, "output_dir": str(work_dir)}
        for name, (file_name, content) in task.inputs.items():
            path = Path(tmp) / "inputs" / name / file_name
            path.parent.mkdir(parents=True)
            path.write_bytes(content)
            parameters[name] = str(path)
        notebook = Path(tmp) / "inputs" / task.notebook_name
        notebook.parent.mkdir(parents=True, exist_ok=True)
        notebook.write_text(task.notebook, encoding="utf-8")
        execution = _unprepared(parameters) or execute_notebook(notebook, parameters, work_dir,
                                                                timeout_s=task.timeout_s)
        files = {name: (work_dir / name).read_bytes() for name in CELL_FILES if (work_dir / name).is_file()}
    return CellOutcome(execution, files, worker, socket.gethostname())


def _unprepared(parameters: dict[str, Any]) -> Execution | None:
    """Why this worker cannot execute the cell (no kernel, a variant it cannot build), or None."""
    try:
        check_kernel()
    except KitError as exc:
        return Execution("failed", None, f"{type(exc).__name__}: {exc}")
    build_errors = prepare_variants(parameters, echo=lambda _: None)
    return Execution("failed", None, next(iter(build_errors.values()))) if build_errors else None


async def _worker_environment(n_threads: int | None) -> dict[str, Any]:
    """``environment.capture`` on a worker, in a thread: the memory bandwidth measurement takes seconds and
    must not stall the worker's event loop (its heartbeats)."""
    from ... import environment

    env = await asyncio.to_thread(environment.capture, n_threads=n_threads)
    return {"host": socket.gethostname(), **env}


# ======================================================================================= the runner's side

def record_worker_environments(client: Client, path: Path, spec: StudySpec, echo: Callable[[str], Any]) -> None:
    """Add the environment of each connected worker not yet recorded to ``environment.json`` (under
    ``workers``, by address: the cells run there and their markers name the worker). Workers on one
    machine measure its memory bandwidth at the same time, so each sees its share."""
    env = json.loads(path.read_text(encoding="utf-8"))
    recorded = env.setdefault("workers", {})
    connected = list(client.ncores())
    if not connected:
        echo(f"no Dask worker is connected to {client.scheduler.address} yet: the cells wait for one "
             f"(`dask worker {client.scheduler.address} --nthreads 1`)")
    new = [address for address in connected if address not in recorded]
    if not new:
        return
    captured = client.run(_worker_environment, spec.parameters.get("n_threads") or None, workers=new,
                          on_error="return")
    for address, value in captured.items():
        failed = isinstance(value, BaseException)
        recorded[address] = {"error": f"{type(value).__name__}: {value}"} if failed else value
    write_json(path, env)
    echo(f"environment of {len(captured)} Dask worker(s) recorded")


class DaskExecutor:
    """The dask executor: entered, it connects to the scheduler (:func:`connect`); :meth:`run_cells` records
    the workers' environments, submits every cell once, then writes each cell's files and marker as it
    completes (in the order they complete)."""

    def __init__(self, *, scheduler: str | Client | None = None):
        self.scheduler = scheduler
        self.client: Client | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DaskExecutor:
        self.client = self._stack.enter_context(connect(self.scheduler))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self.client = None

    def run_cells(self, spec: StudySpec, cells: list[GridCell], out: Path, bar: Any, echo: Callable[[str], Any]
                  ) -> Iterator[CellResult]:
        """Leaving early (Ctrl-C, SIGTERM) cancels the cells not finished; a cell already executing finishes on
        its worker and its result is dropped."""
        from distributed import as_completed

        client = self.client
        if client is None:
            raise RuntimeError("enter the DaskExecutor (`with DaskExecutor(...) as executor:`) before run_cells")
        record_worker_environments(client, out / ENVIRONMENT, spec, echo)
        run = uuid.uuid4().hex[:8]  # two runs (or two studies with the same cell names) never share a key
        futures: dict[Future, GridCell] = {
            client.submit(execute_task, make_task(spec, cell), key=f"llmfirst-cell {cell.id} {run}"): cell
            for cell in cells}
        try:
            for future in as_completed(futures, loop=client.loop):  # our client need not be the default one
                cell = futures[future]
                bar.set_postfix_str(cell.id)
                yield _write_outcome(cell, out / "cells" / cell.id, future)
            # workers that joined during the run (e.g. one restarted after a crash), now that no cell runs
            record_worker_environments(client, out / ENVIRONMENT, spec, echo)
        except KeyboardInterrupt:
            bar.close()
            echo(f"interrupted: {sum(not f.done() for f in futures)} unfinished cell(s) cancelled; they will be "
                 f"redone: run the same command again to resume")
            raise
        finally:
            # unfinished cells leave the queue, finished ones' results the workers' memory -- at once: an erred
            # future is kept alive by its traceback until the garbage collector runs, and a Client passed in
            # stays connected
            client.cancel(list(futures))


def _write_outcome(cell: GridCell, cell_dir: Path, future: Future) -> CellResult:
    """The worker's files into the (emptied) cell directory, then the marker; a task that raised -- e.g.
    ``KilledWorker``: the workers executing it died too often -- is recorded FAILED with that reason."""
    fresh_cell_dir(cell_dir)
    try:
        outcome: CellOutcome = future.result()
    except Exception as exc:
        return record_cell(cell, cell_dir, Execution("failed", None, f"{type(exc).__name__}: {exc}"))
    for name, content in outcome.files.items():
        atomic_write(cell_dir / name, content)  # durable before the marker, as the local kernel's records are
    return record_cell(cell, cell_dir, outcome.execution, worker=outcome.worker, host=outcome.host)


__all__ = ["DaskExecutor", "connect", "record_worker_environments", "make_task", "execute_task", "CellTask",
           "CellOutcome"]
