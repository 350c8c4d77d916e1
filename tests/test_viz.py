"""Tests for codetr.data.viz: pixel conversions, colours, and what the drawing helpers put on the axes."""
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from codetr.data.viz import PIXEL_MEAN, PIXEL_STD, class_color, denormalize, draw_boxes, show_detections, show_grid, to_hwc_uint8

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def normalise(pixels):
    return (pixels.float() - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 4)])
def test_denormalize_inverts_normalisation(shape):
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    assert torch.equal(denormalize(normalise(pixels)), pixels)


def test_denormalize_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"): denormalize(torch.zeros(1, 4, 4))


def test_to_hwc_uint8_forms():
    pixels = torch.randint(0, 256, (3, 6, 9), dtype=torch.uint8)
    ref = pixels.permute(1, 2, 0).numpy()
    forms = [pixels, pixels.float() / 255, ref, Image.fromarray(ref), ref.astype(np.float32) / 255]
    for form in forms: np.testing.assert_array_equal(to_hwc_uint8(form), ref)
    np.testing.assert_array_equal(to_hwc_uint8(normalise(pixels), normalized=True), ref)
    gray = to_hwc_uint8(pixels[0])
    assert gray.shape == (6, 9, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert to_hwc_uint8(np.zeros((6, 9, 4), np.uint8)).shape == (6, 9, 3)
    with pytest.raises(ValueError, match="expected an image"): to_hwc_uint8(np.zeros((2, 6, 9, 3)))


def test_class_colours_consistent_and_distinct():
    assert class_color(5) == class_color(25) and len({class_color(i) for i in range(20)}) == 20
    assert all(0 <= v <= 1 for v in class_color(7))


def test_draw_boxes_threshold_and_captions():
    fig, ax = plt.subplots()
    ax.imshow(np.zeros((50, 50, 3), np.uint8))
    boxes = torch.tensor([[1., 1., 10., 10.], [5., 5., 30., 40.], [0., 0., 50., 50.]])
    patches = draw_boxes(ax, boxes, torch.tensor([0, 2, 1]), torch.tensor([0.9, 0.2, 0.5]), class_names=["a", "b", "c"],
                         score_thr=0.4)
    assert len(patches) == 2 and len(ax.patches) == 2
    assert [t.get_text() for t in ax.texts] == ["a 0.90", "b 0.50"]
    assert patches[0].get_edgecolor()[:3] == pytest.approx(class_color(0))
    assert (patches[1].get_x(), patches[1].get_y(), patches[1].get_width(), patches[1].get_height()) == (0, 0, 50, 50)
    assert draw_boxes(ax, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) == []
    draw_boxes(ax, [[0, 0, 5, 5]], [9])
    assert ax.texts[-1].get_text() == "9"  # label shown when there are no class names
    with pytest.raises(ValueError, match="2 boxes, 1 labels"): draw_boxes(ax, boxes[:2], [0])


def test_show_detections_and_grid():
    img = torch.rand(3, 40, 60)
    gt = {"boxes": torch.tensor([[1., 1., 20., 20.]]), "labels": torch.tensor([1])}
    pred = {"boxes": torch.tensor([[2., 2., 21., 21.], [30., 5., 50., 30.]]), "labels": torch.tensor([1, 0]),
            "scores": torch.tensor([0.8, 0.05])}
    ax = show_detections(img, gt, pred, class_names=["x", "y"], score_thr=0.1, title="t")
    assert [p.get_linestyle() for p in ax.patches] == ["-", "--"] and ax.get_title() == "t"
    assert ax.images[0].get_array().shape == (40, 60, 3)
    fig = show_grid([img] * 5, [gt] * 5, [pred] * 5, ncols=3, score_thr=0.0)
    assert len(fig.axes) == 6 and [len(a.patches) for a in fig.axes] == [3] * 5 + [0]
    assert not fig.axes[5].axison
    with pytest.raises(ValueError, match="5 images but 2 targets"): show_grid([img] * 5, [gt] * 2)
