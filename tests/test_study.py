"""The study runner end to end: real papermill executions of the cell notebook (llmfirst_kit/assets/study.ipynb)
on the real embedded SmolLM2-135M (max_tokens 16, two queries, one decode thread), the runner killed and
resumed, a failing cell, invalid parameters, and the report.

Kept fast: one shared tiny study (one good cell, one cell with an unknown model) serves the end-to-end,
failure and report tests; the resume test runs its own three-cell grid in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import papermill as pm
import pytest

from llmfirst_kit import data, metrics

from llmfirst_kit import study
from llmfirst_kit.errors import InvalidInput
from llmfirst_kit.models import REGISTRY
from llmfirst_kit.records import RunRecord
from llmfirst_kit.sinks.jsonl import read_log
from llmfirst_kit.study import params

ROOT = study.PROJECT_ROOT
QUERIES = str(data.QUERIES)
TEXT = str(data.TEXTS["en"])
THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))

TINY = {
    "name": "tiny", "backend": "embedded", "models": ["smollm2-135m", "no-such-model"], "quantizations": ["shipped"],
    "presets": ["direct"], "queries_file": QUERIES, "query_ids": ["en-s01", "en-a01"], "repeats": 1,
    "warmup_runs": 1, "max_tokens": 16, "judge_model": "smollm2-135m", "n_threads": THREADS,
    "perplexity_text": TEXT, "perplexity_tokens": 32,
    "baseline_model": "",  # no baseline system: the quality phase (tests/test_study_quality.py) has its own tests
}
GOOD = "smollm2-135m@shipped--direct"
BAD = "no-such-model@shipped--direct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    result = study.run_study(TINY, output_dir=out, progress=False, report=True, echo=lambda _: None)
    return result, out


def _runs(path: Path) -> list[RunRecord]:
    return [r for r in read_log(path) if isinstance(r, RunRecord)]


def test_runner_end_to_end(tiny):
    result, out = tiny
    states = {c.id: c.state for c in result.cells}
    assert states == {GOOD: "done", BAD: "failed"}
    cell = out / "cells" / GOOD
    assert (cell / study.DONE).is_file() and (cell / study.EXECUTED).is_file()  # executed notebook kept beside
    runs = _runs(cell / study.RECORDS)
    assert [r.warmup for r in runs] == [True, False, False]
    measured = runs[1:]
    assert [r.labels["query_id"] for r in measured] == ["en-s01", "en-a01"]
    assert all(r.status == "ok" and r.labels["model"] == "smollm2-135m" and r.labels["quantization"] == "Q4_1"
               for r in measured)
    assert all(r.quality is not None and r.quality["judge_model"] == "smollm2-135m" for r in measured)  # judged
    assert json.loads((cell / study.DONE).read_text())["runs"] == 3
    quality = json.loads((cell / study.QUALITY).read_text())
    assert quality[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6) and quality[0]["perplexity"] > 1
    env = json.loads((out / study.ENVIRONMENT).read_text())
    assert env["bandwidth_gb_per_s"] > 0 and env["llama_cpp"]["version"] and env["cpu"]["usable_cores"] >= 1
    assert env["packages"]["llama-cpp-python"] and "system_info" in env["llama_cpp"]
    files = {f["name"]: f for f in env["model_files"] if "sha256" in f}
    assert files["smollm2-135m"]["sha256"] == REGISTRY["smollm2-135m"].sha256
    # the engine configuration chosen for this machine, and why, beside every number of the study
    assert env["engine"]["config"] in ("amx", "cpu-repack", "none") and env["engine"]["reason"]
    assert all(r.environment["engine"]["config"] == env["engine"]["config"] for r in runs)


def test_failing_cell_is_recorded_and_the_others_finish(tiny):
    result, out = tiny
    failed = json.loads((out / "cells" / BAD / study.FAILED).read_text())
    assert "no-such-model" in failed["error"] and "known:" in failed["error"]
    assert not (out / "cells" / BAD / study.RECORDS).exists()  # failed in validation: no model call
    assert [c.id for c in result.failed] == [BAD]
    assert "FAILED no-such-model@shipped--direct" in result.describe()
    status = json.loads((out / study.STATUS).read_text())
    assert {c["id"]: c["state"] for c in status["cells"]} == {GOOD: "done", BAD: "failed"}


def test_report_has_the_table_and_offline_charts(tiny):
    import pandas as pd

    result, out = tiny
    assert result.report and Path(result.report["report"]).is_file()
    summary = pd.read_csv(out / study.SUMMARY_CSV)
    expected = {"model", "quantization", "preset", "cell_state", "cell_error", "n_runs",
                "user_ttft_s_p50", "user_ttft_s_p95", "user_ttft_s_p50_ci_low", "user_ttft_s_p50_ci_high",
                "answer_tpot_s_p50", "answer_tpot_s_p95", "e2e_s_p50", "e2e_s_p95", "answer_tokens_per_s_p50",
                "mbu", "judge_score_mean", "quality_retention", "perplexity", "kl_mean", "slo_pass_rate",
                "meets_latency", "meets_quality", "meets_all"}
    assert expected <= set(summary.columns)
    rows = summary.set_index("cell")
    assert rows.loc[GOOD, "n_runs"] == 2 and rows.loc[GOOD, "kl_mean"] == 0
    # MBU is in (0, 1], or absent with the bandwidth figure flagged (a figure above 1 is never printed)
    mbu = rows.loc[GOOD, "mbu"]
    assert (0 < mbu <= 1) if not pd.isna(mbu) else isinstance(rows.loc[GOOD, "mbu_flag"], str)
    assert pd.isna(rows.loc[GOOD, "quality_retention"]) and pd.isna(rows.loc[GOOD, "meets_quality"])  # no baseline
    assert rows.loc[GOOD, "quality_note"] == "no baseline in this study" and rows.loc[GOOD, "truncation_rate"] >= 0
    assert rows.loc[BAD, "cell_state"] == "failed" and "no-such-model" in rows.loc[BAD, "cell_error"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("plotly.js v") == 1  # plotly.js embedded once, not fetched
    assert "Plotly.newPlot" in html and "<script src=" not in html
    assert "user_ttft_s_p95" in html and "smollm2-135m" in html and "Latency by configuration" in html
    assert "embedded engine" in html and "extra buffers" in html  # which engine configuration ran the study
    assert "<title>" in html and "llmfirst study report</title>" in html  # not "Notebook"


def test_rerun_skips_finished_cells(tiny):
    result, out = tiny
    good = out / "cells" / GOOD
    before = [r.run_id for r in _runs(good / study.RECORDS)]
    marker = (good / study.DONE).read_text()
    again = study.run_study(TINY, output_dir=out, progress=False, report=False, echo=lambda _: None)
    assert {c.id: c.state for c in again.cells} == {GOOD: "skipped", BAD: "failed"}  # a failed cell is retried
    assert [r.run_id for r in _runs(good / study.RECORDS)] == before
    assert (good / study.DONE).read_text() == marker


def test_resume_accepts_a_study_from_before_a_new_parameter_but_not_a_changed_one(tiny):
    _, out = tiny
    saved = json.loads((out / study.STUDY_FILE).read_text())
    older = json.loads(json.dumps(saved))
    del older["spec"]["parameters"]["openai_base_url"]  # as written by a kit without that parameter
    (out / study.STUDY_FILE).write_text(json.dumps(older))
    again = study.run_study(TINY, output_dir=out, progress=False, report=False, echo=lambda _: None)
    assert {c.id: c.state for c in again.cells}[GOOD] == "skipped"
    with pytest.raises(study.StudyError, match=r"different parameters \(max_tokens\)"):
        study.run_study({**TINY, "max_tokens": 17}, output_dir=out, progress=False, report=False,
                        echo=lambda _: None)
    (out / study.STUDY_FILE).write_text(json.dumps(saved))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_resume_after_the_runner_is_killed(tmp_path, monkeypatch):
    """Kill -9 the runner while the second of three cells has written part of its records and rerun at
    once: the rerun skips the finished cell, waits for the orphaned kernel to go, redoes the partial cell
    from scratch and runs the last one: nothing duplicated or lost."""
    import yaml

    monkeypatch.setenv("LLMFIRST_CACHE", str(tmp_path / "cache"))  # variants are built in a fresh cache
    queries = ["en-s01", "en-s02", "en-s03"]
    spec = {"name": "resume", "models": ["smollm2-135m"], "quantizations": ["shipped", "Q8_0", "Q4_0"],
            "presets": ["direct"], "queries_file": QUERIES, "query_ids": queries, "repeats": 1,
            "warmup_runs": 0, "max_tokens": 16, "judge_model": "", "n_threads": THREADS, "perplexity_text": "",
            "baseline_model": ""}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    cells = [out / "cells" / f"smollm2-135m@{q}--direct" for q in ("shipped", "Q8_0", "Q4_0")]
    partial = cells[1] / study.RECORDS
    with open(tmp_path / "runner.log", "w") as log:
        runner = subprocess.Popen([sys.executable, "-m", "llmfirst_kit.cli", "study", "run", str(path), "--out",
                                   str(out), "--no-report", "--no-progress"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (partial.exists() and partial.read_text().count("\n") >= 1):
            assert runner.poll() is None, (tmp_path / "runner.log").read_text()
            assert time.monotonic() < deadline, "the second cell wrote no record"
            time.sleep(0.02)
        kernels = _children(runner.pid)
        runner.send_signal(signal.SIGKILL)  # mid-cell, no clean-up at all
        runner.wait()
    assert (cells[0] / study.DONE).exists() and not (cells[1] / study.DONE).exists()
    assert kernels
    written = [r.run_id for r in _runs(partial)]  # the orphaned kernel may still add one before it exits
    done_before = (cells[0] / study.DONE).read_text()

    result = study.run_study(path, output_dir=out, progress=False, report=False, echo=lambda _: None)
    # the orphaned kernel noticed its parent was gone (ipykernel's parent poller) and exited by itself
    assert not any(_alive(k) for k in kernels)
    assert [c.state for c in result.cells] == ["skipped", "done", "done"]
    assert (cells[0] / study.DONE).read_text() == done_before  # the finished cell was not redone
    run_ids = []
    for cell in cells:
        runs = _runs(cell / study.RECORDS)
        assert [r.labels["query_id"] for r in runs] == queries  # nothing duplicated, nothing lost
        run_ids += [r.run_id for r in runs]
        assert json.loads((cell / study.DONE).read_text())["runs"] == len(queries)
    assert len(set(run_ids)) == 3 * len(queries) and written and not set(written) & set(run_ids)  # redone
    assert [r.labels["quantization"] for r in _runs(cells[1] / study.RECORDS)] == ["Q8_0"] * len(queries)


def _execute(tmp_path: Path, **parameters) -> pm.PapermillExecutionError:
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(str(study.STUDY_NOTEBOOK), str(tmp_path / "bad.ipynb"), kernel_name=study.KERNEL_NAME,
                            cwd=str(study.STUDY_NOTEBOOK.parent), progress_bar=False,
                            parameters={"output_dir": str(tmp_path / "cell"), **parameters})
    return info.value


def test_invalid_parameters_fail_before_any_model_call(tmp_path):
    err = _execute(tmp_path, modle=["smollm2-135m"], repeats="3")
    assert err.ename == "InvalidInput"
    assert "unknown parameter(s): modle" in err.evalue and "repeats must be int, got str '3'" in err.evalue
    assert "accepted:" in err.evalue and "models (list of str)" in err.evalue and "repeats (int)" in err.evalue
    err = _execute(tmp_path, presets=["fast"], models=["nope"], quantizations=["shipped", "Q9"])
    assert "unknown preset 'fast'; known: bare, direct, staged, staged:analysis-first, cascade" in err.evalue
    assert "model 'nope' not found; known:" in err.evalue and "quantization 'Q9' is unknown" in err.evalue
    assert not (tmp_path / "cell" / study.RECORDS).exists()
    import nbformat

    nb = nbformat.read(str(tmp_path / "bad.ipynb"), as_version=4)
    failing = next(i for i, c in enumerate(nb.cells) if any(o.output_type == "error" for o in c.get("outputs", [])))
    assert "notebook_parameters" in nb.cells[failing].source
    assert "run_cell" not in "".join(c.source for c in nb.cells[: failing + 1])


def test_study_file_errors_list_what_is_accepted(tmp_path):
    with pytest.raises(InvalidInput) as info:
        study.load_study({"models": ["smollm2-135m"], "presets": ["direct"], "repeat": 3, "max_tokens": "16"})
    msg = str(info.value)
    assert "unknown parameter(s): repeat" in msg and "max_tokens must be int" in msg
    assert "repeats (int)" in msg and "quality_target (float)" in msg
    with pytest.raises(InvalidInput, match="models is required"):
        study.load_study({"presets": ["direct"]})
    with pytest.raises(InvalidInput, match="set by the runner"):
        study.load_study({"models": ["m"], "presets": ["direct"], "cell": "x"})


def test_notebook_parameters_match_the_schema():
    defaults = study.notebook_defaults()
    assert list(defaults) == list(study.CellParams.model_fields)  # the model is the schema, in the cell's order
    assert params.check_names_and_types(defaults) == []  # every default has its field's type
    assert all(f.description for f in study.CellParams.model_fields.values())  # the help "accepted:" lists
    assert all(f.description for f in study.StudyFile.model_fields.values())


def test_example_and_smoke_studies_expand():
    example = study.load_study(ROOT / "studies" / "example.yaml")
    cells = study.expand_grid(example)
    # 3 models x 2 quantizations, less the two Q3_K_S files the study excludes
    assert [c.id for c in cells] == ["qwen2.5-coder-1.5b@shipped--direct", "qwen2.5-coder-1.5b@Q3_K_S--direct",
                                     "qwen2.5-coder-0.5b@shipped--direct", "smollm2-135m@shipped--direct"]
    assert example.parameters["query_limit"] == 0 and example.output_dir == ROOT / "reports" / "example"
    assert sum(bool(c.parameters["perplexity_text"]) for c in cells) == 4  # once per model file
    # the baseline system is the grid's 1.5B shipped direct cell (same max tokens), judged by the 1.5B model
    assert study.baseline_cell(example, cells).id == "qwen2.5-coder-1.5b@shipped--direct"
    assert example.quality.quality_judge == "qwen2.5-coder-1.5b" and example.quality.gate_threshold == 0.9
    queries = study.load_queries(example.parameters["queries_file"], limit=example.parameters["query_limit"])
    assert len(queries) == 72 and sum(q.lang == "ko" for q in queries) == 36
    smoke = study.load_study(ROOT / "studies" / "smoke.yaml")
    assert len(study.expand_grid(smoke)) == 2


def test_exclude_leaves_out_grid_cells_and_names_a_pattern_that_matches_none():
    base = {"models": ["smollm2-135m", "qwen2.5-coder-0.5b"], "presets": ["direct", "staged"], "baseline_model": ""}
    ids = [c.id for c in study.expand_grid(study.load_study({**base, "exclude": ["qwen2.5-coder-0.5b@*--staged"]}))]
    assert ids == ["smollm2-135m@shipped--direct", "smollm2-135m@shipped--staged", "qwen2.5-coder-0.5b@shipped--direct"]
    with pytest.raises(InvalidInput, match=r"'smolm2\*' matches no grid cell; the cells are: smollm2-135m@"):
        study.expand_grid(study.load_study({**base, "exclude": ["smolm2*"]}))
    with pytest.raises(InvalidInput, match="leaves no grid cell"):
        study.expand_grid(study.load_study({**base, "exclude": ["*"]}))


def test_the_files_the_kit_reads_are_package_data():
    """The notebooks, queries and texts the kit reads at run time live in the package and are declared as
    package data, so a wheel (a Dask worker's install) carries them; the study files rely on that default."""
    import fnmatch
    import tomllib

    assets = Path(data.__file__).parent / "assets"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in (study.STUDY_NOTEBOOK, study.SUMMARY_NOTEBOOK, data.QUERIES, *data.TEXTS.values()):
        assert path.is_file() and path.parent.is_relative_to(assets), path
        name = path.relative_to(assets).as_posix()
        assert any(fnmatch.fnmatch(name, g) for g in globs["llmfirst_kit.assets"]), name
    spec = study.load_study({"models": ["smollm2-135m"], "presets": ["direct"]})
    assert Path(spec.notebook) == study.STUDY_NOTEBOOK
    assert Path(spec.parameters["queries_file"]) == data.QUERIES
    assert Path(spec.parameters["perplexity_text"]) == data.TEXTS["en"]


def test_median_ci_and_mbu():
    low, high, cov = metrics.median_ci([5, 1, 4, 2, 3, 9, 7, 8, 6, 10])
    assert (low, high) == (2, 9) and cov == pytest.approx(0.9785, abs=1e-3)
    assert metrics.median_ci([3.0]) == (3.0, 3.0, 0.0)
    assert metrics.median_ci([None, float("nan")]) == (None, None, None)
    assert metrics.mbu(1e9, 10, 20) == pytest.approx(0.5)
    assert metrics.mbu(None, 10, 20) is None
