"""Tests for codetr.workbench.widgets without a browser: each explorer driven from Python (set a control's value, check what
was re-rendered) against the codetr.workbench.explore helpers it draws with."""
import html

import pytest
import torch

from codetr.workbench.explore import decoder_sampling, detect, sampling_title
from codetr.workbench.widgets import AssignmentExplorer, DatasetBrowser, PredictionExplorer, SamplingExplorer


@pytest.fixture(scope="module")
def env(explorer_env): return explorer_env


@pytest.fixture(scope="module")
def asg(explorer_asg): return explorer_asg


def test_dataset_browser(env):
    ds = env["ds"]
    b = DatasetBrowser(ds)
    pngs = {b.image.value}
    for i in range(len(ds)):
        b.index.value = i
        assert b.state["index"] == i and b.state["boxes"] == len(ds.coco.getAnnIds(imgIds=[ds.ids[i]]))
        assert len(b.figure.axes[0].patches) == b.state["boxes"]
        assert f"id {ds.ids[i]}" in b.state["title"] and b.caption.value.startswith("<b>image")
        pngs.add(b.image.value)
    assert len(pngs) == len(ds) and b.renders == len(ds)  # index 0 set again does not re-render
    b.classes.value = ()
    assert b.state["boxes"] == 0 and len(b.figure.axes[0].patches) == 0
    assert b.image.value[:4] == b"\x89PNG"
    assert "application/vnd.jupyter.widget-view+json" in b._repr_mimebundle_()


def test_prediction_explorer(env):
    model, ds = env["model"], env["ds"]
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        pe = PredictionExplorer(model, ds, score_thr=0.0)
        det = detect(model, ds, 0)
        counts = []
        for thr in (0.0, float(det["scores"][20]), float(det["scores"][3]), 1.0):
            pe.score.value = thr
            counts.append(pe.state["detections"])
            assert counts[-1] == int((det["scores"] >= thr).sum())
        assert counts == sorted(counts, reverse=True) and counts[-1] <= 1
        pe.score.value = 0.0
        pe.classes.value = (1, 2)
        assert set(pe.state["labels"]) <= {1, 2}
        assert pe.state["detections"] == int(torch.isin(det["labels"], torch.tensor([1, 2])).sum())
        pe.show_gt.value = False
        assert pe.state["gt_boxes"] == 0 and len(pe.figure.axes[0].patches) == pe.state["detections"]
        pe.index.value = 2
        assert pe.state["index"] == 2
    finally: h.remove()
    assert len(calls) == 3  # image 0 in the explorer, image 0 for `det`, image 2: sliders reuse the cache


def test_assignment_explorer(env, asg):
    ae = AssignmentExplorer(env["model"], env["ds"])
    assert ae.state["counts"] == asg[0].counts() and len(ae.figure.axes) == len(asg[0].panels)
    ae.panels.value = ("rpn",)
    assert len(ae.figure.axes) == 1 and list(ae.state["counts"]) == ["rpn"]
    ae.index.value = 1
    assert ae.state["counts"] == {"rpn": asg[1].counts()["rpn"]}
    n = ae.renders
    ae.seed.value = 3
    assert ae.renders == n + 1 and (1, 3) in ae._cache


def test_sampling_explorer(env):
    se = SamplingExplorer(env["model"], env["ds"])
    samp = se.sampling(0)
    torch.testing.assert_close(samp.scores, decoder_sampling(env["model"], env["ds"], 0).scores)  # the helper's view
    assert se.state["query"] == int(samp.scores.argmax()) and se.state["layer"] == samp.num_layers - 1
    t = env["cfg"].query_head.transformer
    assert se.state["points"] == t.num_heads * t.num_levels * t.num_points
    picks = [q for _, q in se.best.options]
    assert picks == samp.scores.argsort(descending=True)[:10].tolist()
    assert se.best.value == picks[0] == se.query.value  # the dropdown names the query shown, never blank
    se.best.value = picks[3]
    assert se.query.value == picks[3] and se.state["query"] == picks[3]
    se.layer.value = 0
    assert se.state["title"].startswith(f"layer 0, query {picks[3]}")
    se.index.value = 3
    best3 = int(se.sampling(3).scores.argmax())
    assert se.best.options[0][1] == best3 and se.best.value == best3 and se.query.value == best3
    assert se.state["index"] == 3


# ---------------------------------------------------------------- pictures at their own size, captions said once

def png_size(png: bytes) -> tuple[int, int]:
    "(width, height) from the PNG's IHDR chunk: bytes 16-20 and 20-24, big-endian."
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", "not a PNG"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def assert_natural_size(explorer):
    "The image widget is as wide as its PNG, may shrink in a narrow window, and keeps the aspect ratio."
    layout, (w, _) = explorer.image.layout, png_size(explorer.image.value)
    assert layout.width not in (None, "", "100%", "auto"), f"{type(explorer).__name__}: width {layout.width!r}"
    assert layout.width == f"{w}px", f"{type(explorer).__name__}: shown {layout.width} wide, the PNG is {w} px"
    assert (layout.max_width, layout.height) == ("100%", "auto")


def test_explorers_show_their_png_at_natural_size(env):
    model, ds = env["model"], env["ds"]
    b = DatasetBrowser(ds)
    assert_natural_size(b)
    assert png_size(b.image.value)[0] == png_size(DatasetBrowser(ds, cell=2.0).image.value)[0] + 200  # 100 px an inch
    pe = PredictionExplorer(model, ds)
    assert_natural_size(pe)
    ae = AssignmentExplorer(model, ds)
    assert_natural_size(ae)
    wide = png_size(ae.image.value)[0]
    ae.panels.value = ("rpn",)  # one panel: a narrower picture, and the widget follows
    assert_natural_size(ae)
    assert png_size(ae.image.value)[0] < wide
    se = SamplingExplorer(model, ds)
    assert_natural_size(se)
    se.layer.value = 0
    assert_natural_size(se)


def test_sampling_caption_said_once(env):
    se = SamplingExplorer(env["model"], env["ds"])
    samp, names = se.sampling(0), env["ds"].class_names
    for layer, query in ((se.layer.value, se.query.value), (0, int(samp.scores.argsort()[0]))):
        se.layer.value, se.query.value = layer, query
        text = sampling_title(samp, layer, query, names)
        assert text == f"layer {layer}, query {query}: {names[int(samp.labels[query])]} {float(samp.scores[query]):.2f}"
        assert se.figure.get_suptitle() == "" and not [t for t in se.figure.texts if t.get_text()]
        assert se.caption.value == f"<b>{html.escape(text)}</b>" and se.state["title"] == text
