"""Co-DINO's parts that the official parity input cannot reach (the parity run is in eval mode): contrastive
denoising groups, their attention mask and targets against cases worked by hand, the QFL losses against the formula
written out, and soft-NMS against hand cases and torchvision's hard NMS."""
import math

import pytest
import torch
import torchvision

from codetr.heads.denoising import denoising_queries, denoising_targets, dn_attention_mask, dn_layout
from codetr.heads.dino import qfl_losses
from codetr.ops.nms import batched_soft_nms, soft_nms


# ---------------------------------------------------------------------------------------------------------------
# Denoising groups, worked by hand

def test_layout_by_hand():
    "2 and 1 boxes, 6 denoising queries: g = 2, 6 // 2 = 3 groups of 2g = 4 slots (2 positive, 2 negative): 12 queries."
    lay = dn_layout([2, 1], 6)
    assert (lay.max_gts, lay.num_groups, lay.group_size, lay.num_queries) == (2, 3, 4, 12)
    assert lay.positive_slots(2).tolist() == [0, 1, 4, 5, 8, 9]
    assert lay.positive_slots(1).tolist() == [0, 4, 8]
    assert dn_layout([7], 100).num_groups == 14        # 100 // 7
    assert dn_layout([150], 100).num_groups == 1       # more boxes than queries: still one group
    assert dn_layout([0, 0], 100).num_queries == 0     # no box in the batch: no denoising query


def test_attention_mask_by_hand():
    "Rows are queries, columns keys; True = blocked. Written out cell by cell for 2 groups of 2 slots and 3 matching queries."
    lay = dn_layout([1], 2)  # g = 1, 2 groups of 2 slots: D = 4
    D, Q = 4, 3
    expected = torch.zeros(D + Q, D + Q, dtype=torch.bool)
    for q in range(D + Q):
        for k in range(D + Q):
            if q >= D and k < D: expected[q, k] = True            # matching queries never see denoising ones
            if q < D and k < D and q // 2 != k // 2: expected[q, k] = True  # groups never see each other
            # denoising queries see the matching queries, as in DINO
    assert torch.equal(dn_attention_mask(lay, Q), expected)
    assert dn_attention_mask(lay, Q)[:D, D:].any().item() is False


def _embedding(K=5, C=3):
    emb = torch.nn.Embedding(K, C)
    with torch.no_grad(): emb.weight.copy_(torch.arange(K * C, dtype=torch.float32).view(K, C))
    return emb


def test_queries_without_noise_are_ground_truth_copies():
    "Without noise every group holds the image's boxes twice (positive, negative); empty slots are zero with label K."
    labels = [torch.tensor([3, 1]), torch.tensor([4])]
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.1]]), torch.tensor([[0.6, 0.3, 0.5, 0.2]])]
    emb = _embedding()
    dn = denoising_queries(labels, boxes, emb, num_matching=7, num_dn_queries=6, label_noise=0.0, box_noise=0.0)
    assert dn.query.shape == (2, 12, 3) and dn.reference_unact.shape == (2, 12, 4)
    # image 0: slots of group j are 4j + (0, 1) positive and 4j + (2, 3) negative, in the image's box order
    for j in range(3):
        for s, t in ((0, 0), (1, 1), (2, 0), (3, 1)):
            assert dn.labels[0, 4 * j + s].item() == labels[0][t].item()
            torch.testing.assert_close(dn.boxes_cxcywh[0, 4 * j + s], boxes[0][t])
            torch.testing.assert_close(dn.query[0, 4 * j + s], emb.weight[labels[0][t]])
            torch.testing.assert_close(dn.reference_unact[0, 4 * j + s], torch.logit(boxes[0][t]))
    # image 1: one box in slots 4j (positive) and 4j + 2 (negative); 4j + 1 and 4j + 3 are empty
    for j in range(3):
        assert dn.labels[1, 4 * j].item() == 4 and dn.labels[1, 4 * j + 2].item() == 4
        for empty in (4 * j + 1, 4 * j + 3):
            assert dn.labels[1, empty].item() == 5                     # K: nothing there
            assert not dn.query[1, empty].any() and not dn.reference_unact[1, empty].any()
    assert dn.attn_mask.shape == (19, 19)


