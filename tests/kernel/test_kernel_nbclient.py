"""nbclient's interrupt_on_timeout on a partial assignment: the interrupted cell
is rolled back, so the next cell sees the value from before it."""

from __future__ import annotations

import pytest
from kernel_helpers import MESSAGE, SIGNAL

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.parametrize("kernel_name", [MESSAGE, SIGNAL], ids=["message", "signal"])
def test_partial_assignment_is_rolled_back(kernel_name: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("x = 0\nwhile True: pass"),
        nbformat.v4.new_code_cell("print(x)"),
    ]
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel_name, timeout=2, interrupt_on_timeout=True, allow_errors=True
    )
    client.execute()
    error = nb.cells[1].outputs[-1]
    assert error.output_type == "error" and error.ename == "Interrupted", error
    assert "x (changed)" in error.evalue
    assert nb.cells[2].outputs[0].text == "1\n"
