"""docs/tutorial.ipynb runs from top to bottom through the Python API and draws its map."""

from pathlib import Path

import pytest

TUTORIAL = Path(__file__).parent.parent / "docs" / "tutorial.ipynb"


@pytest.mark.slow
def test_tutorial_notebook_runs_and_draws_its_map(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(TUTORIAL, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # kept without outputs
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {k: c.outputs for k, c in enumerate(nb.cells) if c.cell_type == "code"}
    scores = next(o for o in outputs.values() for x in o if "'ridge'" in str(x.get("data", {}).get("text/plain", "")))
    ridge, head = (float(v) for v in eval(scores[0]["data"]["text/plain"]).values())
    assert head > ridge > 0  # the head clears the baseline even here
    last = outputs[max(outputs)]
    assert any("image/png" in x.get("data", {}) for x in last)  # the surface map, inline
    assert (tmp_path / "tutorial" / "pred" / "subj02" / "lh_pred_test.npy").is_file()
