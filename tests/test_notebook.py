"""The quickstart notebook runs top to bottom in the venv's kernel, on a fresh tiny cohort."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01-quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("CHRONORISK_WORK", str(work))
    monkeypatch.setenv("CHRONORISK_QUICKSTART_PATIENTS", "600")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}})
    client.execute()

    outputs = {i: cell.outputs for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    errors = [o for cell in outputs.values() for o in cell if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(
        o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {}).get("text/plain", ""))
        for cell in outputs.values() for o in cell
    )
    assert "work folder: " + str(work) in text  # it used the work folder it was given, not ./work
    assert "calibration" in text and "risk " in text and ("raises" in text or "lowers" in text)
    images = [o for cell in outputs.values() for o in cell if "image/png" in o.get("data", {})]
    assert images, "the SHAP bar chart is shown"
    assert (work / "features" / "complication_1y" / "spec.json").is_file()


@pytest.fixture(autouse=True)
def _no_outputs_left_in_repo():
    before = NOTEBOOK.read_bytes()
    yield
    assert NOTEBOOK.read_bytes() == before, "the test must not rewrite the notebook"
