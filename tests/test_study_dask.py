"""The study runner on a real Dask cluster: a ``distributed.LocalCluster`` with a scheduler and two worker
processes on this machine, each cell's notebook executed by papermill on a worker with the real embedded
SmolLM2-135M (max_tokens 8-16, one or two queries, one decode thread).

The workers get their own model cache (``LLMFIRST_CACHE``), so the worker running the ``Q8_0`` cell builds
that variant itself, as a worker on another machine would. Checked: the same states, markers, records and
report as the local executor; a rerun resubmits nothing finished; a worker SIGKILLed mid-cell costs that
cell only (Dask reruns it elsewhere, or it is recorded FAILED and the next run redoes it); SIGTERM of a CLI
runner cancels its cells; an unreachable scheduler is a clear error; two builders of one variant at once.
The fault injection is real (a worker process killed, a runner signalled); nothing is faked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import pandas as pd
import pytest
from distributed import Client, LocalCluster, get_task_stream

from llmfirst_kit import cli, data, study
from llmfirst_kit.errors import InvalidInput
from llmfirst_kit.records import RunRecord
from llmfirst_kit.sinks.jsonl import read_log

ROOT = study.PROJECT_ROOT
QUERIES = str(data.QUERIES)
TEXT = str(data.TEXTS["en"])
THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))

# three cells: shipped, Q8_0 (a variant the worker builds into its own cache) and Q9 (an unknown type:
# the cell fails in its parameter validation, like an unknown model)
GRID = {
    "name": "grid", "backend": "embedded", "models": ["smollm2-135m"], "quantizations": ["shipped", "Q8_0", "Q9"],
    "presets": ["direct"], "queries_file": QUERIES, "query_ids": ["en-s01"], "repeats": 1, "warmup_runs": 1,
    "max_tokens": 8, "judge_model": "", "n_threads": THREADS, "perplexity_text": TEXT, "perplexity_tokens": 32,
    "baseline_model": "",
}
SHIPPED, Q8, Q9 = "smollm2-135m@shipped--direct", "smollm2-135m@Q8_0--direct", "smollm2-135m@Q9--direct"
QUIET = {"progress": False, "echo": lambda _: None}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two worker processes with their own model cache and TMPDIR; the runner (this process) gets a fresh
    cache too, so the variants are built during the tests."""
    worker_cache, worker_tmp = tmp_path_factory.mktemp("worker-cache"), tmp_path_factory.mktemp("worker-tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFIRST_CACHE", str(tmp_path_factory.mktemp("runner-cache")))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          env={"LLMFIRST_CACHE": str(worker_cache), "TMPDIR": str(worker_tmp)}) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(2)
            yield cluster, client, worker_cache, worker_tmp


@pytest.fixture(scope="module")
def grid(cluster, tmp_path_factory):
    """The same grid run by the local executor and by the dask executor (given a Client)."""
    _, client, _, _ = cluster
    base = tmp_path_factory.mktemp("grid")
    local = study.run_study(GRID, output_dir=base / "local", report=True, **QUIET)
    on_dask = study.run_study(GRID, output_dir=base / "dask", report=True, executor="dask", scheduler=client,
                              **QUIET)
    return local, on_dask, base / "local", base / "dask"


def _runs(path: Path) -> list[RunRecord]:
    return [r for r in read_log(path) if isinstance(r, RunRecord)]


def _marker(cell_dir: Path, name: str = study.DONE) -> dict:
    return json.loads((cell_dir / name).read_text(encoding="utf-8"))