def test_box_noise_bounds():
    """Each corner moves by r * half the box side: r in [0, 1) for positives and [1, 2) for negatives (before clipping
    to the image); box_noise scales the move."""
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([[0.5, 0.5, 0.2, 0.1]])  # small enough that no corner is clipped: moves <= 2 * half side
    dn = denoising_queries([torch.tensor([0])], [centre], _embedding(), 4, num_dn_queries=200, label_noise=0.0,
                           box_noise=1.0, generator=g)
    lay = dn.layout  # g = 1: 200 groups of (positive, negative)
    xyxy = torchvision.ops.box_convert(dn.boxes_cxcywh[0], "cxcywh", "xyxy")  # (400, 4)
    gt = torchvision.ops.box_convert(centre, "cxcywh", "xyxy")  # (1, 4)
    half = torch.tensor([0.1, 0.05, 0.1, 0.05])
    r = ((xyxy - gt).abs() / half)  # (400, 4) in units of half sides
    pos, neg = r[0::2], r[1::2]
    assert lay.num_groups == 200
    assert pos.max() < 1 + 1e-5 and neg.min() > 1 - 1e-5 and neg.max() < 2 + 1e-5
    assert pos.min() < 0.05 and neg.max() > 1.95           # the whole ranges are used
    # the signs are random per corner: both directions appear
    assert ((xyxy - gt) > 0).float().mean().item() == pytest.approx(0.5, abs=0.06)


def test_label_noise_rate():
    "label_noise 0.5 replaces a label with probability 0.25 (by any class, the same one included)."
    g = torch.Generator().manual_seed(1)
    K, n = 5, 4000
    dn = denoising_queries([torch.zeros(n, dtype=torch.long)], [torch.full((n, 4), 0.5)], _embedding(K), 4,
                           num_dn_queries=1, label_noise=0.5, box_noise=0.0, generator=g)
    changed = (dn.labels[0] != 0).float().mean().item()
    assert changed == pytest.approx(0.25 * (K - 1) / K, abs=0.02)  # a draw of class 0 leaves the label unchanged


def test_targets_by_hand():
    "Positives learn their ground truth; negatives and empty slots learn background with no box loss; every slot counts for the class loss."
    labels = [torch.tensor([3, 1]), torch.tensor([4])]
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.1]]), torch.tensor([[0.6, 0.3, 0.5, 0.2]])]
    lay = dn_layout([2, 1], 6)
    t_labels, t_label_w, t_boxes, t_box_w = denoising_targets(lay, labels, boxes, 5, torch.zeros(1))
    K = 5
    expected0 = [3, 1, K, K] * 3
    expected1 = [4, K, K, K] * 3
    assert t_labels.tolist() == [expected0, expected1]
    assert torch.equal(t_label_w, torch.ones(2, 12))
    assert t_box_w[0, :, 0].tolist() == [1, 1, 0, 0] * 3 and t_box_w[1, :, 0].tolist() == [1, 0, 0, 0] * 3
    torch.testing.assert_close(t_boxes[0, 4], boxes[0][0])
    torch.testing.assert_close(t_boxes[1, 8], boxes[1][0])
    assert not t_boxes[1, 1].any()


def test_empty_batch_has_no_denoising_queries():
    dn = denoising_queries([torch.zeros(0, dtype=torch.long)] * 2, [torch.zeros(0, 4)] * 2, _embedding(), 3)
    assert dn.query.shape == (2, 0, 3) and dn.attn_mask.shape == (3, 3) and not dn.attn_mask.any()


# ---------------------------------------------------------------------------------------------------------------
# QFL losses: the classification target of a positive is its box's IoU with the ground truth

def test_qfl_losses_against_the_formula():
    torch.manual_seed(0)
    B, Q, K = 2, 5, 3
    logits = torch.randn(B, Q, K, dtype=torch.float64)
    pred = torch.tensor([0.5, 0.5, 0.3, 0.3], dtype=torch.float64) + 0.05 * torch.randn(B, Q, 4, dtype=torch.float64)
    target = torch.tensor([0.5, 0.5, 0.3, 0.3], dtype=torch.float64).expand(B, Q, 4).clone()
    labels = torch.tensor([[0, 2, K, K, 1], [K, K, 0, K, K]])
    box_w = (labels < K).to(torch.float64)[..., None].expand(B, Q, 4)
    sizes = [(100, 200), (50, 80)]
    w = {"cls": 1.0, "bbox": 5.0, "iou": 2.0}
    cls, l1, giou = qfl_losses(logits, pred, labels, torch.ones(B, Q, dtype=torch.float64), target, box_w, sizes, w)
    # the formula, entry by entry
    to_xyxy = lambda b: torchvision.ops.box_convert(b, "cxcywh", "xyxy")
    total = 0.0
    for b in range(B):
        for q in range(Q):
            for k in range(K):
                x = logits[b, q, k].item()
                p = 1 / (1 + math.exp(-x))
                if labels[b, q] == k:
                    y = torchvision.ops.box_iou(to_xyxy(pred[b, q][None]), to_xyxy(target[b, q][None])).item()
                    total += -(y * math.log(p) + (1 - y) * math.log(1 - p)) * abs(y - p) ** 2
                else:
                    total += -math.log(1 - p) * p ** 2
    num_pos = 4 + torch.finfo(torch.float32).eps  # mmdet's avg_factor reduction adds float32's eps
    assert cls.item() == pytest.approx(total / num_pos, rel=1e-9)
    # the box terms: L1 on normalised cxcywh, GIoU on boxes in pixels, both over positives / num_pos
    pos = labels < K
    assert l1.item() == pytest.approx(5.0 * (pred - target).abs()[pos].sum().item() / num_pos, rel=1e-9)
    g = 0.0
    for b in range(B):
        h, wd = sizes[b]
        scale = torch.tensor([wd, h, wd, h], dtype=torch.float64)
        for q in range(Q):
            if pos[b, q]:
                g += 1 - torchvision.ops.generalized_box_iou(to_xyxy(pred[b, q][None]) * scale,
                                                             to_xyxy(target[b, q][None]) * scale).item()
    assert giou.item() == pytest.approx(2.0 * g / num_pos, rel=1e-9)


