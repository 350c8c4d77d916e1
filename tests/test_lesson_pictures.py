"""The lessons' teaching pictures reach JupyterLab as pictures: the notebooks run in a real Jupyter kernel (nbclient, as
JupyterLab runs them), each shows at least its pictures as PNG images, and no output is a figure printed as text."""
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
PICTURES = {"ops/10_box_ops.ipynb": 1, "transformer/41_deformable.ipynb": 2, "models/61_detector.ipynb": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PICTURES))
def test_lesson_pictures(name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = NBS / name
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    pictures, as_text = [], []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "image/png" in data: pictures.append(i)
            elif str(data.get("text/plain", "")).startswith("<Figure size"): as_text.append(i)
    assert not as_text, f"{name}: cells {as_text} show a figure as text, not as a picture"
    assert len(pictures) >= PICTURES[name], f"{name}: expected {PICTURES[name]} pictures, found them in cells {pictures}"