def test_dask_gives_what_the_local_executor_gives(grid, cluster):
    local, on_dask, local_dir, dask_dir = grid
    _, client, worker_cache, _ = cluster
    assert {c.id: c.state for c in on_dask.cells} == {c.id: c.state for c in local.cells} == {
        SHIPPED: "done", Q8: "done", Q9: "failed"}
    assert on_dask.report and local.report and (dask_dir / "report.html").is_file()
    workers = set(client.ncores())
    for cell in (SHIPPED, Q8):
        here, there = local_dir / "cells" / cell, dask_dir / "cells" / cell
        assert sorted(p.name for p in there.iterdir()) == sorted(p.name for p in here.iterdir()) == sorted(
            [study.DONE, study.RECORDS, study.QUALITY, study.EXECUTED])
        done, done_local = _marker(there), _marker(here)
        assert set(done) == set(done_local) | {"worker", "host"}
        assert done["worker"] in workers and done["host"] == socket.gethostname()  # run by a worker
        assert done["runs"] == done_local["runs"] == 2
        assert done["parameters"]["output_dir"] == str(there)  # the runner's paths, not the worker's
        assert {k: v for k, v in done["parameters"].items() if k != "output_dir"} == {
            k: v for k, v in done_local["parameters"].items() if k != "output_dir"}
        runs, runs_local = _runs(there / study.RECORDS), _runs(here / study.RECORDS)
        shape = [(r.labels["query_id"], r.warmup, r.status, r.labels["model_id"]) for r in runs]
        assert shape == [(r.labels["query_id"], r.warmup, r.status, r.labels["model_id"]) for r in runs_local]
        assert [r.labels["query_id"] for r in runs] == ["en-s01", "en-s01"]  # warm-up + measured, once each
        quality, quality_local = (json.loads((d / study.QUALITY).read_text()) for d in (there, here))
        # the perplexity text reached the worker; same model file, same text: the same numbers
        assert quality[0]["perplexity"] == pytest.approx(quality_local[0]["perplexity"], rel=1e-6)
    assert _marker(dask_dir / "cells" / Q9, study.FAILED)["error"] == _marker(local_dir / "cells" / Q9,
                                                                              study.FAILED)["error"]
    assert "quantization 'Q9' is unknown" in on_dask.failed[0].error
    # the worker built the variant into its own cache
    assert (worker_cache / "variants" / "smollm2-135m@Q8_0.gguf").is_file()
    env = json.loads((dask_dir / study.ENVIRONMENT).read_text())
    assert workers <= set(env["workers"]) and all(w["llama_cpp"]["version"] for w in env["workers"].values())
    columns = ["cell", "model", "quantization", "preset", "cell_state", "cell_error", "n_runs", "n_errors"]
    summary, summary_local = (pd.read_csv(d / study.SUMMARY_CSV) for d in (dask_dir, local_dir))
    assert list(summary.columns) == list(summary_local.columns)
    pd.testing.assert_frame_equal(summary[columns], summary_local[columns])
    assert summary.set_index("cell").loc[Q8, "kl_mean"] > 0


def test_rerun_resubmits_no_finished_cell(grid, cluster):
    _, _, _, dask_dir = grid
    cluster_, client, _, _ = cluster
    before = {c: (dask_dir / "cells" / c / study.DONE).read_text() for c in (SHIPPED, Q8)}
    records = {c: (dask_dir / "cells" / c / study.RECORDS).read_text() for c in (SHIPPED, Q8)}
    with get_task_stream(client) as stream:
        again = study.run_study(GRID, output_dir=dask_dir, report=False, executor="dask",
                                scheduler=cluster_.scheduler_address, **QUIET)
    assert {c.id: c.state for c in again.cells} == {SHIPPED: "skipped", Q8: "skipped", Q9: "failed"}
    ran = {t["key"] for t in stream.data}
    assert len(ran) == 1 and Q9 in next(iter(ran))  # only the failed cell was submitted again
    assert {c: (dask_dir / "cells" / c / study.DONE).read_text() for c in (SHIPPED, Q8)} == before
    assert {c: (dask_dir / "cells" / c / study.RECORDS).read_text() for c in (SHIPPED, Q8)} == records


