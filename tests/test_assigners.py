"""codetr.ops.assigners against naive loop references, brute force and hand-computed cases; properties and edge cases."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import linear_sum_assignment

from codetr.ops.assigners import (AssignResult, add_gt_as_proposals, atss_assign, atss_thresholds, batch_match_cost, focal_cost,
                              hungarian_match, hungarian_match_batch, match_cost, max_iou_assign, pseudo_sample,
                              random_sample)

# ---------------------------------------------------------------- naive references (plain Python, loops)

def naive_iou(a, b, mode="iou"):
    "IoU (or IoF over `a`) of two xyxy boxes given as lists, with mmdet's eps on the denominator."
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    denom = area_a if mode == "iof" else area_a + area_b - inter
    return inter / max(denom, 1e-6)


def naive_ignored(priors, ignore, thr):
    if thr <= 0 or not ignore or not priors: return [False] * len(priors)
    return [max(naive_iou(p, r, "iof") for r in ignore) > thr for p in priors]


def naive_max_iou(priors, gts, labels, pos_iou_thr, neg_iou_thr, min_pos_iou=0.0, match_low_quality=True, ignore=(),
                  ignore_thr=-1.0):
    A, G = len(priors), len(gts)
    if A == 0 or G == 0: return [0] * A, [-1] * A
    ov = [[naive_iou(gts[g], priors[a]) for a in range(A)] for g in range(G)]
    for a, ign in enumerate(naive_ignored(priors, list(ignore), ignore_thr)):
        if ign:
            for g in range(G): ov[g][a] = -1.0
    lo, hi = (0.0, neg_iou_thr) if isinstance(neg_iou_thr, float) else neg_iou_thr
    inds = [-1] * A
    for a in range(A):
        col = [ov[g][a] for g in range(G)]
        best = max(col)
        if lo <= best < hi: inds[a] = 0
        if best >= pos_iou_thr: inds[a] = col.index(best) + 1
    if match_low_quality:
        for g in range(G):
            gmax = max(ov[g])
            if gmax < min_pos_iou: continue
            for a in range(A):
                if ov[g][a] == gmax: inds[a] = g + 1
    return inds, [labels[k - 1] if k > 0 else -1 for k in inds]


def naive_atss(priors, num_level, gts, labels, topk=9, ignore=(), ignore_thr=-1.0):
    A, G = len(priors), len(gts)
    if A == 0 or G == 0: return [0] * A, [-1] * A
    ctr = [((p[0] + p[2]) / 2, (p[1] + p[3]) / 2) for p in priors]
    inds = [0] * A
    ignored = naive_ignored(priors, list(ignore), ignore_thr)
    pos_for = [[] for _ in range(A)]
    for g, box in enumerate(gts):
        gx, gy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        dist = [1e8 if ignored[a] else math.hypot(ctr[a][0] - gx, ctr[a][1] - gy) for a in range(A)]
        cands, start = [], 0
        for n in num_level:
            cands += sorted(range(start, start + n), key=lambda a: dist[a])[:min(topk, n)]
            start += n
        ious = [naive_iou(priors[a], box) for a in cands]
        if len(ious) < 2: thr = math.inf
        else:
            mean = sum(ious) / len(ious)
            thr = mean + math.sqrt(sum((x - mean) ** 2 for x in ious) / (len(ious) - 1))
        for a, iou in zip(cands, ious):
            cx, cy = ctr[a]
            if iou >= thr and min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01: pos_for[a].append((g, iou))
    for a in range(A):
        if ignored[a]: inds[a] = -1
        best = None
        for g, iou in pos_for[a]:
            if best is None or iou > best[1]: best = (g, iou)
        if best is not None: inds[a] = best[0] + 1
    return inds, [labels[k - 1] if k > 0 else -1 for k in inds]

# ---------------------------------------------------------------- random data

def rand_boxes(g, n, scale=100.0, min_wh=2.0, max_wh=40.0):
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], 1)


def rand_levels(g, counts, scale=100.0):
    "Random (non-grid) priors, larger on later levels, so distances and IoUs have no ties."
    levels = [rand_boxes(g, n, scale, 4.0 * 2 ** l, 12.0 * 2 ** l) for l, n in enumerate(counts)]
    return torch.cat(levels)


def rand_gts(g, n, num_classes=5, scale=100.0):
    return rand_boxes(g, n, scale, 5.0, 50.0), torch.randint(0, num_classes, (n,), generator=g)


def rand_preds(g, B, Q, K):
    logits = torch.randn(B, Q, K, generator=g, dtype=torch.float64) * 2
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1,
                       torch.rand(B, Q, 2, generator=g, dtype=torch.float64) * 0.3 + 0.02], -1)
    return logits, boxes


def rand_gt_cxcywh(g, n, K):
    boxes = torch.cat([torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1,
                       torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.02], -1)
    return torch.randint(0, K, (n,), generator=g), boxes


RPN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
RCNN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)
CONFIGS = {"rpn": RPN, "rcnn": RCNN, "low_min0": dict(pos_iou_thr=0.5, neg_iou_thr=0.4),
           "neg_tuple": dict(pos_iou_thr=0.6, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.2)}

# ---------------------------------------------------------------- AssignResult


def test_assign_result_helpers():
    r = AssignResult(torch.tensor([0, 2, -1, 1, 0]), torch.zeros(5), torch.tensor([-1, 4, -1, 3, -1]), 2)
    assert r.num_priors == 5
    assert r.pos_inds.tolist() == [1, 3] and r.neg_inds.tolist() == [0, 4] and r.ignored_inds.tolist() == [2]
    assert r.pos_gt_inds.tolist() == [1, 0]

# ---------------------------------------------------------------- MaxIoU


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("seed", range(8))
def test_max_iou_matches_naive(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    priors = rand_boxes(g, 300, scale=60.0, min_wh=5.0, max_wh=50.0)  # dense: every IoU band is populated
    gts, labels = rand_gts(g, int(torch.randint(1, 7, (1,), generator=g)), scale=60.0)
    res = max_iou_assign(priors, gts, labels, **CONFIGS[cfg])
    inds, lbls = naive_max_iou(priors.tolist(), gts.tolist(), labels.tolist(), **CONFIGS[cfg])
    assert res.gt_inds.tolist() == inds and res.labels.tolist() == lbls
    assert res.gt_inds.dtype == torch.int64 and res.labels.dtype == torch.int64
    torch.testing.assert_close(res.max_overlaps, torch.tensor([max(naive_iou(b, p) for b in gts.tolist()) for p in priors.tolist()], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
def test_max_iou_ignore_matches_naive(seed):
    g = torch.Generator().manual_seed(100 + seed)
    priors = rand_boxes(g, 200, scale=60.0, min_wh=5.0, max_wh=50.0)
    gts, labels = rand_gts(g, 3)
    crowd = rand_boxes(g, 2, max_wh=60.0)
    kw = dict(RPN, gt_ignore_xyxy=crowd, ignore_iof_thr=0.5)
    res = max_iou_assign(priors, gts, labels, **kw)
    inds, _ = naive_max_iou(priors.tolist(), gts.tolist(), labels.tolist(), **RPN,
                            ignore=crowd.tolist(), ignore_thr=0.5)
    assert res.gt_inds.tolist() == inds


def test_max_iou_hand_computed_low_quality_ties_and_later_gt_wins():
    anchors = torch.tensor([[0., 0., 10., 10.], [20., 0., 30., 10.], [40., 0., 50., 10.]])
    # gt 0 overlaps anchors 0 and 1 equally (IoU 25/175): both are its best, gt_max_assign_all gives it both.
    gts = torch.tensor([[5., 0., 25., 10.]])
    res = max_iou_assign(anchors, gts, torch.tensor([2]), pos_iou_thr=0.7, neg_iou_thr=0.1, min_pos_iou=0.1)
    assert res.gt_inds.tolist() == [1, 1, 0]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([50 / 250, 50 / 250, 0.]))
    # two gts whose best anchor is the same one: the later gt wins it, as in mmdet's loop
    gts = torch.tensor([[0., 0., 8., 10.], [1., 0., 9., 10.]])  # IoU with anchor 0: 0.8 and 0.7
    res = max_iou_assign(anchors, gts, torch.tensor([5, 6]), pos_iou_thr=0.9, neg_iou_thr=0.3, min_pos_iou=0.3)
    assert res.gt_inds.tolist() == [2, 0, 0] and res.labels.tolist() == [6, -1, -1]
    # without low-quality matches the same anchor is ignored (0.8 is in [0.3, 0.9))
    res = max_iou_assign(anchors, gts, torch.tensor([5, 6]), pos_iou_thr=0.9, neg_iou_thr=0.3, match_low_quality=False)
    assert res.gt_inds.tolist() == [-1, 0, 0]


def test_max_iou_min_pos_iou_zero_quirk():
    "With min_pos_iou=0 a gt that touches no prior claims every prior at IoU 0 (mmdet behaviour, kept)."
    anchors = torch.tensor([[0., 0., 10., 10.], [20., 0., 30., 10.]])
    res = max_iou_assign(anchors, torch.tensor([[100., 100., 110., 110.]]), torch.tensor([0]),
                         pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
    assert res.gt_inds.tolist() == [1, 1]
    res = max_iou_assign(anchors, torch.tensor([[100., 100., 110., 110.]]), torch.tensor([0]), **RPN)
    assert res.gt_inds.tolist() == [0, 0]

# ---------------------------------------------------------------- ATSS


@pytest.mark.parametrize("topk", [1, 3, 9])
@pytest.mark.parametrize("seed", range(8))
def test_atss_matches_naive(topk, seed):
    g = torch.Generator().manual_seed(seed)
    counts = [50, 30, 12, 5]
    priors = rand_levels(g, counts)
    gts, labels = rand_gts(g, int(torch.randint(1, 8, (1,), generator=g)))
    res = atss_assign(priors, counts, gts, labels, topk=topk)
    inds, lbls = naive_atss(priors.tolist(), counts, gts.tolist(), labels.tolist(), topk=topk)
    assert res.gt_inds.tolist() == inds and res.labels.tolist() == lbls
    pos = res.gt_inds > 0
    iou = torch.tensor([[naive_iou(p, b) for b in gts.tolist()] for p in priors.tolist()], dtype=torch.float64)
    expected = torch.where(pos, iou.gather(1, (res.gt_inds.clamp(min=1) - 1)[:, None])[:, 0], iou.max(1).values)
    torch.testing.assert_close(res.max_overlaps, expected)


@pytest.mark.parametrize("seed", range(5))
def test_atss_ignore_matches_naive(seed):
    g = torch.Generator().manual_seed(200 + seed)
    counts = [60, 40]
    priors = rand_levels(g, counts)
    gts, labels = rand_gts(g, 4)
    crowd = rand_boxes(g, 1, max_wh=30.0)
    res = atss_assign(priors, counts, gts, labels, gt_ignore_xyxy=crowd, ignore_iof_thr=0.5)
    inds, _ = naive_atss(priors.tolist(), counts, gts.tolist(), labels.tolist(), ignore=crowd.tolist(), ignore_thr=0.5)
    assert res.gt_inds.tolist() == inds


def test_atss_hand_computed():
    anchors = torch.tensor([[x, 0., x + 10, 10.] for x in (0., 10., 20., 30., 40.)], dtype=torch.float64)
    gt = torch.tensor([[9., 0., 25., 10.]], dtype=torch.float64)
    ious = torch.tensor([100 / 160, 50 / 210, 10 / 250], dtype=torch.float64)
    mean = ious.sum() / 3
    std = math.sqrt(sum((float(x) - float(mean)) ** 2 for x in ious) / 2)
    torch.testing.assert_close(atss_thresholds(ious[:, None]), (mean + std)[None])
    res = atss_assign(anchors, [5], gt, torch.tensor([3]), topk=3)
    assert res.gt_inds.tolist() == [0, 1, 0, 0, 0]
    # topk per level: with two levels of [0..2] and [3..4], each contributes its own nearest anchors
    # candidates anchor 1 and anchor 2, threshold 0.43 + 0.27 = 0.71: anchor 1 no longer passes
    res = atss_assign(anchors, [2, 3], gt, torch.tensor([3]), topk=1)
    cand = torch.tensor([100 / 160, 50 / 210], dtype=torch.float64)
    assert cand[0] < cand.mean() + cand.std() and res.gt_inds.tolist() == [0] * 5


@pytest.mark.parametrize("cx,positive", [(0.011, True), (0.009, False), (-1.0, False)])
def test_atss_centre_must_be_inside_by_001(cx, positive):
    "The best candidate passes the IoU threshold; only its centre's distance to the left edge decides."
    anchors = torch.tensor([[cx - 50, 0., cx + 50, 10.], [120., 0., 220., 10.], [150., 0., 250., 10.]], dtype=torch.float64)
    res = atss_assign(anchors, [3], torch.tensor([[0., 0., 100., 10.]], dtype=torch.float64), torch.tensor([0]), topk=3)
    assert res.gt_inds.tolist() == [int(positive), 0, 0]


def test_atss_tie_goes_to_highest_iou():
    "Anchor 0 passes both boxes' thresholds (0.61 and 0.76): it goes to box 1, which it overlaps more."
    anchors = torch.tensor([[0., 0., 20., 20.], [-1., -5., 19., 15.], [4., 8., 24., 28.], [-6., -8., 14., 12.],
                            [8., 2., 28., 22.], [-2., -3., 18., 17.]])
    gts = torch.tensor([[0., 0., 24., 24.], [-2., -2., 20., 20.]])
    iou = torch.tensor([[naive_iou(p, b) for b in gts.tolist()] for p in anchors.tolist()])
    thr = iou.mean(0) + iou.std(0)
    assert (iou[0] >= thr).all() and iou[0, 1] > iou[0, 0]
    res = atss_assign(anchors, [6], gts, torch.tensor([0, 1]), topk=6)
    assert res.gt_inds.tolist() == [2, 0, 0, 0, 0, 0]
    res = atss_assign(anchors, [6], gts.flip(0), torch.tensor([1, 0]), topk=6)
    assert res.gt_inds.tolist() == [1, 0, 0, 0, 0, 0]


# ---------------------------------------------------------------- Hungarian matcher


def brute_force_min(cost):
    Q, G = cost.shape
    if Q >= G: return min(sum(cost[q, j] for j, q in enumerate(qs)) for qs in itertools.permutations(range(Q), G))
    return min(sum(cost[q, j] for q, j in enumerate(js)) for js in itertools.permutations(range(G), Q))


@pytest.mark.parametrize("Q,G", [(1, 1), (3, 2), (4, 4), (6, 3), (5, 5), (2, 4), (3, 6), (7, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_matcher_total_cost_is_brute_force_minimum(Q, G, seed):
    g = torch.Generator().manual_seed(seed)
    logits, boxes = rand_preds(g, 1, Q, 4)
    labels, gt_boxes = rand_gt_cxcywh(g, G, 4)
    res = hungarian_match(logits[0], boxes[0], labels, gt_boxes, (480, 640))
    cost = match_cost(logits[0], boxes[0], labels, gt_boxes, (480, 640))
    assert len(res.pos_inds) == min(Q, G)
    assert len(set(res.pos_gt_inds.tolist())) == min(Q, G)  # one-to-one
    torch.testing.assert_close(cost[res.pos_inds, res.pos_gt_inds].sum(), brute_force_min(cost))
    assert res.labels[res.pos_inds].tolist() == labels[res.pos_gt_inds].tolist()
    assert (res.labels[res.gt_inds == 0] == -1).all()


def test_match_cost_hand_computed():
    "Each term against a hand formula: focal from its definition, L1 by hand, GIoU of known boxes."
    logits = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)   # xyxy (0.25, 0.25, 0.75, 0.75)
    gt = torch.tensor([[0.75, 0.75, 0.5, 0.5]], dtype=torch.float64)   # xyxy (0.5, 0.5, 1, 1)
    p = 1 / (1 + math.exp(1.2))
    focal = -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 + math.log(1 - p + 1e-12) * 0.75 * p ** 2
    # on a 100x100 image: intersection 25x25, union 2*2500 - 625, enclosure 75x75
    inter, union, encl = 625, 5000 - 625, 5625
    giou = inter / union - (encl - union) / encl
    cost = match_cost(logits, pred, torch.tensor([1]), gt, (100, 100))
    torch.testing.assert_close(cost, torch.tensor([[2 * focal + 5 * 0.5 - 2 * giou]], dtype=torch.float64))
    torch.testing.assert_close(focal_cost(logits, torch.tensor([1])), torch.tensor([[focal]], dtype=torch.float64))
    # GIoU uses absolute pixels: a non-square image changes it, L1 stays normalised
    c1 = match_cost(logits, pred, torch.tensor([1]), gt, (100, 300), cls_weight=0, giou_weight=0)
    torch.testing.assert_close(c1, torch.tensor([[2.5]], dtype=torch.float64))


def test_matcher_prefers_right_class_and_box():
    gt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    pred = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]])
    logits = torch.tensor([[-3., 3.], [0., 0.], [3., -3.]])
    res = hungarian_match(logits, pred, torch.tensor([0, 1]), gt, (64, 64))
    assert res.gt_inds.tolist() == [2, 0, 1] and res.labels.tolist() == [1, -1, 0]


@pytest.mark.parametrize("seed", range(5))
def test_matcher_batch_equals_one_by_one(seed):
    g = torch.Generator().manual_seed(seed)
    B, Q, K = 4, 9, 6
    logits, boxes = rand_preds(g, B, Q, K)
    counts = [int(n) for n in torch.randint(0, 12, (B,), generator=g)]
    counts[seed % B] = 0
    gts = [rand_gt_cxcywh(g, n, K) for n in counts]
    hw = [(int(h), int(w)) for h, w in torch.randint(200, 900, (B, 2), generator=g)]
    batch = hungarian_match_batch(logits, boxes, [l for l, _ in gts], [b for _, b in gts], hw)
    for b in range(B):
        one = hungarian_match(logits[b], boxes[b], gts[b][0], gts[b][1], hw[b])
        assert batch[b].gt_inds.tolist() == one.gt_inds.tolist() and batch[b].labels.tolist() == one.labels.tolist()
        assert batch[b].num_gts == counts[b]
        # and both equal scipy on the one-image cost
        cost = match_cost(logits[b], boxes[b], gts[b][0], gts[b][1], hw[b]).numpy()
        if counts[b]:
            rows, cols = linear_sum_assignment(cost)
            assert one.gt_inds[rows].tolist() == (cols + 1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_batch_cost_one_tensor_equals_per_image(seed):
    g = torch.Generator().manual_seed(seed)
    logits, boxes = rand_preds(g, 3, 20, 7)
    gts = [rand_gt_cxcywh(g, n, 7) for n in (4, 0, 9)]
    args = (logits, boxes, [l for l, _ in gts], [b for _, b in gts], [(100, 300), (50, 50), (640, 480)])
    one = batch_match_cost(*args, one_tensor=True, l1_weight=1.5)
    assert one.shape == (20, 13)
    torch.testing.assert_close(one, batch_match_cost(*args, one_tensor=False, l1_weight=1.5))
    torch.testing.assert_close(one[:, 4:], match_cost(logits[2], boxes[2], *[x[2] for x in args[2:]], l1_weight=1.5))


@pytest.mark.parametrize("seed", range(4))
def test_matcher_gt_permutation_permutes_result(seed):
    g = torch.Generator().manual_seed(seed)
    logits, boxes = rand_preds(g, 1, 12, 5)
    labels, gt = rand_gt_cxcywh(g, 7, 5)
    perm = torch.randperm(7, generator=g)
    a = hungarian_match(logits[0], boxes[0], labels, gt, (300, 400))
    b = hungarian_match(logits[0], boxes[0], labels[perm], gt[perm], (300, 400))
    _assert_permuted(a, b, perm)


def _assert_permuted(a, b, perm):
    "b was assigned against gts[perm]: a box k of `a` is box inv[k] of `b`."
    inv = torch.argsort(perm)
    expected = torch.where(a.gt_inds > 0, inv[(a.gt_inds - 1).clamp(min=0)] + 1, a.gt_inds)
    assert b.gt_inds.tolist() == expected.tolist()
    assert b.labels.tolist() == a.labels.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_assigners_gt_permutation_permutes_result(seed):
    g = torch.Generator().manual_seed(300 + seed)
    counts = [80, 40, 10]
    priors = rand_levels(g, counts)
    gts, labels = rand_gts(g, 6)
    perm = torch.randperm(6, generator=g)
    _assert_permuted(atss_assign(priors, counts, gts, labels), atss_assign(priors, counts, gts[perm], labels[perm]), perm)
    _assert_permuted(max_iou_assign(priors, gts, labels, **RPN), max_iou_assign(priors, gts[perm], labels[perm], **RPN), perm)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_matcher_brute_force_hypothesis(Q, G, seed):
    g = torch.Generator().manual_seed(seed)
    logits, boxes = rand_preds(g, 1, Q, 3)
    labels, gt = rand_gt_cxcywh(g, G, 3)
    res = hungarian_match(logits[0], boxes[0], labels, gt, (100, 200))
    assert len(res.pos_inds) == min(Q, G)
    if G:
        cost = match_cost(logits[0], boxes[0], labels, gt, (100, 200))
        assert abs(float(cost[res.pos_inds, res.pos_gt_inds].sum()) - float(brute_force_min(cost))) < 1e-9

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 25), min_size=1, max_size=4), st.integers(0, 6), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_assigners_match_naive_hypothesis(counts, G, topk, seed):
    "Any level sizes (including empty levels and levels smaller than topk), any number of boxes."
    g = torch.Generator().manual_seed(seed)
    priors = rand_levels(g, counts)
    gts, labels = rand_gts(g, G)
    res = atss_assign(priors, counts, gts, labels, topk=topk)
    assert res.gt_inds.tolist() == naive_atss(priors.tolist(), counts, gts.tolist(), labels.tolist(), topk=topk)[0]
    res = max_iou_assign(priors, gts, labels, **RPN)
    assert res.gt_inds.tolist() == naive_max_iou(priors.tolist(), gts.tolist(), labels.tolist(), **RPN)[0]
    assert torch.isfinite(res.max_overlaps).all()

# ---------------------------------------------------------------- edge cases


def test_no_gt_everything_negative():
    priors = rand_levels(torch.Generator().manual_seed(0), [20, 10])
    no_box, no_label = torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    for res in (max_iou_assign(priors, no_box, no_label, **RPN), atss_assign(priors, [20, 10], no_box, no_label)):
        assert res.gt_inds.tolist() == [0] * 30 and res.labels.tolist() == [-1] * 30 and res.num_gts == 0
        assert torch.isfinite(res.max_overlaps).all()
    logits, boxes = rand_preds(torch.Generator().manual_seed(0), 2, 5, 3)
    for res in hungarian_match_batch(logits, boxes, [no_label] * 2, [no_box] * 2, [(10, 10)] * 2):
        assert res.gt_inds.tolist() == [0] * 5 and res.labels.tolist() == [-1] * 5
    assert len(pseudo_sample(max_iou_assign(priors, no_box, no_label, **RPN)).neg_inds) == 30


def test_no_priors():
    gts, labels = rand_gts(torch.Generator().manual_seed(0), 3)
    empty = torch.zeros(0, 4, dtype=torch.float64)
    assert len(max_iou_assign(empty, gts, labels, **RPN).gt_inds) == 0
    assert len(atss_assign(empty, [0, 0], gts, labels).gt_inds) == 0
    logits, boxes = torch.zeros(1, 0, 3), torch.zeros(1, 0, 4)
    assert len(hungarian_match_batch(logits, boxes, [labels], [gts], [(10, 10)])[0].gt_inds) == 0


def test_zero_area_gt():
    g = torch.Generator().manual_seed(1)
    counts = [40, 20]
    priors = rand_levels(g, counts)
    gts = torch.tensor([[30., 30., 30., 30.], [10., 10., 40., 10.], [20., 20., 60., 70.]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    for res in (max_iou_assign(priors, gts, labels, **RPN), atss_assign(priors, counts, gts, labels)):
        assert torch.isfinite(res.max_overlaps).all()
        assert not ((res.gt_inds == 1) | (res.gt_inds == 2)).any()  # degenerate boxes get no positive
    inds, _ = naive_atss(priors.tolist(), counts, gts.tolist(), labels.tolist())
    assert atss_assign(priors, counts, gts, labels).gt_inds.tolist() == inds
    logits, boxes = rand_preds(g, 1, 5, 3)
    res = hungarian_match(logits[0], boxes[0], labels, torch.tensor([[0.5, 0.5, 0., 0.], [0.2, 0.2, 0.1, 0.], [0.5, 0.5, 0.2, 0.2]],
                                                                     dtype=torch.float64), (100, 100))
    assert len(res.pos_inds) == 3


def test_one_prior():
    prior = torch.tensor([[0., 0., 10., 10.]])
    gts, labels = torch.tensor([[1., 1., 11., 11.], [50., 50., 60., 60.]]), torch.tensor([3, 4])
    res = max_iou_assign(prior, gts, labels, **RPN)
    assert res.gt_inds.tolist() == [1] and res.labels.tolist() == [3]   # low-quality match for gt 0 (IoU 0.68)
    res = atss_assign(prior, [1], gts, labels)
    assert res.gt_inds.tolist() == [0] and torch.isfinite(res.max_overlaps).all()  # one candidate: no positive
    res = hungarian_match(torch.zeros(1, 5), torch.tensor([[0.5, 0.5, 0.1, 0.1]]), labels, torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]), (10, 10))
    assert res.gt_inds.tolist() == [1]


def test_more_gts_than_queries():
    g = torch.Generator().manual_seed(5)
    logits, boxes = rand_preds(g, 1, 3, 4)
    labels, gt = rand_gt_cxcywh(g, 10, 4)
    res = hungarian_match(logits[0], boxes[0], labels, gt, (64, 64))
    assert (res.gt_inds > 0).all() and len(set(res.gt_inds.tolist())) == 3 and res.num_gts == 10


def test_thousands_of_priors_match_naive():
    g = torch.Generator().manual_seed(7)
    counts = [2000, 600, 150, 40]
    priors = rand_levels(g, counts, scale=400.0)
    gts, labels = rand_gts(g, 8, scale=400.0)
    res = atss_assign(priors, counts, gts, labels)
    assert res.gt_inds.tolist() == naive_atss(priors.tolist(), counts, gts.tolist(), labels.tolist())[0]
    res = max_iou_assign(priors, gts, labels, **RPN)
    assert res.gt_inds.tolist() == naive_max_iou(priors.tolist(), gts.tolist(), labels.tolist(), **RPN)[0]


def test_encoder_sized_matching():
    "20000 tokens x 50 boxes, class-agnostic as for the encoder loss: every box matched once, equals scipy."
    g = torch.Generator().manual_seed(0)
    logits, boxes = rand_preds(g, 1, 20000, 1)
    _, gt = rand_gt_cxcywh(g, 50, 1)
    labels = torch.zeros(50, dtype=torch.long)
    res = hungarian_match(logits[0].float(), boxes[0].float(), labels, gt.float(), (800, 1216))
    assert sorted(res.pos_gt_inds.tolist()) == list(range(50))
    rows, cols = linear_sum_assignment(match_cost(logits[0].float(), boxes[0].float(), labels, gt.float(), (800, 1216)).numpy())
    assert res.gt_inds[rows].tolist() == (cols + 1).tolist()

# ---------------------------------------------------------------- samplers


def make_assign(num_pos, num_neg, num_ign, num_gts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt_inds = torch.cat([torch.randint(1, num_gts + 1, (num_pos,), generator=g), torch.zeros(num_neg, dtype=torch.long),
                         torch.full((num_ign,), -1)])
    gt_inds = gt_inds[torch.randperm(len(gt_inds), generator=g)]
    labels = torch.where(gt_inds > 0, gt_inds + 10, -1)
    return AssignResult(gt_inds, torch.rand(len(gt_inds), generator=g), labels, num_gts)


@pytest.mark.parametrize("num,frac,num_pos,num_neg,ub", [
    (256, 0.5, 300, 5000, -1), (256, 0.5, 20, 5000, -1), (512, 0.25, 40, 100, -1), (512, 0.25, 0, 900, -1),
    (64, 0.25, 10, 900, 3), (64, 0.25, 0, 900, 3), (10, 1.0, 4, 50, -1), (100, 0.5, 500, 0, -1)])
def test_random_sample_counts(num, frac, num_pos, num_neg, ub):
    r = make_assign(num_pos, num_neg, 37)
    s = random_sample(r, num, frac, neg_pos_ub=ub, generator=torch.Generator().manual_seed(1))
    exp_pos = min(num_pos, int(num * frac))
    exp_neg = min(num_neg, num - exp_pos)
    if ub >= 0: exp_neg = min(exp_neg, int(ub * max(1, exp_pos)))
    assert len(s.pos_inds) == exp_pos and len(s.neg_inds) == exp_neg
    assert (r.gt_inds[s.pos_inds] > 0).all() and (r.gt_inds[s.neg_inds] == 0).all()
    assert s.pos_inds.tolist() == sorted(set(s.pos_inds.tolist())) and s.neg_inds.tolist() == sorted(set(s.neg_inds.tolist()))
    assert (s.pos_gt_inds == r.gt_inds[s.pos_inds] - 1).all()


def test_random_sample_reproducible_and_uniform():
    r = make_assign(40, 400, 0)
    a = random_sample(r, 64, 0.25, generator=torch.Generator().manual_seed(3))
    b = random_sample(r, 64, 0.25, generator=torch.Generator().manual_seed(3))
    assert a.pos_inds.tolist() == b.pos_inds.tolist() and a.neg_inds.tolist() == b.neg_inds.tolist()
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(len(r.gt_inds))
    for _ in range(400): hits[random_sample(r, 64, 0.25, generator=gen).pos_inds] += 1
    freq = hits[r.pos_inds] / 400  # each positive is picked with probability 16/40
    assert (freq - 0.4).abs().max() < 0.12


def test_pseudo_sample_takes_all_but_ignored():
    r = make_assign(13, 70, 17)
    s = pseudo_sample(r)
    assert s.pos_inds.tolist() == r.pos_inds.tolist() and s.neg_inds.tolist() == r.neg_inds.tolist()
    assert len(s.pos_inds) == 13 and len(s.neg_inds) == 70


def test_add_gt_as_proposals():
    priors = torch.tensor([[0., 0., 10., 10.], [5., 5., 15., 15.], [40., 40., 50., 50.]])
    gts, labels = torch.tensor([[1., 1., 10., 10.], [39., 40., 50., 50.]]), torch.tensor([4, 7])
    res = max_iou_assign(priors, gts, labels, **RCNN)
    new_priors, new = add_gt_as_proposals(priors, gts, labels, res)
    assert torch.equal(new_priors[:2], gts) and torch.equal(new_priors[2:], priors)
    assert new.gt_inds.tolist() == [1, 2] + res.gt_inds.tolist()
    assert new.labels.tolist() == [4, 7] + res.labels.tolist()
    assert new.max_overlaps[:2].tolist() == [1.0, 1.0] and new.num_gts == 2
    assert res.gt_inds.shape == (3,)  # the input is left alone
    s = random_sample(new, 512, 0.25, generator=torch.Generator().manual_seed(0))
    assert s.pos_inds[:2].tolist() == [0, 1] and s.pos_gt_inds[:2].tolist() == [0, 1]
    same_priors, same = add_gt_as_proposals(priors, gts[:0], labels[:0], res)
    assert same_priors is priors and same is res

# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    p, gts, labels = torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="priors_xyxy"): max_iou_assign(torch.zeros(3, 5), gts, labels, **RPN)
    with pytest.raises(ValueError, match="gt_labels"): max_iou_assign(p, gts, labels[:1], **RPN)
    with pytest.raises(ValueError, match="gt_xyxy"): atss_assign(p, [3], torch.zeros(2), labels)
    with pytest.raises(ValueError, match="num_level_priors"): atss_assign(p, [2], gts, labels)
    with pytest.raises(ValueError, match="pos_fraction"): random_sample(make_assign(1, 1, 0), 10, 1.5)
    logits, boxes = torch.zeros(2, 4, 3), torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="pred_boxes_cxcywh"): hungarian_match_batch(logits, boxes[:, :3], [labels] * 2, [gts] * 2, [(8, 8)] * 2)
    with pytest.raises(ValueError, match="img_hw"): hungarian_match_batch(logits, boxes, [labels] * 2, [gts] * 2, [(8, 8)])
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.full((4, 3), float("nan")), boxes[0], labels, gts, (8, 8))


@pytest.mark.cuda
def test_matcher_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    logits, boxes = rand_preds(g, 2, 300, 80)
    gts = [rand_gt_cxcywh(g, n, 80) for n in (50, 7)]
    args = ([l for l, _ in gts], [b for _, b in gts], [(800, 1216), (640, 640)])
    cpu = hungarian_match_batch(logits, boxes, *args)
    gpu = hungarian_match_batch(logits.cuda(), boxes.cuda(), [l.cuda() for l in args[0]], [b.cuda() for b in args[1]], args[2])
    for a, b in zip(cpu, gpu):
        assert b.gt_inds.is_cuda and a.gt_inds.tolist() == b.gt_inds.cpu().tolist()
