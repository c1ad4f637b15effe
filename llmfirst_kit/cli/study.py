"""``llmfirst study run|report``: papermill study grids (:func:`llmfirst_kit.study.run_study`,
:func:`llmfirst_kit.study.build_report`)."""

from __future__ import annotations

import json
import sys

import click

from .command import EXIT_FAILED, EXIT_OK, Group


@click.group("study", cls=Group)
def command() -> None:
    """papermill study grids: run (resumable) and report"""


@command.command("run")
@click.argument("study_file")
@click.option("--out", default=None, help="study directory (default: output_dir in the YAML)")
@click.option("--no-report", is_flag=True, help="skip summary.csv / report.html at the end")
@click.option("--no-progress", is_flag=True)
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local",
              help="local: cell after cell here; dask: on the workers of a Dask scheduler (--scheduler)")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="the Dask scheduler for --executor dask, e.g. tcp://HOST:8786 (started with `dask scheduler`)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def run(study_file: str, out: str | None, no_report: bool, no_progress: bool, executor: str, scheduler: str | None,
        as_json: bool) -> int:
    """run or resume a study (one notebook execution per grid cell)

    STUDY_FILE is the study YAML, e.g. studies/example.yaml.
    """
    from .. import study

    result = study.run_study(study_file, output_dir=out, progress=not no_progress, report=not no_report,
                             executor=executor, scheduler=scheduler)
    print(result.describe(), file=sys.stderr)
    if as_json:
        print(json.dumps({"output_dir": str(result.output_dir), "wall_s": result.wall_s, "report": result.report,
                          "cells": [vars(c) for c in result.cells]}, ensure_ascii=False))
    return EXIT_OK if result.ok else EXIT_FAILED


@command.command("report")
@click.argument("study_dir")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def report(study_dir: str, as_json: bool) -> int:
    """aggregate a study directory into summary.csv and report.html"""
    from .. import study

    paths = study.build_report(study_dir)
    print(json.dumps(paths) if as_json else "\n".join(f"{k}: {v}" for k, v in paths.items()))
    return EXIT_OK