def test_unknown_executor_and_unreachable_scheduler(tmp_path, capsys):
    with pytest.raises(InvalidInput, match="accepted: local, dask"):
        study.run_study(GRID, output_dir=tmp_path / "x", executor="ray", **QUIET)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(study.StudyError) as info:
            study.run_study(GRID, output_dir=tmp_path / "x", executor="dask", scheduler=address, **QUIET)
        assert f"Dask scheduler not reachable at {address}" in str(info.value)
        assert "`dask scheduler`" in str(info.value) and "`dask worker tcp://HOST:8786" in str(info.value)
        yaml_file = tmp_path / "grid.yaml"
        yaml_file.write_text(json.dumps(GRID))  # JSON is YAML
        code = cli.main(["study", "run", str(yaml_file), "--out", str(tmp_path / "y"), "--executor", "dask",
                         "--scheduler", address])
    assert code == cli.EXIT_FAILED
    assert f"Dask scheduler not reachable at {address}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was written


def _wait_until_running(client: Client, worker_tmp: Path, cell: str, runner: subprocess.Popen | None = None,
                        deadline_s: float = 120) -> str:
    """The address of the worker executing ``cell``, once its kernel runs (papermill has saved the executed
    notebook into the task's temporary directory, under the workers' TMPDIR). A worker killed earlier left
    its temporary directory behind: only new ones count."""
    pattern = f"llmfirst-{cell}-*/cell/{study.EXECUTED}"
    before = set(worker_tmp.glob(pattern))
    deadline = time.monotonic() + deadline_s
    while True:
        busy = [w for w, keys in client.processing().items() if any(cell in str(k) for k in keys)]
        if busy and set(worker_tmp.glob(pattern)) - before:
            return busy[0]
        assert time.monotonic() < deadline, f"{cell} never started on a worker"
        assert runner is None or runner.poll() is None, "the runner exited"
        time.sleep(0.05)


def _kill_worker_mid_cell(client: Client, worker_tmp: Path, cell: str) -> str:
    """SIGKILL the worker process executing ``cell`` while it runs; returns the worker's address."""
    address = _wait_until_running(client, worker_tmp, cell)
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)
    return address


