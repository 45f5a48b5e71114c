"""notebooks/explore_merged_graph.ipynb runs top to bottom, headlessly, and shows its pictures."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore_merged_graph.ipynb"


@pytest.mark.slow
def test_notebook_executes_and_checks_numerics():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a cell that raises fails the run (CellExecutionError names the cell)
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    svgs = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    htmls = [o for o in outputs if "text/html" in o.get("data", {})]
    assert len(svgs) >= 8  # merged graph, a tenant, two passes, pass summary, 3 four-tenant
    assert any("graph-summary" in o["data"]["image/svg+xml"] for o in svgs)
    assert any('id="group-' in o["data"]["image/svg+xml"] for o in svgs)  # fusion groups
    assert htmls and "mtcompile bundle" in htmls[0]["data"]["text/html"]  # the Bundle itself
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.rstrip().endswith("numerics OK")
