"""The notebooks (notebooks/*.ipynb) run end to end on the CPU, shrunk by DSJAX_NOTEBOOK_SMOKE=1, and a
cell that raises fails the suite; in git they carry no outputs."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def test_the_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} >= {'quickstart', 'moe_routing', 'real_weights', 'r1_zero'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == 'code':
            assert cell.outputs == [] and cell.execution_count is None, f'{path.name}: strip the outputs'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    # One CPU device (not the 8 simulated ones of the other tests): the smoke runs compile faster.
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(DSJAX_NOTEBOOK_SMOKE='1', JAX_PLATFORMS='cpu')
    client = NotebookClient(nb, timeout=240, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}})
    client.execute(env=env)  # a cell that raises raises CellExecutionError, naming the cell and the error