def _run_in_thread(**kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = study.run_study(**kwargs)
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


KILL_GRID = {**GRID, "quantizations": ["shipped", "Q8_0"], "query_ids": ["en-s01", "en-s02"], "max_tokens": 16,
             "warmup_runs": 0, "perplexity_text": ""}
QUERY_IDS = ["en-s01", "en-s02"]


def _check_cells_once(out: Path, killed: str) -> None:
    """Both cells done, each query run exactly once, and the killed worker finished nothing."""
    for cell in (SHIPPED, Q8):
        cell_dir = out / "cells" / cell
        assert [r.labels["query_id"] for r in _runs(cell_dir / study.RECORDS)] == QUERY_IDS
        assert _marker(cell_dir)["runs"] == len(QUERY_IDS) and _marker(cell_dir)["worker"] != killed


def test_a_worker_killed_mid_cell_costs_that_cell_only(cluster, tmp_path):
    """Dask reruns the lost cell on a live worker (allowed-failures, default 3); the other cell is intact."""
    cluster_, client, _, worker_tmp = cluster
    thread, box = _run_in_thread(study=KILL_GRID, output_dir=tmp_path / "out", report=False, executor="dask",
                                 scheduler=cluster_.scheduler_address, **QUIET)
    killed = _kill_worker_mid_cell(client, worker_tmp, Q8)
    thread.join(180)
    assert not thread.is_alive() and "error" not in box, box
    assert {c.id: c.state for c in box["result"].cells} == {SHIPPED: "done", Q8: "done"}
    _check_cells_once(tmp_path / "out", killed)


def test_a_cell_whose_workers_keep_dying_fails_and_is_redone_next_run(cluster, tmp_path):
    """With no failures allowed, Dask gives up (KilledWorker): that cell is recorded FAILED with the reason,
    the other one finishes, and the next run redoes only the failed cell."""
    cluster_, client, _, worker_tmp = cluster
    client.wait_for_workers(2)  # the worker killed in the previous test is back (its nanny restarts it)
    scheduler = cluster_.scheduler  # in this process: set its allowed failures for this test only
    allowed, scheduler.allowed_failures = scheduler.allowed_failures, 0
    out = tmp_path / "out"
    try:
        thread, box = _run_in_thread(study=KILL_GRID, output_dir=out, report=False, executor="dask",
                                     scheduler=client, **QUIET)
        killed = _kill_worker_mid_cell(client, worker_tmp, SHIPPED)
        thread.join(180)
    finally:
        scheduler.allowed_failures = allowed
    assert not thread.is_alive() and "error" not in box, box
    assert {c.id: c.state for c in box["result"].cells} == {SHIPPED: "failed", Q8: "done"}
    failed = _marker(out / "cells" / SHIPPED, study.FAILED)
    assert failed["error"].startswith("KilledWorker") and not (out / "cells" / SHIPPED / study.RECORDS).exists()
    client.wait_for_workers(2)
    again = study.run_study(KILL_GRID, output_dir=out, report=False, executor="dask", scheduler=client, **QUIET)
    assert {c.id: c.state for c in again.cells} == {SHIPPED: "done", Q8: "skipped"}
    _check_cells_once(out, killed)


def test_sigterm_cancels_the_outstanding_cells(cluster, tmp_path):
    """`kill` of a CLI runner mid-run: it stops like Ctrl-C, its cells leave the scheduler, no unfinished cell
    has a marker, and a rerun finishes the grid with every query run exactly once."""
    cluster_, client, _, worker_tmp = cluster
    client.wait_for_workers(2)
    spec = {**KILL_GRID, "quantizations": ["shipped", "Q8_0", "Q4_0"]}
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    out = tmp_path / "out"
    with open(tmp_path / "runner.log", "w") as log:
        runner = subprocess.Popen([sys.executable, "-m", "llmfirst_kit.cli", "study", "run", str(path), "--out",
                                   str(out), "--no-report", "--no-progress", "--executor", "dask", "--scheduler",
                                   cluster_.scheduler_address], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_running(client, worker_tmp, SHIPPED, runner)
            runner.send_signal(signal.SIGTERM)
            assert runner.wait(60) == cli.EXIT_CANCELLED
        finally:
            runner.kill()
    assert "interrupted: 3 unfinished cell(s) cancelled" in (tmp_path / "runner.log").read_text()
    deadline = time.monotonic() + 30
    while any("llmfirst-cell" in str(key) for key in cluster_.scheduler.tasks):  # cancelled, forgotten
        assert time.monotonic() < deadline, list(cluster_.scheduler.tasks)
        time.sleep(0.1)
    cells = [out / "cells" / f"smollm2-135m@{q}--direct" for q in spec["quantizations"]]
    assert not (out / ".lock").exists() and not (cells[2] / study.DONE).exists()
    client.wait_for_workers(2)
    again = study.run_study(spec, output_dir=out, report=False, executor="dask", scheduler=client, **QUIET)
    assert all(c.state in ("done", "skipped") for c in again.cells) and again.cells[2].state == "done"
    for cell in cells:
        assert [r.labels["query_id"] for r in _runs(cell / study.RECORDS)] == QUERY_IDS


def test_two_builders_of_one_variant_at_once(tmp_path, monkeypatch):
    """Two workers on one machine may build the same missing variant at the same moment (here two threads,
    released together; builders in one process share a pid, so their temporary files would collide without
    the build lock): one builds, the other waits and finds it built, and the file verifies."""
    from llmfirst_kit.models.quantize import quantize
    from llmfirst_kit.models.variants import resolve_variant

    monkeypatch.setenv("LLMFIRST_CACHE", str(tmp_path / "cache"))
    barrier, built = threading.Barrier(2), []

    def build() -> None:
        barrier.wait()
        built.append(quantize("smollm2-135m", "Q5_0", n_threads=THREADS).built_s)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(built) == 2 and sum(b is not None for b in built) == 1
    assert resolve_variant("smollm2-135m@Q5_0").path.is_file()  # sha256 matches its sidecar
