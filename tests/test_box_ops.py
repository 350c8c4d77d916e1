"""codetr.ops.box_ops against torchvision.ops, hand-computed cases and properties."""
import math

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings, strategies as st

from codetr.ops.box_ops import (box_area, box_convert, box_cxcywh_to_xyxy, box_iof, box_iou, box_iou_aligned,
                            box_xywh_to_xyxy, box_xyxy_to_cxcywh, box_xyxy_to_xywh, clip_boxes,
                            generalized_box_iou, generalized_box_iou_aligned, inverse_sigmoid, scale_boxes)


def random_boxes(n, seed, scale=100.0, min_wh=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * scale
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * scale / 2 + min_wh
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("fmt", ["cxcywh", "xywh"])
@pytest.mark.parametrize("seed", range(3))
def test_convert_matches_torchvision(fmt, seed):
    b = random_boxes(50, seed)
    torch.testing.assert_close(box_convert(b, "xyxy", fmt), tvo.box_convert(b, "xyxy", fmt))
    back = tvo.box_convert(b, "xyxy", fmt)
    torch.testing.assert_close(box_convert(back, fmt, "xyxy"), b)


def test_convert_keeps_leading_dims_and_grad():
    b = box_xyxy_to_cxcywh(random_boxes(24, 0)).view(2, 3, 4, 4).requires_grad_()
    out = box_cxcywh_to_xyxy(b)
    assert out.shape == (2, 3, 4, 4)
    out.sum().backward()
    assert torch.isfinite(b.grad).all()


def test_convert_rejects_bad_input():
    with pytest.raises(ValueError, match="in_fmt"): box_convert(torch.zeros(1, 4), "yxhw", "xyxy")
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"): box_convert(torch.zeros(3, 5), "xyxy", "xywh")


def test_hand_computed_coco_box():
    # COCO stores [x, y, w, h]; a 10x20 box at (5, 6) spans to (15, 26) with centre (10, 16).
    xywh = torch.tensor([[5., 6., 10., 20.]])
    torch.testing.assert_close(box_xywh_to_xyxy(xywh), torch.tensor([[5., 6., 15., 26.]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_xywh_to_xyxy(xywh)), torch.tensor([[10., 16., 10., 20.]]))
    torch.testing.assert_close(box_xyxy_to_xywh(box_xywh_to_xyxy(xywh)), xywh)


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_iou_giou_match_torchvision(seed):
    b1, b2 = random_boxes(37, seed), random_boxes(23, seed + 100)
    torch.testing.assert_close(box_iou(b1, b2), tvo.box_iou(b1, b2))
    torch.testing.assert_close(generalized_box_iou(b1, b2), tvo.generalized_box_iou(b1, b2))
    torch.testing.assert_close(box_area(b1), tvo.box_area(b1))


@pytest.mark.parametrize("seed", range(5))
def test_aligned_are_diagonals(seed):
    b1, b2 = random_boxes(30, seed), random_boxes(30, seed + 7)
    torch.testing.assert_close(box_iou_aligned(b1, b2), tvo.box_iou(b1, b2).diagonal())
    torch.testing.assert_close(generalized_box_iou_aligned(b1, b2), tvo.generalized_box_iou(b1, b2).diagonal())
    # torchvision's GIoU loss is 1 - aligned GIoU
    torch.testing.assert_close(1 - generalized_box_iou_aligned(b1, b2),
                               tvo.generalized_box_iou_loss(b1, b2, reduction="none"))


def test_hand_computed_iou_giou_iof():
    a = torch.tensor([[0., 0., 4., 2.]])          # area 8
    b = torch.tensor([[2., 1., 6., 5.]])          # area 16, overlap [2,4]x[1,2] = 2
    # union 8 + 16 - 2 = 22, enclosing [0,6]x[0,5] = 30
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[2 / 22]]))
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[2 / 22 - 8 / 30]]))
    torch.testing.assert_close(box_iof(a, b), torch.tensor([[2 / 8]]))
    torch.testing.assert_close(box_iof(b, a), torch.tensor([[2 / 16]]))


