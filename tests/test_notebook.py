"""The example notebook runs top to bottom (tiny settings)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_explore_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("E2KD_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("E2KD_NOTEBOOK_OUT", str(tmp_path / "demo"))
    nb = nbformat.read(ROOT / "examples" / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    show_cell = next(c for c in nb.cells if c.cell_type == "code" and "e2kd.show(" in c.source)
    assert any("image/png" in o.get("data", {}) for o in show_cell.outputs)  # the figure renders inline
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # and the sweep plot
    assert (tmp_path / "demo" / "mini_sweep" / "sweep.csv").is_file()
    assert os.path.getsize(tmp_path / "demo" / "mini_sweep" / "sweep.png") > 5_000
