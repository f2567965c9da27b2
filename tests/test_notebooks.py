"""Every notebook in notebooks/ runs top to bottom on CPU (small settings), and is committed without outputs."""

import pathlib
import re

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_and_their_outputs_are_stripped():
  import nbformat

  assert {p.stem for p in NOTEBOOKS} >= {"custom_loss", "pipeline", "bring_your_own_model"}
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: strip outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, shared_data):
  import nbclient
  import nbformat

  shared_data("stories260k/tok512.bin")
  shared_data("hh_rlhf/harmless-base-test.jsonl.gz")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # without terminal colours
    pytest.fail(f"{path.name}: {message[-3000:]}")
