"""codetr.heads.rpn and codetr.heads.roi (auxiliary head 0: RPN + RoI head) against naive references and hand-computed cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torchvision.ops import box_iou as tv_box_iou, generalized_box_iou as tv_giou, nms as tv_nms, roi_align

from codetr.ops.anchors import CO_DEF_STRIDES, roi_box_coder, rpn_box_coder
from codetr.heads.rpn import (RCNN_SAMPLING, RPN_SAMPLING, RPN_TRAIN_PROPOSALS, MaxIoUSampling, ProposalCfg, RPNHead,
                        assign_and_sample, flatten_levels, rpn_loss, rpn_proposals_single, rpn_targets_single)
import codetr.heads.roi as roi_module
from codetr.heads.roi import (RCNNTestCfg, RoIHead, RPNRoIHead, Shared2FCBBoxHead, boxes_to_rois, multiclass_nms,
                            rcnn_loss, rcnn_positive_coords, roi_extract, roi_levels,
                            sample_rois)

K = 3  # classes in most tests
LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0", "acc0"}


def make_pyramid(batch=2, hw=(96, 128), channels=256, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, channels, math.ceil(hw[0] / s), math.ceil(hw[1] / s), generator=g)
            for s in CO_DEF_STRIDES]
    return [m.requires_grad_() for m in maps] if requires_grad else maps


def make_targets(boxes_per_image, labels_per_image):
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor(l, dtype=torch.long).reshape(-1)}
            for b, l in zip(boxes_per_image, labels_per_image)]


def small_head(channels=32, num_classes=K):
    "A narrow head (same code, fewer channels) so that the slower tests stay fast on a CPU."
    return RPNRoIHead(num_classes, channels, RPNHead(channels, channels), RoIHead(num_classes, channels))


TARGETS = make_targets([[[10, 12, 60, 70], [50, 20, 120, 90]], [[5, 5, 40, 30]]], [[0, 2], [1]])
SIZES = [(96, 128), (80, 100)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- shapes and layout

def test_rpn_shapes_and_init():
    rpn = RPNHead()
    logits, deltas = rpn(make_pyramid())
    assert [tuple(l.shape) for l in logits] == [(2, 9, 12, 16), (2, 9, 6, 8), (2, 9, 3, 4), (2, 9, 2, 2), (2, 9, 1, 1)]
    assert [d.shape[1] for d in deltas] == [36] * 5
    sd = {k: tuple(v.shape) for k, v in rpn.state_dict().items()}
    assert sd == {"rpn_conv.weight": (256, 256, 3, 3), "rpn_conv.bias": (256,), "rpn_cls.weight": (9, 256, 1, 1),
                  "rpn_cls.bias": (9,), "rpn_reg.weight": (36, 256, 1, 1), "rpn_reg.bias": (36,)}
    for conv in (rpn.rpn_conv, rpn.rpn_cls, rpn.rpn_reg):
        assert abs(conv.weight.std().item() - 0.01) < 0.002 and conv.bias.abs().max() == 0


def test_flatten_levels_matches_anchor_order():
    "Row i of the flattened outputs belongs to anchor i of grid_priors: check with channel and location codes."
    rpn = RPNHead()
    pyr = make_pyramid(batch=1)
    anchors = torch.cat(rpn.anchors(pyr))
    maps = []
    for lvl, p in enumerate(pyr):
        H, W = p.shape[-2:]
        a = torch.arange(9.)[:, None, None]
        y, x = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
        maps.append((lvl * 1e6 + y * 1e4 + x * 10 + a)[None].float())  # (1, 9, H, W) code level, y, x, anchor
    code = flatten_levels(maps, 1)[0, :, 0]
    gen_ = rpn.anchor_generator
    expected = []
    for lvl, p in enumerate(pyr):
        H, W = p.shape[-2:]
        for y in range(H):
            for x in range(W):
                for a in range(9): expected.append(lvl * 1e6 + y * 1e4 + x * 10 + a)
    assert torch.equal(code, torch.tensor(expected, dtype=torch.float32))
    # and the anchor of row (level 1, y=2, x=3, a=4) is centred on (3 * 16, 2 * 16)
    i = len(rpn.anchors(pyr)[0]) + (2 * pyr[1].shape[-1] + 3) * 9 + 4
    ctr = (anchors[i, :2] + anchors[i, 2:]) / 2
    assert torch.allclose(ctr, torch.tensor([48., 32.]))
    assert gen_.strides == CO_DEF_STRIDES


def test_box_head_shapes_and_init():
    bh = Shared2FCBBoxHead(80)
    logits, deltas = bh(torch.randn(5, 256, 7, 7))
    assert logits.shape == (5, 81) and deltas.shape == (5, 320)
    assert abs(bh.fc_cls.weight.std().item() - 0.01) < 1e-3 and abs(bh.fc_reg.weight.std().item() - 0.001) < 1e-4
    bound = math.sqrt(6 / (12544 + 1024))
    assert bh.shared_fcs[0].weight.abs().max() <= bound and bh.shared_fcs[0].weight.abs().max() > 0.9 * bound
    assert all(m.bias.abs().max() == 0 for m in (bh.shared_fcs[0], bh.shared_fcs[1], bh.fc_cls, bh.fc_reg))


def test_forward_train_shapes_keys_finite():
    head = RPNRoIHead(K)
    with torch.no_grad():
        losses, pc = head.forward_train(make_pyramid(), TARGETS, SIZES, (96, 128), generator=gen())
    assert set(losses) == LOSS_KEYS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    B, N = pc.labels.shape
    assert B == 2 and 0 < N <= 512 and pc.coords_xyxy.shape == (2, N, 4) and pc.targets_xyxy.shape == (2, N, 4)
    assert pc.feats.shape == (2, N, 256) and pc.head_index == 0 and pc.labels.dtype == torch.long
    assert 0 <= losses["acc0"] <= 100


def test_official_state_dict_names():
    head = RPNRoIHead(80)
    keys = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert keys["roi_head.bbox_head.shared_fcs.0.weight"] == (1024, 12544)
    assert keys["roi_head.bbox_head.fc_reg.weight"] == (320, 1024)
    assert keys["rpn_head.rpn_reg.weight"] == (36, 256, 1, 1)
    assert len(keys) == 6 + 8


def test_bad_inputs_name_the_argument():
    head = small_head()
    with pytest.raises(ValueError, match="pyramid"):
        head.forward_train(make_pyramid(channels=16), TARGETS, SIZES)
    with pytest.raises(ValueError, match="one target and one img_size"):
        head.forward_train(make_pyramid(channels=32), TARGETS, SIZES[:1])
    with pytest.raises(ValueError, match="proposals"):
        head.roi_head.forward_train(make_pyramid(channels=32), [torch.zeros(0, 4)], TARGETS)
    with pytest.raises(ValueError, match="num_classes"):
        RPNRoIHead(4, 32, RPNHead(32, 32), RoIHead(3, 32))


# ---------------------------------------------------------------- RPN targets, loss and proposals

def test_rpn_sampler_counts_and_labels():
    rpn = RPNHead()
    pyr = make_pyramid(batch=1, hw=(256, 256))
    anchors = torch.cat(rpn.anchors(pyr))
    gt = torch.tensor([[10., 10., 50., 50.], [60., 40., 200., 180.], [100., 100., 140., 250.]])
    t = rpn_targets_single(anchors, torch.ones(len(anchors), dtype=torch.bool), gt, generator=gen())
    assert len(t.pos_inds) <= 128 and len(t.pos_inds) + len(t.neg_inds) == 256
    assert torch.equal((t.labels == 0).nonzero().squeeze(1), t.pos_inds)
    assert t.label_weights.sum() == 256 and t.bbox_weights[:, 0].sum() == len(t.pos_inds)
    iou = tv_box_iou(anchors, gt).max(1).values
    assert (iou[t.neg_inds] < 0.3).all()
    assert (iou[t.pos_inds] >= 0.3).all()  # >= 0.7, or a gt's best anchor (min_pos_iou 0.3)
    # deltas of positives decode back to their gt box
    dec = rpn_box_coder().decode(anchors[t.pos_inds], t.deltas[t.pos_inds])
    best = tv_box_iou(dec, gt).max(1).values
    assert (best > 0.999).all()


def test_rpn_invalid_anchors_outside_own_image():
    "Anchors on grid cells beyond an image's own size (batch padding) are neither positive nor negative."
    rpn = RPNHead()
    pyr = make_pyramid(batch=2, hw=(96, 128))
    anchors = rpn.anchors(pyr)
    tg = make_targets([[[10, 10, 60, 60]], [[10, 10, 40, 40]]], [[0], [1]])
    ts = rpn.get_targets(pyr, anchors, tg, [(96, 128), (40, 48)], gen())
    flat = torch.cat(anchors)
    sampled = torch.cat([ts[1].pos_inds, ts[1].neg_inds])
    # on level 0 (stride 8), a (40, 48) image has ceil(40/8) x ceil(48/8) = 5 x 6 valid cells
    n0 = len(anchors[0])
    lvl0 = sampled[sampled < n0]
    y, x = (lvl0 // 9) // 16, (lvl0 // 9) % 16
    assert (y < 5).all() and (x < 6).all()
    assert (flat[sampled, :2] < torch.tensor([48., 40.])).all()  # anchor centre offsets 0: x1 < w, y1 < h


def test_rpn_loss_against_manual():
    g = gen(1)
    A = 500
    logits, deltas = torch.randn(2, A, 1, generator=g), torch.randn(2, A, 4, generator=g)
    anchors = torch.rand(A, 2, generator=g).repeat(1, 2) * 100 + torch.tensor([0., 0., 20., 20.])
    gt = torch.tensor([[10., 10., 40., 40.], [50., 50., 90., 100.]])
    ts = [rpn_targets_single(anchors, torch.ones(A, dtype=torch.bool), gt, generator=g),
          rpn_targets_single(anchors, torch.ones(A, dtype=torch.bool), gt[:0], generator=g)]
    out = rpn_loss(logits, deltas, ts)
    n = sum(len(t.pos_inds) + len(t.neg_inds) for t in ts)
    bce = sum(F.binary_cross_entropy_with_logits(logits[b, torch.cat([t.pos_inds, t.neg_inds]), 0],
                                                  (t.labels[torch.cat([t.pos_inds, t.neg_inds])] == 0).float(),
                                                  reduction="sum") for b, t in enumerate(ts))
    l1 = sum((deltas[b, t.pos_inds] - t.deltas[t.pos_inds]).abs().sum() for b, t in enumerate(ts))
    assert torch.allclose(out["loss_rpn_cls"], 12 * bce / n, rtol=1e-5)
    assert torch.allclose(out["loss_rpn_bbox"], 12 * l1 / n, rtol=1e-5)


def naive_proposals(logits, deltas, anchors, img_hw, cfg):
    "Per level: sort, keep nms_pre, decode, clip, drop empty, NMS with torchvision per level; merge by score."
    coder = rpn_box_coder()
    boxes, scores = [], []
    for l, d, a in zip(logits, deltas, anchors):
        s = l.sigmoid()
        order = s.argsort(descending=True)[:cfg.nms_pre]
        b = coder.decode(a[order], d[order], max_hw=img_hw)
        s = s[order]
        ok = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
        b, s = b[ok], s[ok]
        keep = tv_nms(b, s, cfg.iou_thr)
        boxes.append(b[keep]); scores.append(s[keep])
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    order = scores.argsort(descending=True)[:cfg.max_per_img]
    return boxes[order], scores[order]


@pytest.mark.parametrize("cfg", [ProposalCfg(4000, 1000, 0.7), ProposalCfg(50, 60, 0.5), ProposalCfg(10, 1000, 0.7)])
def test_proposals_against_naive(cfg):
    rpn = RPNHead()
    pyr = make_pyramid(batch=1, hw=(64, 96), seed=3)
    with torch.no_grad():
        logits, deltas = rpn(pyr)
        for conv_out in deltas: conv_out.mul_(30)  # spread the boxes so NMS has work to do
    anchors = rpn.anchors(pyr)
    lg = [l[0].permute(1, 2, 0).reshape(-1) for l in logits]
    dl = [d[0].permute(1, 2, 0).reshape(-1, 4) for d in deltas]
    boxes, scores = rpn_proposals_single(lg, dl, anchors, (60, 90), cfg)
    ref_boxes, ref_scores = naive_proposals(lg, dl, anchors, (60, 90), cfg)
    assert torch.allclose(scores, ref_scores) and torch.allclose(boxes, ref_boxes)
    assert (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 60).all() and (boxes >= 0).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all() and len(boxes) <= cfg.max_per_img


def test_proposals_are_detached_and_clipped():
    head = small_head()
    pyr = make_pyramid(channels=32, requires_grad=True)
    _, proposals = head.rpn_head.forward_train(pyr, TARGETS, SIZES, gen())
    for p, (h, w) in zip(proposals, SIZES):
        assert not p.requires_grad and p.grad_fn is None
        assert len(p) <= 1000 and (p[:, 2] <= w).all() and (p[:, 3] <= h).all()


# ---------------------------------------------------------------- RoI levels and RoIAlign

@pytest.mark.parametrize("side,level", [(1, 0), (56, 0), (111.9, 0), (112, 0), (223.9, 0), (224, 1), (447.9, 1),
                                        (448, 2), (895.9, 2), (896, 3), (5000, 3)])
def test_roi_level_by_hand(side, level):
    assert roi_levels(torch.tensor([[0., 0., side, side]])).item() == level


def test_roi_level_rectangles():
    # sqrt(w h) decides: 112 x 448 has scale 224 -> level 1; 50 x 2000 has scale 316 -> level 1
    rois = torch.tensor([[0., 0., 112., 448.], [10., 10., 60., 2010.], [0., 0., 1000., 1000.]])
    assert roi_levels(rois).tolist() == [1, 1, 3]
    assert roi_levels(rois, finest_scale=56, num_levels=5).tolist() == [2, 2, 4]


def naive_roi_align(fmap, roi, out=7, scale=1.0):
    "Loop reference of RoIAlign (aligned=True, sampling_ratio=0, average) on a (C, H, W) numpy map."
    C, H, W = fmap.shape
    x1, y1, x2, y2 = [v * scale - 0.5 for v in roi]
    rw, rh = x2 - x1, y2 - y1
    bw, bh = rw / out, rh / out
    gh, gw = math.ceil(rh / out), math.ceil(rw / out)
    res = np.zeros((C, out, out))

    def bilinear(y, x):
        if y < -1 or y > H or x < -1 or x > W: return np.zeros(C)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= H - 1: y0 = y1_ = H - 1; y = float(y0)
        else: y1_ = y0 + 1
        if x0 >= W - 1: x0 = x1_ = W - 1; x = float(x0)
        else: x1_ = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1_]
                + ly * (1 - lx) * fmap[:, y1_, x0] + ly * lx * fmap[:, y1_, x1_])

    for i in range(out):
        for j in range(out):
            acc = np.zeros(C)
            for iy in range(gh):
                for ix in range(gw):
                    acc += bilinear(y1 + i * bh + (iy + 0.5) * bh / gh, x1 + j * bw + (ix + 0.5) * bw / gw)
            res[:, i, j] = acc / max(gh * gw, 1)
    return res


@pytest.mark.parametrize("roi", [[0., 0., 32., 32.], [3.3, 5.1, 17.8, 9.2], [-6., -4., 10., 40.],
                                 [20., 20., 31.5, 31.9], [1., 2., 70., 3.], [0., 0., 2., 2.]])
def test_roi_align_against_naive_bilinear(roi):
    g = gen(5)
    fmap = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64)
    got = roi_extract([fmap], torch.tensor([[0.] + roi], dtype=torch.float64), strides=(8,))[0]
    ref = naive_roi_align(fmap[0].numpy(), roi, scale=1 / 8)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-9)


def test_roi_extract_routes_levels_and_images():
    g = gen(6)
    feats = [torch.randn(2, 4, 64 // 2 ** l, 64 // 2 ** l, generator=g) for l in range(4)]
    strides = (8, 16, 32, 64)
    rois = torch.tensor([[0, 0, 0, 50, 50], [1, 10, 10, 300, 300], [1, 0, 0, 500, 500], [0, 0, 0, 511, 511],
                         [1, 5, 5, 15, 15]], dtype=torch.float32)
    out = roi_extract(feats, rois, strides)
    for r, lvl in zip(rois, roi_levels(rois[:, 1:]).tolist()):
        ref = roi_align(feats[lvl], r[None], 7, 1 / strides[lvl], sampling_ratio=0, aligned=True)
        row = (rois == r).all(1).nonzero().item()
        assert torch.allclose(out[row], ref[0])
    assert roi_levels(rois[:, 1:]).tolist() == [0, 1, 2, 2, 0]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=3), st.integers(0, 10**6))
def test_roi_extract_batched_equals_per_image(counts, seed):
    g = gen(seed)
    B = len(counts)
    feats = [torch.randn(B, 3, 32 // 2 ** l, 32 // 2 ** l, generator=g) for l in range(4)]
    boxes = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 200
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 400 + 1], 1))
    together = roi_extract(feats, boxes_to_rois(boxes), (8, 16, 32, 64))
    alone = [roi_extract([f[b:b + 1] for f in feats], boxes_to_rois([boxes[b]]), (8, 16, 32, 64)) for b in range(B)]
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)


# ---------------------------------------------------------------- the RoI head with RoIAlign's CPU path

def test_roi_head_losses_and_gradients_unchanged_by_the_cpu_path(monkeypatch):
    "The RoI head's losses and gradients (pyramid and weights) with the CPU path equal those with torchvision's."
    def run():
        torch.manual_seed(0)
        head = small_head()
        pyr = make_pyramid(channels=32, requires_grad=True)
        losses, pc = head.forward_train(pyr, TARGETS, SIZES, generator=gen(7))
        (sum(v for k, v in losses.items() if "loss" in k) + pc.feats.sum()).backward()
        return losses, [p.grad for p in pyr] + [p.grad for p in head.parameters()]
    ours = run()
    monkeypatch.setattr(roi_module, "roi_align_fast", lambda *a: roi_align(*a))
    theirs = run()
    for k in ours[0]: torch.testing.assert_close(ours[0][k], theirs[0][k], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], theirs[1]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- RoI sampling and positive coordinates

def crowded_proposals(gt, n_near=400, n_far=600, seed=0):
    g = gen(seed)
    near = gt[torch.randint(len(gt), (n_near,), generator=g)] + torch.randn(n_near, 4, generator=g) * 3
    xy = torch.rand(n_far, 2, generator=g) * 300
    far = torch.cat([xy, xy + 10 + torch.rand(n_far, 2, generator=g) * 30], 1)
    return torch.cat([near, far])


def test_rcnn_sampler_counts_and_order():
    gt = torch.tensor([[20., 20., 120., 140.], [150., 30., 260., 200.]])
    labels = torch.tensor([2, 0])
    s = sample_rois(crowded_proposals(gt), gt, labels, K, generator=gen())
    assert len(s.labels) == 512 and s.num_pos == 128  # 400 candidates near the gt: the cap binds
    assert (s.labels[:s.num_pos] < K).all() and (s.labels[s.num_pos:] == K).all()
    iou = tv_box_iou(s.boxes_xyxy, gt).max(1).values
    assert (iou[:s.num_pos] >= 0.5).all() and (iou[s.num_pos:] < 0.5).all()


def test_rcnn_sampler_few_proposals():
    gt = torch.tensor([[20., 20., 60., 60.]])
    props = torch.tensor([[22., 21., 61., 58.], [100., 100., 120., 130.], [0., 0., 10., 10.]])
    s = sample_rois(props, gt, torch.tensor([1]), K, generator=gen())
    assert len(s.labels) == 4 and s.num_pos == 2
    assert s.labels.tolist() == [1, 1, K, K]
    assert torch.equal(s.boxes_xyxy, torch.cat([gt, props]))


def test_assign_and_sample_matches_manual_pipeline():
    from codetr.ops.assigners import add_gt_as_proposals, max_iou_assign, random_sample
    gt = torch.tensor([[20., 20., 120., 140.]])
    props = crowded_proposals(gt, 50, 100)
    priors, s = assign_and_sample(props, gt, torch.tensor([0]), RCNN_SAMPLING, gen(3))
    a = max_iou_assign(props, gt, torch.tensor([0]), pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                       match_low_quality=False)
    pri2, a2 = add_gt_as_proposals(props, gt, torch.tensor([0]), a)
    s2 = random_sample(a2, 512, 0.25, generator=gen(3))
    assert torch.equal(priors, pri2) and torch.equal(s.pos_inds, s2.pos_inds) and torch.equal(s.neg_inds, s2.neg_inds)


def test_positive_coords_consistency():
    head = RPNRoIHead(K)
    gts = [torch.tensor([[10., 12., 60., 70.], [50., 20., 120., 90.]]), torch.tensor([[5., 5., 40., 30.]])]
    lbls = [torch.tensor([0, 2]), torch.tensor([1])]
    tg = [{"boxes": b, "labels": l} for b, l in zip(gts, lbls)]
    proposals = [crowded_proposals(gts[0], 200, 300, seed=1).clamp(0, 128),
                 crowded_proposals(gts[1], 30, 20).clamp(0, 100)]
    with torch.no_grad():
        _, pc = head.roi_head.forward_train(make_pyramid(), proposals, tg, gen())
    assert pc.labels.shape[1] == min(2000, len(proposals[1]) + 1)  # image 1 has 50 proposals + 1 gt, fewer than 512
    for b in range(2):
        pos = pc.positive_mask(K)[b]
        n_pos = int(pos.sum())
        assert pos[:n_pos].all() and not pos[n_pos:].any()  # positives first
        assert (pc.labels[b][~pos] == K).all() and (pc.targets_xyxy[b][~pos] == 0).all()
        match = (pc.targets_xyxy[b][pos][:, None] == gts[b][None]).all(-1)  # (P, G)
        assert (match.sum(1) == 1).all()  # every positive's target is one of the gt boxes
        assert torch.equal(pc.labels[b][pos], lbls[b][match.float().argmax(1)])
        iou = tv_box_iou(pc.coords_xyxy[b][pos], gts[b])[torch.arange(n_pos), match.float().argmax(1)]
        assert (iou >= 0.5 - 1e-6).all()
    assert not pc.coords_xyxy.requires_grad


def test_positive_coords_feats_are_mean_pooled_and_keep_grad():
    head = small_head()
    pyr = make_pyramid(channels=32, requires_grad=True)
    proposals = [torch.tensor([[0., 0., 50., 50.], [10., 20., 90., 80.]]), torch.tensor([[5., 5., 30., 30.]])]
    _, pc = head.roi_head.forward_train(pyr, proposals, TARGETS, gen())
    rows = torch.cat([pc.coords_xyxy[b] for b in range(2)])
    ref = roi_extract(pyr[:4], boxes_to_rois([pc.coords_xyxy[0], pc.coords_xyxy[1]]), (8, 16, 32, 64)).mean((2, 3))
    assert len(rows) == len(ref) and torch.allclose(pc.feats.reshape(-1, 32), ref, atol=1e-6)
    assert pc.feats.requires_grad
    g = torch.autograd.grad(pc.feats.sum(), pyr[:4], allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in g)


def test_positive_coords_cap():
    gt = torch.tensor([[20., 20., 90., 90.]])
    samples = [sample_rois(crowded_proposals(gt), gt, torch.tensor([0]), K, generator=gen())]
    feats = torch.randn(len(samples[0].labels), 8)
    assert rcnn_positive_coords(samples, feats, max_proposal=100).labels.shape == (1, 100)
    assert rcnn_positive_coords(samples, feats).labels.shape == (1, 512)


# ---------------------------------------------------------------- RoI loss

def test_rcnn_loss_against_manual():
    g = gen(7)
    R = 40
    logits, deltas = torch.randn(R, K + 1, generator=g), torch.randn(R, 4 * K, generator=g) * 0.5
    xy = torch.rand(R, 2, generator=g) * 100
    rois = torch.cat([xy, xy + 10 + torch.rand(R, 2, generator=g) * 50], 1)
    labels = torch.randint(0, K + 1, (R,), generator=g)
    gt = torch.where((labels < K)[:, None], rois + torch.randn(R, 4, generator=g) * 3, torch.zeros(R, 4))
    out = rcnn_loss(logits, deltas, rois, labels, gt)
    assert torch.allclose(out["loss_cls0"], 12 * F.cross_entropy(logits, labels))
    pos = labels < K
    dec = roi_box_coder().decode(rois, deltas).reshape(R, K, 4)[pos, labels[pos]]
    giou = torch.diag(tv_giou(dec, gt[pos]))
    assert torch.allclose(out["loss_bbox0"], 120 * (1 - giou).sum() / R, rtol=1e-5)  # over all R, not #pos
    assert torch.allclose(out["acc0"], (logits.argmax(1) == labels).float().mean() * 100)
    # decoding is unclipped: the chosen column is the gt class
    assert out["loss_bbox0"] > 0


def test_head_index_suffix():
    out = rcnn_loss(torch.randn(4, 3), torch.randn(4, 8), torch.tensor([[0., 0., 10., 10.]] * 4),
                    torch.tensor([0, 1, 2, 2]), torch.tensor([[0., 0., 9., 11.]] * 2 + [[0., 0., 0., 0.]] * 2),
                    head_index=3)
    assert set(out) == {"loss_cls3", "loss_bbox3", "acc3"}


# ---------------------------------------------------------------- gradients, empty targets, overfit

def test_gradients_reach_pyramid_from_every_loss():
    head = small_head()
    pyr = make_pyramid(channels=32, requires_grad=True)
    losses, _ = head.forward_train(pyr, TARGETS, SIZES, (96, 128), generator=gen())
    for k, v in losses.items():
        if "loss" not in k:
            assert not v.requires_grad
            continue
        grads = torch.autograd.grad(v, pyr, retain_graph=True, allow_unused=True)
        got = [g is not None and bool(g.abs().sum() > 0) for g in grads]
        if k.startswith("loss_rpn"): assert any(got), k
        else: assert any(got[:4]) and (grads[4] is None or grads[4].abs().sum() == 0), k
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pyr)
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("which", ["all", "one"])
def test_empty_targets(which):
    head = small_head()
    pyr = make_pyramid(channels=32, requires_grad=True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    tg = [empty, empty] if which == "all" else [empty, TARGETS[1]]
    losses, pc = head.forward_train(pyr, tg, SIZES, generator=gen())
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    if which == "all":
        assert losses["loss_rpn_bbox"] == 0 and losses["loss_bbox0"] == 0
        assert (pc.labels == K).all() and (pc.targets_xyxy == 0).all()
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert total.requires_grad
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in pyr if p.grad is not None)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_no_proposals_at_all():
    "An image with no proposals and no gt: zero RoIs, finite losses, an empty PositiveCoords."
    head = small_head()
    pyr = make_pyramid(batch=1, channels=32)
    tg = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses, pc = head.roi_head.forward_train(pyr, [torch.zeros(0, 4)], tg)
    assert all(torch.isfinite(v) for v in losses.values()) and pc.labels.shape == (1, 0)


def test_sampling_is_reproducible_with_a_generator():
    head = small_head()
    pyr = make_pyramid(channels=32)
    with torch.no_grad():
        a = head.forward_train(pyr, TARGETS, SIZES, generator=gen(11))
        b = head.forward_train(pyr, TARGETS, SIZES, generator=gen(11))
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and torch.equal(a[1].coords_xyxy, b[1].coords_xyxy)


def test_overfit_on_fixed_features():
    torch.manual_seed(0)
    head = small_head()
    pyr = make_pyramid(batch=1, channels=32, seed=2)
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    history = []
    for step in range(20):
        losses, _ = head.forward_train(pyr, TARGETS[:1], SIZES[:1], generator=gen(step))
        total = sum(v for k, v in losses.items() if "loss" in k)
        opt.zero_grad(); total.backward(); opt.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in losses.items()}})
    first, last = history[0], history[-1]
    assert last["total"] < 0.5 * first["total"], [h["total"] for h in history]
    for k in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0"): assert last[k] < first[k], k
    assert last["acc0"] > first["acc0"]


# ---------------------------------------------------------------- prediction

def test_multiclass_nms():
    boxes = torch.tensor([[[0., 0., 10., 10.], [0., 0., 10., 10.]], [[1., 1., 10., 10.], [50., 50., 60., 60.]]])
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.05]])
    out = multiclass_nms(boxes, scores, RCNNTestCfg(score_thr=0.1, iou_thr=0.5, max_per_img=10))
    assert out["labels"].tolist() == [0, 1] and torch.allclose(out["scores"], torch.tensor([0.9, 0.2]))
    out = multiclass_nms(boxes, scores, RCNNTestCfg(score_thr=0.0, iou_thr=0.5, max_per_img=2))
    assert len(out["boxes"]) == 2


def test_predict_format():
    head = small_head()
    pyr = make_pyramid(channels=32)
    dets = head.predict(pyr, SIZES)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, SIZES):
        assert set(d) == {"boxes", "scores", "labels"} and len(d["boxes"]) <= 100
        assert (d["boxes"][:, 2] <= w).all() and (d["boxes"][:, 3] <= h).all()
        assert ((d["labels"] >= 0) & (d["labels"] < K)).all() and (d["scores"][:-1] >= d["scores"][1:]).all()


@pytest.mark.cuda
def test_cuda_matches_cpu():
    head = small_head()
    pyr = make_pyramid(channels=32)
    with torch.no_grad():
        cpu, pc_cpu = head.forward_train(pyr, TARGETS, SIZES, generator=gen(4))
        dev = head.to("cuda")
        gpu, pc_gpu = dev.forward_train([p.cuda() for p in pyr], [{k: v.cuda() for k, v in t.items()} for t in TARGETS],
                                        SIZES, generator=gen(4))
    assert pc_gpu.feats.device.type == "cuda"
    for k in cpu: assert torch.allclose(cpu[k], gpu[k].cpu(), rtol=1e-3, atol=1e-3), k
