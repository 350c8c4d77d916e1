"""Losses against torchvision.ops, torch.nn.functional, naive loops and hand-computed values; edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st

from codetr.ops.losses import (binary_cross_entropy, centerness_target, cross_entropy, giou_loss, l1_loss,
                           quality_focal_loss, sigmoid_focal_loss, weight_reduce_loss)

EPS32 = torch.finfo(torch.float32).eps


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_case(n, k, seed, scale=3.0, dtype=torch.float64):
    g = gen(seed)
    logits = (torch.randn(n, k, generator=g) * scale).to(dtype)
    labels = torch.randint(0, k + 1, (n,), generator=g)
    return logits, labels, g


def onehot(labels, k, dtype=torch.float64):
    return F.one_hot(labels, k + 1)[:, :k].to(dtype)


def random_boxes(n, g, dtype=torch.float64):
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 100
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=dtype) * 60 + 0.5], 1)


# ---------------------------------------------------------------- naive oracles
def sig(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t):
    "BCE with logits, written out stably."
    return max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))


def naive_focal(logits, labels, alpha, gamma):
    n, k = logits.shape
    out = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        for c in range(k):
            x, t = logits[i, c].item(), float(labels[i].item() == c)
            p = sig(x)
            pt = p if t else 1 - p
            out[i, c] = (alpha if t else 1 - alpha) * (1 - pt) ** gamma * bce(x, t)
    return out


def naive_qfl(logits, labels, scores, beta):
    n, k = logits.shape
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for c in range(k):
            x = logits[i, c].item()
            p = sig(x)
            if labels[i].item() == c:
                q = scores[i].item()
                out[i] += bce(x, q) * abs(q - p) ** beta
            else:
                out[i] += bce(x, 0.0) * p ** beta
    return out


# ---------------------------------------------------------------- weight_reduce_loss
def test_weight_reduce_loss_modes():
    loss = torch.tensor([1.0, 2.0, 3.0, 6.0])
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    assert weight_reduce_loss(loss, w, "none").tolist() == [1.0, 1.0, 0.0, 12.0]
    assert weight_reduce_loss(loss, w, "sum").item() == 14.0
    assert weight_reduce_loss(loss, w, "mean").item() == 3.5
    torch.testing.assert_close(weight_reduce_loss(loss, w, "mean", avg_factor=7), torch.tensor(14 / (7 + EPS32)))
    torch.testing.assert_close(weight_reduce_loss(loss, w, "mean", avg_factor=torch.tensor(7.0)), torch.tensor(2.0))
    assert weight_reduce_loss(loss, w, "none", avg_factor=7).tolist() == [1.0, 1.0, 0.0, 12.0]
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce_loss(loss, w, "sum", avg_factor=7)
    with pytest.raises(ValueError, match="reduction"):
        weight_reduce_loss(loss, reduction="batchmean")


def test_avg_factor_zero_is_finite():
    assert weight_reduce_loss(torch.zeros(3), avg_factor=0).item() == 0.0
    assert weight_reduce_loss(torch.zeros(0), avg_factor=0).item() == 0.0


# ---------------------------------------------------------------- sigmoid focal loss
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.5), (0.25, 5.0)])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 4), (200, 80)])
def test_focal_matches_torchvision(n, k, alpha, gamma, reduction):
    logits, labels, _ = rand_case(n, k, seed=n * 100 + k)
    ours = sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = torchvision.ops.sigmoid_focal_loss(logits, onehot(labels, k), alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_focal_matches_naive_loop_float32():
    logits, labels, _ = rand_case(23, 5, seed=7, dtype=torch.float32)
    ours = sigmoid_focal_loss(logits, labels, reduction="none")
    torch.testing.assert_close(ours.double(), naive_focal(logits, labels, 0.25, 2.0), rtol=1e-5, atol=1e-7)


def test_focal_hand_values():
    # logit 0: p = 0.5, BCE = log 2, (1 - p_t)^2 = 1/4
    out = sigmoid_focal_loss(torch.zeros(2, 3), torch.tensor([1, 3]), reduction="none")
    ln2 = math.log(2)
    torch.testing.assert_close(out, torch.tensor([[0.75 * 0.25 * ln2, 0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2],
                                                  [0.75 * 0.25 * ln2] * 3]))


@pytest.mark.parametrize("weight_shape", ["row", "entry"])
def test_focal_weights_and_avg_factor(weight_shape):
    logits, labels, g = rand_case(40, 6, seed=3)
    w = torch.rand(40, generator=g, dtype=torch.float64)
    w = w if weight_shape == "row" else w[:, None] * torch.rand(40, 6, generator=g, dtype=torch.float64)
    ref = torchvision.ops.sigmoid_focal_loss(logits, onehot(labels, 6), reduction="none")
    ref = ref * (w[:, None] if weight_shape == "row" else w)
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, w, reduction="none"), ref)
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, w), ref.mean())
    num_pos = (labels < 6).sum()
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, w, avg_factor=num_pos), ref.sum() / (num_pos + EPS32))


def test_focal_float_targets_equal_labels():
    logits, labels, _ = rand_case(30, 5, seed=4)
    torch.testing.assert_close(sigmoid_focal_loss(logits, onehot(labels, 5)), sigmoid_focal_loss(logits, labels))


def test_focal_background_and_out_of_range_labels():
    logits, _, _ = rand_case(10, 4, seed=5)
    zeros = torch.zeros(10, 4, dtype=torch.float64)
    for bg in (4, -1, 9):
        torch.testing.assert_close(sigmoid_focal_loss(logits, torch.full((10,), bg)), sigmoid_focal_loss(logits, zeros))


def test_focal_leading_dims_equal_flattened():
    g = gen(6)
    logits = torch.randn(2, 7, 5, generator=g)
    labels = torch.randint(0, 6, (2, 7), generator=g)
    w = torch.rand(2, 7, generator=g)
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, w, reduction="none").reshape(14, 5),
                               sigmoid_focal_loss(logits.reshape(14, 5), labels.reshape(14), w.reshape(14),
                                                  reduction="none"))


def test_focal_bad_input_names_argument():
    with pytest.raises(ValueError, match="labels"):
        sigmoid_focal_loss(torch.zeros(3, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        sigmoid_focal_loss(torch.zeros(3, 4), torch.zeros(3))  # float labels without the class dimension
    with pytest.raises(ValueError, match="weight"):
        sigmoid_focal_loss(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(4))


def test_focal_gradcheck():
    logits, labels, _ = rand_case(6, 3, seed=8, scale=1.5)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, labels, avg_factor=3.0), (logits,))


def test_focal_extreme_logits_finite():
    x = torch.tensor([[-100.0, 100.0, 0.0], [50.0, -50.0, 20.0]], requires_grad=True)
    loss = sigmoid_focal_loss(x, torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- quality focal loss
@pytest.mark.parametrize("beta", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("n,k", [(1, 1), (25, 4), (60, 80)])
def test_qfl_matches_naive_loop(n, k, beta):
    logits, labels, g = rand_case(n, k, seed=n + k)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    ours = quality_focal_loss(logits, labels, scores, beta=beta, reduction="none")
    torch.testing.assert_close(ours, naive_qfl(logits, labels, scores, beta), rtol=1e-9, atol=1e-12)


def test_qfl_hand_values():
    # positive column, logit 0, IoU 0.5: BCE(0, 0.5) * |0.5 - 0.5|^2 = 0; the other column: log 2 * 0.5^2
    out = quality_focal_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0.5]), reduction="none")
    torch.testing.assert_close(out, torch.tensor([0.25 * math.log(2)]))
    # positive with IoU 1 at logit log(3) (p = 0.75): BCE = -log 0.75, factor 0.25^2
    out = quality_focal_loss(torch.tensor([[math.log(3)]]), torch.tensor([0]), torch.tensor([1.0]), reduction="none")
    torch.testing.assert_close(out, torch.tensor([-math.log(0.75) * 0.0625]))


def test_qfl_with_unit_scores_is_focal_without_alpha():
    logits, labels, _ = rand_case(50, 6, seed=9)
    ref = torchvision.ops.sigmoid_focal_loss(logits, onehot(labels, 6), alpha=-1, gamma=2.0, reduction="none").sum(1)
    torch.testing.assert_close(quality_focal_loss(logits, labels, torch.ones(50, dtype=torch.float64),
                                                  reduction="none"), ref)


def test_qfl_weight_avg_factor_reductions():
    logits, labels, g = rand_case(40, 5, seed=10)
    scores, w = torch.rand(40, generator=g, dtype=torch.float64), torch.rand(40, generator=g, dtype=torch.float64)
    per_row = naive_qfl(logits, labels, scores, 2.0) * w
    torch.testing.assert_close(quality_focal_loss(logits, labels, scores, w, reduction="sum"), per_row.sum())
    torch.testing.assert_close(quality_focal_loss(logits, labels, scores, w), per_row.mean())
    torch.testing.assert_close(quality_focal_loss(logits, labels, scores, w, avg_factor=6.0), per_row.sum() / (6 + EPS32))


def test_qfl_scores_of_negatives_are_ignored():
    logits, labels, g = rand_case(30, 4, seed=11)
    s1, s2 = torch.rand(30, generator=g), torch.rand(30, generator=g)
    neg = labels == 4
    s2 = torch.where(neg, s2, s1)
    torch.testing.assert_close(quality_focal_loss(logits, labels, s1.double(), reduction="none"),
                               quality_focal_loss(logits, labels, s2.double(), reduction="none"))


def test_qfl_gradcheck_and_shapes():
    logits, labels, g = rand_case(5, 3, seed=12, scale=1.0)
    scores = torch.rand(5, generator=g, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: quality_focal_loss(x, labels, scores, avg_factor=2.0), (logits,))
    with pytest.raises(ValueError, match="scores"):
        quality_focal_loss(logits, labels, scores[:4])
    with pytest.raises(ValueError, match="weight"):
        quality_focal_loss(logits, labels, scores, torch.ones(5, 3))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 10_000))
def test_qfl_nonnegative_and_minimal_at_target(n, k, seed):
    logits, labels, g = rand_case(n, k, seed=seed)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    loss = quality_focal_loss(logits, labels, scores, reduction="none")
    assert (loss >= 0).all() and torch.isfinite(loss).all()
    # moving a positive logit to logit(score) never increases that entry's loss
    pos = labels < k
    if pos.any():
        tuned = logits.clone()
        idx = pos.nonzero()[:, 0]
        tuned[idx, labels[idx]] = torch.logit(scores[idx].clamp(1e-6, 1 - 1e-6))
        before = quality_focal_loss(logits, labels, scores, reduction="none")
        after = quality_focal_loss(tuned, labels, scores, reduction="none")
        assert (after <= before + 1e-12).all()


# ---------------------------------------------------------------- GIoU and L1
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("n", [1, 17, 300])
def test_giou_matches_torchvision(n, reduction):
    g = gen(n)
    a, b = random_boxes(n, g), random_boxes(n, g)
    # torchvision adds 1e-7 to the denominators, we clamp them at 1e-6: both negligible for these boxes
    torch.testing.assert_close(giou_loss(a, b, reduction=reduction),
                               torchvision.ops.generalized_box_iou_loss(a, b, reduction=reduction), rtol=1e-6, atol=1e-6)


def test_giou_hand_values():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 3, 3]])
    # overlap 1/7, enclosure 9; identical; disjoint with a gap (enclosure 3, union 2); nested (IoU 4/16)
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 0.0, 1 + 1 / 3, 1 - 0.25])
    torch.testing.assert_close(giou_loss(a, b, reduction="none"), expected)


def test_giou_weights_and_avg_factor():
    g = gen(13)
    a, b = random_boxes(20, g), random_boxes(20, g)
    w = torch.rand(20, generator=g, dtype=torch.float64)
    per = torchvision.ops.generalized_box_iou_loss(a, b, reduction="none")
    torch.testing.assert_close(giou_loss(a, b, w, avg_factor=w.sum()), (per * w).sum() / (w.sum() + EPS32),
                               rtol=1e-6, atol=1e-6)
    w4 = torch.rand(20, 4, generator=g, dtype=torch.float64)  # mmdet averages (N, 4) weights over the coordinates
    torch.testing.assert_close(giou_loss(a, b, w4, reduction="sum"), (per * w4.mean(1)).sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(giou_loss(a, b, torch.zeros(20, dtype=torch.float64)), torch.tensor(0.0, dtype=torch.float64))


def test_giou_zero_area_boxes_finite():
    pred = torch.tensor([[5.0, 5, 5, 5], [0, 0, 4, 4], [3, 3, 3, 8]], requires_grad=True)
    target = torch.tensor([[5.0, 5, 5, 5], [1, 1, 1, 1], [0, 0, 6, 6]])
    loss = giou_loss(pred, target, reduction="none")
    assert torch.isfinite(loss).all()
    # two identical points: IoU 0 and enclosure clamped, so GIoU 0 and loss 1 (as mmdet's bbox_overlaps)
    torch.testing.assert_close(loss[0], torch.tensor(1.0))
    # a point inside a box: no intersection, enclosure = the box, union = the box: GIoU 0
    torch.testing.assert_close(loss[1], torch.tensor(1.0))
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_giou_gradcheck_and_leading_dims():
    g = gen(14)
    a, b = random_boxes(6, g), random_boxes(6, g)
    a.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: giou_loss(x, b, avg_factor=3.0), (a,))
    torch.testing.assert_close(giou_loss(a.reshape(2, 3, 4), b.reshape(2, 3, 4), reduction="none"),
                               giou_loss(a, b, reduction="none").reshape(2, 3))
    with pytest.raises(ValueError, match="pred_xyxy"):
        giou_loss(a, b[:5])
    with pytest.raises(ValueError, match="weight"):
        giou_loss(a, b, torch.ones(5))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_l1_matches_torch(reduction):
    g = gen(15)
    a, b = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    torch.testing.assert_close(l1_loss(a, b, reduction=reduction), F.l1_loss(a, b, reduction=reduction))


def test_l1_weights_and_avg_factor():
    g = gen(16)
    a, b = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    w = (torch.rand(30, 1, generator=g) > 0.5).float().expand(30, 4)
    num = w[:, 0].sum()
    torch.testing.assert_close(l1_loss(a, b, w, avg_factor=num), ((a - b).abs() * w).sum() / (num + EPS32))
    torch.testing.assert_close(l1_loss(torch.tensor([[1.0, 2]]), torch.tensor([[4.0, 0]]), reduction="none"),
                               torch.tensor([[3.0, 2.0]]))
    with pytest.raises(ValueError, match="target"):
        l1_loss(a, b[:, :2])


# ---------------------------------------------------------------- cross-entropy and BCE
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_matches_torch(reduction):
    g = gen(17)
    logits, labels = torch.randn(64, 81, generator=g), torch.randint(0, 81, (64,), generator=g)
    torch.testing.assert_close(cross_entropy(logits, labels, reduction=reduction),
                               F.cross_entropy(logits, labels, reduction=reduction))


def test_cross_entropy_weight_avg_factor_ignore():
    g = gen(18)
    logits, labels = torch.randn(40, 5, generator=g), torch.randint(0, 5, (40,), generator=g)
    w = torch.rand(40, generator=g)
    per = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(cross_entropy(logits, labels, w, avg_factor=12.0), (per * w).sum() / (12 + EPS32))
    torch.testing.assert_close(cross_entropy(logits, labels, w), (per * w).mean())
    ignored = labels.clone()
    ignored[:10] = -100
    out = cross_entropy(logits, ignored, reduction="none")
    assert (out[:10] == 0).all()
    torch.testing.assert_close(cross_entropy(logits, ignored), per[10:].sum() / 40)  # mmdet: ignored still count
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, labels[:5])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_float_targets_match_torch(reduction):
    g = gen(19)
    logits, targets = torch.randn(50, 3, generator=g), torch.rand(50, 3, generator=g)
    w = torch.rand(50, 3, generator=g)
    torch.testing.assert_close(binary_cross_entropy(logits, targets, w, reduction=reduction),
                               F.binary_cross_entropy_with_logits(logits, targets, w, reduction=reduction))


def test_bce_centerness_style_1d():
    g = gen(20)
    logits, targets = torch.randn(30, generator=g), torch.rand(30, generator=g)
    torch.testing.assert_close(binary_cross_entropy(logits, targets, avg_factor=30.0),
                               F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / (30 + EPS32))


def test_bce_labels_expand_like_mmdet():
    "Class labels (N,) for logits (N, K): one-hot rows, label K a zero row, negative labels weight 0."
    g = gen(21)
    logits = torch.randn(8, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 3, -1, 1, -100])
    w = torch.rand(8, generator=g, dtype=torch.float64)
    # naive loop
    ref = torch.zeros(8, 3, dtype=torch.float64)
    for i in range(8):
        for c in range(3):
            valid = labels[i] >= 0
            ref[i, c] = bce(logits[i, c].item(), float(labels[i].item() == c)) * w[i].item() * float(valid)
    torch.testing.assert_close(binary_cross_entropy(logits, labels, w, reduction="none"), ref)
    torch.testing.assert_close(binary_cross_entropy(logits, labels, w), ref.mean())


def test_bce_rpn_single_logit():
    g = gen(22)
    logits, labels = torch.randn(256, 1, generator=g), torch.randint(0, 2, (256,), generator=g)
    w = (torch.rand(256, generator=g) > 0.2).float()
    ref = F.binary_cross_entropy_with_logits(logits[:, 0], (labels == 0).float(), reduction="none") * w
    torch.testing.assert_close(binary_cross_entropy(logits, labels, w, avg_factor=w.sum()), ref.sum() / (w.sum() + EPS32))
    with pytest.raises(ValueError, match="targets"):
        binary_cross_entropy(logits, labels[:10])


# ---------------------------------------------------------------- centerness target
def naive_centerness(points, gts):
    out = []
    for (x, y), (x1, y1, x2, y2) in zip(points.tolist(), gts.tolist()):
        l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
        out.append(math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)))
    return torch.tensor(out, dtype=torch.float64)


def test_centerness_matches_naive_inside_points():
    g = gen(23)
    gts = random_boxes(100, g)
    frac = torch.rand(100, 2, generator=g, dtype=torch.float64) * 0.98 + 0.01
    points = gts[:, :2] + frac * (gts[:, 2:] - gts[:, :2])
    torch.testing.assert_close(centerness_target(points, gts), naive_centerness(points, gts))
    anchors = torch.cat([points - 3, points + 3], 1)  # same centres
    torch.testing.assert_close(centerness_target(anchors, gts), naive_centerness(points, gts))


def test_centerness_hand_values_and_edges():
    gts = torch.tensor([[0.0, 0, 10, 20]]).expand(5, 4)
    points = torch.tensor([[5.0, 10], [2.5, 10], [5, 5], [0, 10], [-1, -1]])
    out = centerness_target(points, gts)
    torch.testing.assert_close(out, torch.tensor([1.0, math.sqrt(2.5 / 7.5), math.sqrt(5 / 15), 0.0, 0.0]))
    # zero-area ground truth: 0, not NaN
    assert centerness_target(torch.tensor([[3.0, 3]]), torch.tensor([[3.0, 3, 3, 3]])).tolist() == [0.0]
    assert centerness_target(torch.zeros(0, 2), torch.zeros(0, 4)).shape == (0,)
    with pytest.raises(ValueError, match="anchors_or_points"):
        centerness_target(torch.zeros(3, 3), torch.zeros(3, 4))


# ---------------------------------------------------------------- empty input and gradients
def _empty_losses(reduction, avg_factor):
    logits = torch.zeros(0, 80, requires_grad=True)
    boxes = torch.zeros(0, 4, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    kw = dict(reduction=reduction, avg_factor=avg_factor)
    return logits, boxes, [
        sigmoid_focal_loss(logits, labels, **kw), quality_focal_loss(logits, labels, torch.zeros(0), **kw),
        giou_loss(boxes, torch.zeros(0, 4), **kw), l1_loss(boxes, torch.zeros(0, 4), **kw),
        cross_entropy(logits, labels, **kw), binary_cross_entropy(logits, labels, **kw),
        binary_cross_entropy(logits, torch.zeros(0, 80), **kw)]


@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("sum", None), ("mean", 0.0), ("mean", 1.0)])
def test_empty_inputs_zero_and_differentiable(reduction, avg_factor):
    logits, boxes, losses = _empty_losses(reduction, avg_factor)
    for loss in losses:
        assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
    sum(losses).backward()
    assert logits.grad.shape == (0, 80) and boxes.grad.shape == (0, 4)


def test_empty_inputs_reduction_none():
    _, _, losses = _empty_losses("none", None)
    assert [tuple(l.shape) for l in losses] == [(0, 80), (0,), (0,), (0, 4), (0,), (0, 80), (0, 80)]


def test_no_positives_focal_is_finite_and_has_gradient():
    "An image without ground truth: all labels background, avg_factor clamped to 1 as the heads do."
    logits = torch.randn(100, 80, generator=gen(24), requires_grad=True)
    loss = sigmoid_focal_loss(logits, torch.full((100,), 80), avg_factor=max(0, 1))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(logits.grad).all()


@pytest.mark.cuda
def test_cuda_matches_cpu():
    logits, labels, g = rand_case(64, 80, seed=25, dtype=torch.float32)
    scores, w = torch.rand(64, generator=g), torch.rand(64, generator=g)
    a, b = random_boxes(64, g, torch.float32), random_boxes(64, g, torch.float32)
    cases = [
        lambda d: sigmoid_focal_loss(logits.to(d), labels.to(d), w.to(d), avg_factor=10.0),
        lambda d: quality_focal_loss(logits.to(d), labels.to(d), scores.to(d), w.to(d), avg_factor=10.0),
        lambda d: giou_loss(a.to(d), b.to(d), w.to(d)),
        lambda d: l1_loss(a.to(d), b.to(d)),
        lambda d: cross_entropy(logits.to(d), labels.to(d).clamp(max=79)),
        lambda d: binary_cross_entropy(logits.to(d), labels.to(d)),
        lambda d: centerness_target((a[:, :2] + a[:, 2:]).to(d) / 2, a.to(d)).sum(),
    ]
    for case in cases:
        torch.testing.assert_close(case("cuda").cpu(), case("cpu"), rtol=1e-5, atol=1e-5)
