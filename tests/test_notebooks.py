"""Every notebook in notebooks/ runs top to bottom in FAST mode (LOWBIT_NOTEBOOK_FAST=1) without an error.

The notebooks execute in memory with nbclient, in a fresh kernel whose working directory is notebooks/;
the committed files (with the outputs of a real run) are never written.
"""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    import nbclient  # test dependencies (make test installs them): a missing one fails, never skips
    import nbformat
    monkeypatch.setenv("LOWBIT_NOTEBOOK_FAST", "1")     # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises nbclient.exceptions.CellExecutionError on the first cell that fails
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS
