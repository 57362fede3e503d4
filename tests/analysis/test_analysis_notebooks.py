"""The three notebooks execute headless against the committed fixture without a cell error; stored stripped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["correlation_analysis", "selector_comparison", "training_results"]


def _kernel_prefix() -> str:
    """sys.prefix of the interpreter the 'python3' kernel starts."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.prefix)")])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    return nb.cells[0].outputs[0]["text"].strip()


@pytest.fixture(scope="module")
def venv_kernel() -> None:
    """Make sure kernel 'python3' runs this interpreter (install one into sys.prefix if it does not)."""
    if Path(_kernel_prefix()).resolve() != Path(sys.prefix).resolve():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True)
        got = _kernel_prefix()
        assert Path(got).resolve() == Path(sys.prefix).resolve(), f"kernel python3 runs {got}, not {sys.prefix}"


@pytest.mark.parametrize("name", NAMES)
def test_stored_stripped(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: outputs not stripped"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, venv_kernel, fixture_results, monkeypatch):
    monkeypatch.setenv("TAOPD_RESULTS", str(fixture_results))
    monkeypatch.setenv("TAOPD_N_BOOT", "100")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on any cell error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # figures rendered inline
    text = "".join(o.get("text", "") for o in outputs)
    text += "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "fixture" in text
