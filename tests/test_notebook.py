"""The example notebook executes end to end against the local default (nbclient, a real kernel)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.spark
REPO = Path(__file__).resolve().parent.parent


def test_example_notebook_runs(tmp_path, monkeypatch):
    from jobs.store.demo import seed_demo

    url = f"sqlite:///{tmp_path / 'nb.sqlite'}"
    seed_demo(url, n=100)  # a configured database is the operator's: the notebook seeds only the embedded demo
    monkeypatch.setenv("EMBEDDECK_DB_URL", url)
    monkeypatch.setenv("EMBEDDECK_NOTEBOOK_ROWS", "60")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    nb = nbformat.read(REPO / "docker" / "notebooks" / "embeddeck_example.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "succeeded 60 rows" in outputs
    assert "boot" in outputs.lower()
    assert os.environ["EMBEDDECK_DB_URL"].endswith("nb.sqlite")
