"""A pytest plugin for nbval: write every notebook whose cells all passed, with the outputs they
produced, to $NBVAL_OUTPUTS_DIR.

nbval checks that each cell runs, but keeps the outputs only in memory. `make test` hands the
executed notebooks to the book build's Jupyter cache (tools/cache_executed.py), so that the
strict book build renders them instead of running every notebook a second time. Load it with
`python -m pytest -p tools.nbval_outputs --nbval-lax notebooks/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    notebook = getattr(item, "parent", None)
    if report.when != "call" or not hasattr(item, "test_outputs"):
        return
    if report.passed and item.test_outputs is not None:
        item.cell.outputs = [nbformat.from_dict(dict(out)) for out in item.test_outputs]
        notebook.ran_cells = getattr(notebook, "ran_cells", 0) + 1
        item.cell.execution_count = notebook.ran_cells
        for out in item.cell.outputs:
            if out.output_type == "execute_result":
                out.execution_count = notebook.ran_cells
    else:
        notebook.failed = True


def pytest_sessionfinish(session):
    target = os.environ.get("NBVAL_OUTPUTS_DIR")
    if not target:
        return
    notebooks = {item.parent for item in session.items if hasattr(item, "test_outputs")}
    for notebook in notebooks:
        cells = [c for c in notebook.nb.cells if c.cell_type == "code"]
        if getattr(notebook, "failed", False) or getattr(notebook, "ran_cells", 0) != len(cells):
            continue  # not every cell ran and passed: the book build runs this one itself
        Path(target).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook.nb, Path(target) / Path(str(notebook.fspath)).name)