def test_touching_and_disjoint_boxes():
    a = torch.tensor([[0., 0., 1., 1.]])
    touching_edge = torch.tensor([[1., 0., 2., 1.]])
    touching_corner = torch.tensor([[1., 1., 2., 2.]])
    far = torch.tensor([[3., 0., 4., 1.]])
    assert box_iou(a, touching_edge).item() == 0 and box_iou(a, touching_corner).item() == 0
    assert generalized_box_iou(a, touching_edge).item() == pytest.approx(0.0)
    # corner-touching: union 2, enclosing 4 -> GIoU = -(4 - 2) / 4
    assert generalized_box_iou(a, touching_corner).item() == pytest.approx(-0.5)
    # disjoint: union 2, enclosing 4 -> -0.5; GIoU tends to -1 as boxes separate
    assert generalized_box_iou(a, far).item() == pytest.approx(-0.5)
    very_far = torch.tensor([[1000., 1000., 1001., 1001.]])
    assert generalized_box_iou(a, very_far).item() == pytest.approx(-1.0, abs=1e-5)


def test_degenerate_boxes_give_finite_values():
    point = torch.tensor([[4., 4., 4., 4.]])
    line = torch.tensor([[0., 2., 10., 2.]])
    box = torch.tensor([[0., 0., 10., 10.]])
    for x in (point, line):
        assert box_area(x).item() == 0
        for y in (point, line, box):
            for f in (box_iou, generalized_box_iou, box_iof):
                v = f(x, y)
                assert torch.isfinite(v).all(), (f.__name__, x, y)
            assert box_iou(x, y).item() == 0
    # a point inside a box: IoF of the point is 0 / eps = 0 (no foreground area), IoU 0, GIoU 0 - (100 - 100)/100 = 0
    assert generalized_box_iou(point, box).item() == pytest.approx(0.0)
    # gradients through degenerate pairs are finite
    p = point.clone().requires_grad_()
    generalized_box_iou_aligned(p, point).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_empty_inputs():
    assert box_iou(torch.zeros(0, 4), random_boxes(3, 0)).shape == (0, 3)
    assert generalized_box_iou(random_boxes(2, 0), torch.zeros(0, 4)).shape == (2, 0)
    assert box_iou_aligned(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="boxes2_xyxy"): box_iou(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same count"): box_iou_aligned(torch.zeros(2, 4), torch.zeros(3, 4))


def test_clip_and_scale():
    b = torch.tensor([[-3., -4., 50., 70.], [10., 10., 20., 20.]])
    torch.testing.assert_close(clip_boxes(b, (60, 40)), tvo.clip_boxes_to_image(b, (60, 40)))
    torch.testing.assert_close(scale_boxes(b, (2.0, 0.5)), b * torch.tensor([2., .5, 2., .5]))
    # scaling a normalised cxcywh box to pixels equals converting after scaling
    norm = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(scale_boxes(norm, (640, 480))),
                               scale_boxes(box_cxcywh_to_xyxy(norm), (640, 480)))


def test_inverse_sigmoid():
    x = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x)
    torch.testing.assert_close(inverse_sigmoid(x), torch.logit(x))
    lo, hi = inverse_sigmoid(torch.tensor([-0.5, 1.5]), eps=1e-3)
    # x clamps to [0, 1], then log(max(x, eps) / max(1 - x, eps)): 0 -> log(eps / 1)
    assert lo.item() == pytest.approx(math.log(1e-3), rel=1e-6)
    assert hi.item() == pytest.approx(-lo.item(), rel=1e-4)


box = st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(0, 30), st.floats(0, 30)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@settings(max_examples=200, deadline=None)
@given(st.lists(box, min_size=1, max_size=6), st.lists(box, min_size=1, max_size=6))
def test_iou_properties(l1, l2):
    b1, b2 = torch.tensor(l1, dtype=torch.float64), torch.tensor(l2, dtype=torch.float64)
    iou, giou = box_iou(b1, b2), generalized_box_iou(b1, b2)
    assert ((iou >= 0) & (iou <= 1 + 1e-12)).all()
    assert ((giou >= -1 - 1e-12) & (giou <= iou + 1e-12)).all()
    torch.testing.assert_close(iou, box_iou(b2, b1).T)              # symmetric
    torch.testing.assert_close(giou, generalized_box_iou(b2, b1).T)
    valid1 = box_area(b1) > 1e-3
    valid2 = box_area(b2) > 1e-3
    if valid1.any() and valid2.any():                                # torchvision agrees wherever areas are positive
        torch.testing.assert_close(iou[valid1][:, valid2], tvo.box_iou(b1[valid1], b2[valid2]))
