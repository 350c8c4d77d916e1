"""Every figure the explorer notebooks show reaches JupyterLab as a picture: the notebooks run in a real Jupyter kernel
(nbclient, as JupyterLab runs them) and no output may be a figure printed as text (`<Figure size ...>`)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NBS = Path(__file__).resolve().parents[1] / "nbs"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["workbench/80_explore.ipynb", "workbench/81_widgets.ipynb"])
def test_explorer_figures_are_pictures(name):
    path = NBS / name
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    as_text, pictures = [], 0
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data: pictures += 1
            elif str(data.get("text/plain", "")).startswith("<Figure size"): as_text.append(i)
    assert not as_text, f"{name}: cells {as_text} show a figure as text, not as a picture"
    if name.endswith("80_explore.ipynb"): assert pictures >= 4
