"""The tutorial notebooks (docs/notebooks/) are what build.py writes, and they all execute."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "docs" / "notebooks"
SRC = Path(__file__).resolve().parents[1] / "src"

if not (NOTEBOOKS / "build.py").is_file():  # an installed package without its docs
    pytest.skip("docs/notebooks is not here", allow_module_level=True)


def _builder():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _builder()


def test_committed_notebooks_are_what_build_writes(tmp_path):
    written = BUILD.build(tmp_path)
    assert {p.name for p in written} == {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    for path in written:
        assert path.read_bytes() == (NOTEBOOKS / path.name).read_bytes(), (
            f"{path.name} differs from docs/notebooks/build.py: run python docs/notebooks/build.py"
        )


@pytest.mark.parametrize("name", sorted(BUILD.NOTEBOOKS))
def test_notebook_executes(name, tmp_path, monkeypatch):
    if name == "05-audio":
        pytest.importorskip("torchcrepe")
    # the kernel imports the featurelens under test, single-threaded (2 cores, 2 workers)
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert shown, "the notebook displayed nothing"
