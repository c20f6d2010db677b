"""The notebooks in colabs/ run top to bottom (nbclient, the test extra), with the small
settings they read from MIM_JAX_NOTEBOOK_SMALL=1, and are committed without outputs."""

import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_is_one_notebook_per_theme():
  names = {os.path.basename(p)[: -len(".ipynb")] for p in NOTEBOOKS}
  assert {"masking", "tokenizers", "pretrain_and_look", "export", "ccvit_demo"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  nbformat = pytest.importorskip("nbformat", reason="nbformat is a test extra")
  book = nbformat.read(path, as_version=4)
  for cell in book.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path}: a cell has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, torch_ref, monkeypatch):
  nbformat = pytest.importorskip("nbformat", reason="nbformat is a test extra")
  nbclient = pytest.importorskip("nbclient", reason="nbclient is a test extra")
  monkeypatch.setenv("MIM_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one device, as on a user's runtime
  book = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    book, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
