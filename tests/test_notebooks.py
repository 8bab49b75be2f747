"""The notebooks in ``notebooks/`` run top to bottom in a fresh kernel.

They run at the small sizes they read from ``JAXQUANT_NOTEBOOK_SMALL=1``; their own
``assert`` cells check what they claim (e.g. that AQ's plan meets its bits budget), and
this test checks that the cells ran and printed the results they are there to show.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

#: What each notebook must print, beyond running without an error.
EXPECTED_OUTPUT = {
    "quickstart": ["uniform W8A8 in", "AQ W4A8 in", "per quantized weight", "FID to float", "g9: objective"],
}


def test_every_notebook_is_checked() -> None:
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    assert {p.stem for p in NOTEBOOKS} == set(EXPECTED_OUTPUT)


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this process's environment.
    monkeypatch.setenv("JAXQUANT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name}: commit notebooks without outputs"
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _stream_text(nb)
    for expected in EXPECTED_OUTPUT[path.stem]:
        assert expected in text, f"{path.name} did not print {expected!r}"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
