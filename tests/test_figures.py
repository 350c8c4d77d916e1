"""The explorers' figures are readable pictures: every figure the explorer notebooks show reaches JupyterLab as a picture
(the notebooks run in a real Jupyter kernel, as JupyterLab runs them, and no output may be a figure printed as text,
`<Figure size ...>`), and in the drawn figures (Agg) the titles are large enough and never run into each other or a panel."""
from dataclasses import replace
from pathlib import Path

import pytest

from codetr.workbench.explore import decoder_sampling, explorer_model, head_assignments, open_dataset, show_assignments, show_sampling

NBS = Path(__file__).resolve().parents[1] / "nbs"
MIN_TITLE_PX = 11  # on-screen height of a title's em box when the PNG is shown pixel for pixel


@pytest.mark.slow
@pytest.mark.parametrize("name", ["workbench/80_explore.ipynb", "workbench/81_widgets.ipynb"])
def test_explorer_figures_are_pictures(name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
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


# ---------------------------------------------------------------- title layout, measured on the Agg renderer

def _overlap(a, b) -> bool:
    "Two display boxes share more than a hairline of area."
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def check_titles(fig, expect_suptitle: bool = False):
    "Every title: readable size, inside the figure, clear of every panel's image area and of every other title."
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [ax.title for ax in fig.axes if ax.title.get_text()] + [t for t in fig.texts if t.get_text()]
    assert len(texts) == len(fig.axes) + expect_suptitle, "one title per panel (and the figure's own)"
    boxes = [t.get_window_extent(r) for t in texts]
    panels = [ax.get_window_extent(r) for ax in fig.axes]
    for t, box in zip(texts, boxes):
        name = t.get_text().splitlines()[0]
        assert t.get_fontsize() * fig.dpi / 72 >= MIN_TITLE_PX, f"{name!r}: {t.get_fontsize()} pt at {fig.dpi} dpi"
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, f"{name!r} is cut off"
        hit = [i for i, p in enumerate(panels) if _overlap(box, p)]
        assert not hit, f"{name!r} overlaps panels {hit}"
    pairs = [(a.get_text(), b.get_text()) for i, (a, ba) in enumerate(zip(texts, boxes))
             for b, bb in zip(texts[i + 1:], boxes[i + 1:]) if _overlap(ba, bb)]
    assert not pairs, f"titles overlap: {pairs}"


def test_overlap_helper():
    from matplotlib.transforms import Bbox
    a = Bbox.from_extents(0, 0, 10, 10)
    assert _overlap(a, Bbox.from_extents(5, 5, 20, 20)) and _overlap(a, Bbox.from_extents(2, 2, 3, 3))
    assert not _overlap(a, Bbox.from_extents(10, 0, 20, 10)) and not _overlap(a, Bbox.from_extents(0, 11, 10, 20))


@pytest.fixture(scope="module")
def dino(explorer_env):
    "A fresh `co_dino_tiny` (denoising panels, five decoder levels) on the explorer test images."
    model, cfg = explorer_model(preset="co_dino_tiny", seed=0)
    synth = explorer_env["synth"]
    return model, open_dataset(synth.val_images, synth.val_json, aug=cfg.aug.scaled(0.5))


@pytest.mark.parametrize("cell", [3.0, 1.5])
def test_assignment_titles(explorer_asg, explorer_env, dino, cell):
    names = explorer_env["ds"].class_names
    for asg in (explorer_asg[0], head_assignments(*dino, 0)):
        check_titles(show_assignments(asg, class_names=names, cell=cell))  # every panel, rows of three
        long = replace(asg.panels["detr"], note="a note long enough to need several lines in any panel " * 3)
        check_titles(show_assignments(replace(asg, panels=asg.panels | {"detr": long}), cell=cell))


@pytest.mark.parametrize("cell", [2.25, 1.5])
def test_sampling_titles(explorer_env, dino, cell):
    for model, ds in ((explorer_env["model"], explorer_env["ds"]), dino):
        samp = decoder_sampling(model, ds, 0)
        q = int(samp.scores.argmax())
        check_titles(show_sampling(samp, samp.num_layers - 1, q, ds.class_names, cell), expect_suptitle=True)
        check_titles(show_sampling(samp, 0, q, ds.class_names, cell, title=False))