def test_qfl_target_does_not_carry_gradient_to_boxes():
    "The IoU target is a constant for the classification loss: boxes get gradient only from L1 and GIoU."
    logits = torch.zeros(1, 1, 2, dtype=torch.float64)
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0.52, 0.5, 0.2, 0.2]]], dtype=torch.float64)
    cls, _, _ = qfl_losses(logits, pred, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.float64), target,
                           torch.ones(1, 1, 4, dtype=torch.float64), [(10, 10)], {"cls": 1.0, "bbox": 0.0, "iou": 0.0})
    assert not cls.requires_grad or torch.autograd.grad(cls, pred, allow_unused=True)[0] is None


# ---------------------------------------------------------------------------------------------------------------
# Soft-NMS

def test_linear_soft_nms_by_hand():
    """A (0.9) and B (0.8) overlap with IoU 90 / 110 = 0.818 >= 0.8, so B decays to 0.8 * (1 - 0.818) = 0.1455 and
    falls behind C (0.7), which overlaps nothing."""
    boxes = torch.tensor([[0., 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    out, keep = soft_nms(boxes, scores, iou_threshold=0.8, method="linear")
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(out, torch.tensor([0.9, 0.7, 0.8 * (1 - 90 / 110)]))
    # below the threshold nothing decays
    out, keep = soft_nms(boxes, scores, iou_threshold=0.85, method="linear")
    assert keep.tolist() == [0, 1, 2] and torch.equal(out, scores)


def test_gaussian_soft_nms_by_hand():
    boxes = torch.tensor([[0., 0, 10, 10], [5, 0, 15, 10]])  # IoU 50 / 150 = 1/3
    out, keep = soft_nms(boxes, torch.tensor([0.9, 0.6]), sigma=0.5, method="gaussian")
    torch.testing.assert_close(out, torch.tensor([0.9, 0.6 * math.exp(-(1 / 3) ** 2 / 0.5)]))


def test_decayed_boxes_below_min_score_are_dropped():
    boxes = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 9.9]])  # IoU 0.99: 0.5 * 0.01 = 0.005
    out, keep = soft_nms(boxes, torch.tensor([0.9, 0.5]), iou_threshold=0.3, min_score=0.01)
    assert keep.tolist() == [0]
    out, keep = soft_nms(boxes, torch.tensor([0.9, 0.5]), iou_threshold=0.3, min_score=0.001)
    assert keep.tolist() == [0, 1] and out[1].item() == pytest.approx(0.005, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_naive_soft_nms_is_hard_nms(seed, thr):
    "With the naive decay (score -> 0 at IoU >= threshold) soft-NMS keeps exactly what torchvision's NMS keeps, in order."
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], 1)
    scores = 0.01 + 0.99 * torch.rand(200, generator=g)  # above min_score, which only drops decayed boxes here
    _, keep = soft_nms(boxes, scores, iou_threshold=thr, method="naive")
    assert keep.tolist() == torchvision.ops.nms(boxes, scores, thr).tolist()


def test_batched_soft_nms_is_class_aware():
    "The same two overlapping boxes decay each other only when they share a class."
    boxes = torch.tensor([[0., 0, 10, 10], [1, 0, 11, 10]])
    scores = torch.tensor([0.9, 0.8])
    _, same, _ = batched_soft_nms(boxes, scores, torch.tensor([3, 3]))
    _, apart, keep = batched_soft_nms(boxes, scores, torch.tensor([3, 4]))
    torch.testing.assert_close(same, torch.tensor([0.9, 0.8 * (1 - 90 / 110)]))
    assert torch.equal(apart, scores) and keep.tolist() == [0, 1]
    # one class at a time gives the same result as the batched call
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    b = torch.cat([xy, xy + 10 + torch.rand(60, 2, generator=g) * 20], 1)
    s, l = torch.rand(60, generator=g), torch.randint(0, 3, (60,), generator=g)
    _, decayed, kept = batched_soft_nms(b, s, l, iou_threshold=0.3)
    for c in range(3):
        idx = (l == c).nonzero().squeeze(1)
        d_c, k_c = soft_nms(b[idx], s[idx], iou_threshold=0.3)
        mine = l[kept] == c
        assert kept[mine].tolist() == idx[k_c].tolist()
        torch.testing.assert_close(decayed[mine], d_c)
