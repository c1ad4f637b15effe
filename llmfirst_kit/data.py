"""The files the kit reads at run time, shipped inside the package (``llmfirst_kit/assets/``, declared as
package data) and found through :mod:`importlib.resources`, so that a non-editable install -- a Dask worker
installed from a wheel too -- has them:

- :data:`STUDY_NOTEBOOK` (``study.ipynb``): one execution per study grid cell;
- :data:`SUMMARY_NOTEBOOK` (``study_summary.ipynb``): the study report;
- :data:`QUERIES` (``queries/queries.jsonl``): the 72 study queries, English and Korean twins with key facts;
- :data:`TEXTS` (``text/*.txt``): the texts for perplexity / KL of quantized variants.

``assets/README.md`` describes the queries and the texts (their fields, provenance and license).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .errors import KitError

PACKAGE = "llmfirst_kit.assets"


def asset(name: str) -> Path:
    """The path of the packaged file ``name`` (``/``-separated, relative to ``llmfirst_kit/assets``).

    A path on disk, because papermill and the kit's readers open files by path: pip installs a wheel
    unpacked, so the package's files are files. (A zipped install would need them extracted first.)"""
    resource = files(PACKAGE).joinpath(name)
    if not isinstance(resource, Path):
        raise KitError(f"llmfirst_kit is installed as an archive ({resource!r}); install it unpacked "
                       f"(pip install llmfirst_kit) so that its packaged files can be opened by path")
    return resource


STUDY_NOTEBOOK = asset("study.ipynb")
SUMMARY_NOTEBOOK = asset("study_summary.ipynb")
QUERIES = asset("queries/queries.jsonl")
CALIBRATION_QUERIES = asset("queries/calibration.jsonl")  # a choice's prior (pipeline.calibration)
TEXTS = {"en": asset("text/harbour_en.txt"), "ko": asset("text/library_ko.txt")}

__all__ = ["CALIBRATION_QUERIES", "QUERIES", "STUDY_NOTEBOOK", "SUMMARY_NOTEBOOK", "TEXTS", "asset"]
