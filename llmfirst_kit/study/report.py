"""The report (:func:`build_report`, ``llmfirst study report DIR``): :func:`~.summary.summary_table` into
``summary.csv``, then the summary notebook (``llmfirst_kit/assets/study_summary.ipynb``) executed and
converted to a self-contained ``report.html`` (inputs hidden, plotly.js embedded: it opens offline);
:func:`show` displays a figure in that notebook.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._fs import atomic_write
from ..data import SUMMARY_NOTEBOOK
from .notebooks import KERNEL_NAME, check_kernel
from .store import SUMMARY_CSV, load_results
from .comparisons import comparisons_frame
from .load import capacity_table
from .summary import summary_table

COMPARISONS_CSV = "comparisons.csv"
CAPACITY_CSV = "capacity.csv"

# nbconvert's lab template without its CDN scripts (require.js, MathJax): the report loads nothing from the
# network; plotly.js is embedded by `show`.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
"""


def build_report(study_dir: str | os.PathLike[str], *, notebook: str | os.PathLike[str] | None = None
                 ) -> dict[str, str]:
    """``summary.csv``, then the summary notebook executed into ``report.ipynb`` and converted to
    ``report.html`` (inputs hidden, plotly.js embedded: opens offline)."""
    import jinja2
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    d = Path(study_dir).resolve()
    results = load_results(d)
    check_kernel()
    table = summary_table(results)
    atomic_write(d / SUMMARY_CSV, table.to_csv(index=False))
    if table["load"].nunique() > 1:  # the study ran load levels: capacity at target per configuration
        atomic_write(d / CAPACITY_CSV, capacity_table(table, results.slo).to_csv(index=False))
    versus = comparisons_frame(results)
    if len(versus):  # the study's head-to-head comparisons and revisions
        atomic_write(d / COMPARISONS_CSV, versus.to_csv(index=False))
    executed = d / "report.ipynb"
    pm.execute_notebook(str(notebook or SUMMARY_NOTEBOOK), str(executed), parameters={"study_dir": str(d)},
                        kernel_name=KERNEL_NAME, cwd=str(d), progress_bar=False, log_output=False)
    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="offline.html.j2", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    node = nbformat.read(str(executed), as_version=4)
    node.metadata["title"] = f"{results.spec.get('name') or d.name} · llmfirst study report"  # the page's <title>
    body, _ = exporter.from_notebook_node(node)
    html = d / "report.html"
    atomic_write(html, body)
    return {"summary": str(d / SUMMARY_CSV), "report": str(html), "notebook": str(executed),
            **({"comparisons": str(d / COMPARISONS_CSV)} if len(versus) else {}),
            **({"capacity": str(d / CAPACITY_CSV)} if (d / CAPACITY_CSV).is_file() else {})}


_plotlyjs_shown = False


def show(fig: Any) -> None:
    """Display a plotly figure in a report notebook: the plotly mimetype for JupyterLab, and HTML for
    nbconvert with plotly.js embedded in the first figure (no CDN, no MathJax), so the HTML opens offline."""
    global _plotlyjs_shown
    from IPython.display import display

    html = fig.to_html(full_html=False, include_plotlyjs=not _plotlyjs_shown, include_mathjax=False)
    _plotlyjs_shown = True
    display({"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/html": html}, raw=True)

