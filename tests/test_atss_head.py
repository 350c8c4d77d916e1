"""CoATSSHead: official keys and init, shapes, anchor validity, ATSS targets against `atss_assign`, losses against a
direct per-level computation, empty targets, gradients, Scale, the normalisers, inference, and an overfit."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st

import codetr.heads.atss as atss_head_module
from codetr.ops.anchors import roi_box_coder
from codetr.ops.assigners import atss_assign
from codetr.heads.atss import CoATSSHead, Scale, flatten_levels, image_valid_flags
from codetr.ops.losses import binary_cross_entropy, centerness_target, sigmoid_focal_loss
from codetr.heads.base import PositiveCoords

K = 3
STRIDES = (8, 16, 32, 64, 128)
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "These tensors are tiny: one intra-op thread is much faster than several on a shared CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_head(seed=0, **kw):
    torch.manual_seed(seed)
    return CoATSSHead(K, in_channels=32, feat_channels=32, num_groups=8, **kw)


def featmap_sizes(pad_hw):
    return [(math.ceil(pad_hw[0] / s), math.ceil(pad_hw[1] / s)) for s in STRIDES]


def make_pyramid(B, pad_hw, seed=0, C=32, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, h, w, generator=g).requires_grad_(grad) for h, w in featmap_sizes(pad_hw)]


def rand_targets(n, img_hw, seed, k=K):
    g = torch.Generator().manual_seed(seed)
    h, w = img_hw
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7]) + 6  # (n, 2)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)  # (n, 2)
    return {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, k, (n,), generator=g)}


def empty_target():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


# ---------------------------------------------------------------- independent oracles
def oracle_anchors(pad_hw):
    "Anchors written out by hand: square, side 8 * stride, centred on (x * stride, y * stride), level-major."
    out = []
    for s, (h, w) in zip(STRIDES, featmap_sizes(pad_hw)):
        ys, xs = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        c = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)  # (HW, 2)
        out.append(torch.cat([c - 4 * s, c + 4 * s], 1))
    return out


def oracle_valid(pad_hw, img_hw, divisor=1):
    "Brute force: cell (y, x) is valid when x * s < own padded width and y * s < own padded height."
    own_h = min(math.ceil(img_hw[0] / divisor) * divisor, pad_hw[0])
    own_w = min(math.ceil(img_hw[1] / divisor) * divisor, pad_hw[1])
    flags = []
    for s, (h, w) in zip(STRIDES, featmap_sizes(pad_hw)):
        flags += [y * s < own_h and x * s < own_w for y in range(h) for x in range(w)]
    return torch.tensor(flags)


def oracle_assignment(pad_hw, img_hw, target, k=K):
    "Labels (A,) and matched boxes (A, 4) from atss_assign on the valid anchors, mapped back by hand."
    levels = oracle_anchors(pad_hw)
    anchors = torch.cat(levels)
    valid = oracle_valid(pad_hw, img_hw)
    per_level = [int(v.sum()) for v in valid.split([len(a) for a in levels])]
    res = atss_assign(anchors[valid], per_level, target["boxes"], target["labels"], topk=9)
    labels = torch.full((len(anchors),), k, dtype=torch.long)
    boxes = torch.zeros(len(anchors), 4)
    idx = valid.nonzero().squeeze(1)
    for j, gi in enumerate(res.gt_inds.tolist()):
        if gi > 0:
            labels[idx[j]] = int(target["labels"][gi - 1])
            boxes[idx[j]] = target["boxes"][gi - 1]
    return anchors, labels, boxes, valid


def oracle_losses(head, pyramid, targets, img_sizes, pad_hw):
    "mmdet's computation, level by level, with codetr.ops.losses, torchvision's GIoU and torch's BCE."
    cls_maps, delta_maps, ctr_maps = head(pyramid)
    rows = [oracle_assignment(pad_hw, hw, t) for t, hw in zip(targets, img_sizes)]
    anchors = rows[0][0]
    labels = torch.stack([r[1] for r in rows])  # (B, A)
    boxes = torch.stack([r[2] for r in rows])  # (B, A, 4)
    weights = torch.stack([r[3] for r in rows]).float()  # (B, A)
    n_pos = max(sum(max(int((l < K).sum()), 1) for l in labels), 1)
    sizes = [h * w for h, w in featmap_sizes(pad_hw)]
    cls_loss = bbox_sum = ctr_loss = 0.0
    ctr_total = 0.0
    for lvl, (c, d, t, anc, lab, box, wt) in enumerate(zip(
            cls_maps, delta_maps, ctr_maps, anchors.split(sizes), labels.split(sizes, 1), boxes.split(sizes, 1),
            weights.split(sizes, 1))):
        c = c.permute(0, 2, 3, 1).reshape(-1, K)
        d = d.permute(0, 2, 3, 1).reshape(-1, 4)
        t = t.permute(0, 2, 3, 1).reshape(-1)
        anc = anc.repeat(len(pyramid[0]), 1)
        lab, box, wt = lab.reshape(-1), box.reshape(-1, 4), wt.reshape(-1)
        cls_loss = cls_loss + sigmoid_focal_loss(c, lab, wt, avg_factor=n_pos)
        p = lab < K
        if p.any():
            ct = centerness_target(anc[p], box[p])
            pred = roi_box_coder().decode(anc[p], d[p])
            giou = torchvision.ops.generalized_box_iou(pred, box[p]).diag()
            bbox_sum = bbox_sum + ((1 - giou) * ct).sum() / (1 + EPS32)
            ctr_loss = ctr_loss + F.binary_cross_entropy_with_logits(t[p], ct, reduction="sum") / (n_pos + EPS32)
            ctr_total += float(ct.sum())
    return {"loss_cls1": 12 * cls_loss, "loss_bbox1": 24 * bbox_sum / max(ctr_total, 1.0),
            "loss_centerness1": 12 * ctr_loss}


# ---------------------------------------------------------------- structure
def test_state_dict_matches_official_keys():
    head = CoATSSHead(80)
    expected = {"cls_convs.0.conv.weight": (256, 256, 3, 3), "cls_convs.0.gn.weight": (256,),
                "cls_convs.0.gn.bias": (256,), "reg_convs.0.conv.weight": (256, 256, 3, 3),
                "reg_convs.0.gn.weight": (256,), "reg_convs.0.gn.bias": (256,), "atss_cls.weight": (80, 256, 3, 3),
                "atss_cls.bias": (80,), "atss_reg.weight": (4, 256, 3, 3), "atss_reg.bias": (4,),
                "atss_centerness.weight": (1, 256, 3, 3), "atss_centerness.bias": (1,),
                **{f"scales.{i}.scale": () for i in range(5)}}
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected
    assert sum(p.numel() for p in head.parameters()) == 2 * (256 * 256 * 9 + 512) + 85 * (256 * 9 + 1) + 5


def test_co_dino_strides_give_six_scales():
    head = CoATSSHead(80, strides=(4, 8, 16, 32, 64, 128))
    assert [k for k in head.state_dict() if k.startswith("scales")] == [f"scales.{i}.scale" for i in range(6)]


def test_init():
    head = CoATSSHead(80)
    assert torch.allclose(head.atss_cls.bias, torch.full((80,), -math.log(99.0)))
    for conv in (head.cls_convs[0].conv, head.reg_convs[0].conv, head.atss_cls, head.atss_reg, head.atss_centerness):
        assert abs(conv.weight.std().item() - 0.01) < 1e-3 and abs(conv.weight.mean().item()) < 1e-3
    assert head.cls_convs[0].conv.bias is None
    assert (head.atss_reg.bias == 0).all() and (head.atss_centerness.bias == 0).all()
    assert all(s.scale.item() == 1.0 for s in head.scales)
    assert (head.cls_convs[0].gn.weight == 1).all() and head.cls_convs[0].gn.num_groups == 32


@pytest.mark.parametrize("B,pad_hw", [(1, (64, 64)), (2, (96, 130)), (3, (33, 200))])
def test_forward_shapes(B, pad_hw):
    head = small_head()
    cls_maps, delta_maps, ctr_maps = head(make_pyramid(B, pad_hw))
    for (h, w), c, d, t in zip(featmap_sizes(pad_hw), cls_maps, delta_maps, ctr_maps):
        assert c.shape == (B, K, h, w) and d.shape == (B, 4, h, w) and t.shape == (B, 1, h, w)
        assert d.dtype == torch.float32


def test_flatten_levels_is_level_major_row_major():
    maps = [torch.arange(2 * 3 * 4).view(1, 2, 3, 4), torch.arange(2).view(1, 2, 1, 1) + 100]
    flat = flatten_levels(maps)
    assert flat.shape == (1, 13, 2)
    assert flat[0, 5].tolist() == [5, 17]  # row 1, column 1 of level 0: channels 0 and 1
    assert flat[0, 12].tolist() == [100, 101]


def test_octave_base_scale_sets_the_anchor_size():
    head = small_head(octave_base_scale=4)
    tg = head.get_targets(featmap_sizes((64, 64)), [empty_target()], [(64, 64)])
    assert torch.equal(tg.anchors_xyxy[0], torch.tensor([-16., -16., 16., 16.]))  # 4 strides of 8


def test_pad_hw_is_optional():
    head = small_head()
    pad_hw, img_sizes = (96, 128), [(96, 128), (40, 50)]
    pyramid = make_pyramid(2, pad_hw)
    targets = [rand_targets(3, img_sizes[0], 0), rand_targets(2, img_sizes[1], 1)]
    with_pad, pc1 = head.forward_train(pyramid, targets, img_sizes, pad_hw)
    without, pc2 = head.forward_train(pyramid, targets, img_sizes)
    assert torch.equal(pc1.labels, pc2.labels)
    for k in with_pad: assert torch.equal(with_pad[k], without[k])


def test_towers_follow_stacked_convs():
    head = CoATSSHead(2, in_channels=32, feat_channels=64, num_groups=8, stacked_convs=3)
    assert len(head.cls_convs) == len(head.reg_convs) == 3
    assert head.cls_convs[0].conv.in_channels == 32 and head.cls_convs[2].conv.in_channels == 64


# ---------------------------------------------------------------- anchors and targets
@pytest.mark.parametrize("img_hw", [(96, 130), (40, 60), (1, 1), (81, 129)])
@pytest.mark.parametrize("divisor", [1, 32])
def test_valid_flags_match_brute_force(img_hw, divisor):
    head = small_head(pad_size_divisor=divisor)
    pad_hw = (96, 130)
    got = image_valid_flags(head, featmap_sizes(pad_hw), [img_hw], pad_hw)
    assert torch.equal(got[0], oracle_valid(pad_hw, img_hw, divisor))


def test_anchor_grid_matches_hand_written():
    head = small_head()
    tg = head.get_targets(featmap_sizes((70, 90)), [empty_target()], [(70, 90)], (70, 90))
    assert torch.equal(tg.anchors_xyxy, torch.cat(oracle_anchors((70, 90))))
    assert tg.num_level_anchors == [h * w for h, w in featmap_sizes((70, 90))]


@pytest.mark.parametrize("seed", range(4))
def test_positive_coords_equal_atss_assign(seed):
    head = small_head()
    pad_hw, img_sizes = (120, 160), [(120, 160), (75, 101), (120, 90)]
    targets = [rand_targets(n, hw, seed * 10 + i) for i, (n, hw) in enumerate(zip((5, 2, 0), img_sizes))]
    pyramid = make_pyramid(3, pad_hw, seed)
    _, pc = head.forward_train(pyramid, targets, img_sizes, pad_hw)
    assert isinstance(pc, PositiveCoords) and pc.head_index == head.head_index
    for b, (t, hw) in enumerate(zip(targets, img_sizes)):
        anchors, labels, boxes, _ = oracle_assignment(pad_hw, hw, t)
        assert torch.equal(pc.coords_xyxy[b], anchors)
        assert torch.equal(pc.labels[b], labels)
        assert torch.equal(pc.targets_xyxy[b], boxes)
    assert torch.equal(pc.feats, flatten_levels(pyramid))
    assert not pc.coords_xyxy.requires_grad


def test_positive_coords_batched_equal_one_by_one():
    head = small_head()
    pad_hw, img_sizes = (96, 128), [(96, 128), (60, 70)]
    targets = [rand_targets(4, img_sizes[0], 1), rand_targets(3, img_sizes[1], 2)]
    pyramid = make_pyramid(2, pad_hw, 3)
    _, pc = head.forward_train(pyramid, targets, img_sizes, pad_hw)
    for b in range(2):
        _, one = head.forward_train([p[b:b + 1] for p in pyramid], targets[b:b + 1], img_sizes[b:b + 1], pad_hw)
        assert torch.equal(one.labels[0], pc.labels[b]) and torch.equal(one.targets_xyxy[0], pc.targets_xyxy[b])


def test_positive_feats_carry_gradient():
    head = small_head()
    pyramid = make_pyramid(1, (64, 64), grad=True)
    _, pc = head.forward_train(pyramid, [rand_targets(2, (64, 64), 0)], [(64, 64)], (64, 64))
    pc.feats[0, 3].sum().backward()
    assert pyramid[0].grad.view(32, -1)[:, 3].abs().sum() > 0


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("seed", range(3))
def test_losses_match_direct_computation(seed):
    head = small_head(seed)
    with torch.no_grad():  # make the predictions less trivial than the init
        for p in head.parameters(): p.add_(torch.randn_like(p) * 0.05)
    pad_hw, img_sizes = (128, 160), [(128, 160), (100, 150)]
    targets = [rand_targets(4, img_sizes[0], seed), rand_targets(2, img_sizes[1], seed + 50)]
    pyramid = make_pyramid(2, pad_hw, seed)
    losses, _ = head.forward_train(pyramid, targets, img_sizes, pad_hw)
    expected = oracle_losses(head, pyramid, targets, img_sizes, pad_hw)
    assert set(losses) == {"loss_cls1", "loss_bbox1", "loss_centerness1"}
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
        assert torch.allclose(v, torch.as_tensor(expected[k]), rtol=1e-4, atol=1e-6), (k, v, expected[k])


def test_empty_image_counts_one_in_the_normaliser():
    head = small_head()
    pad_hw = (96, 96)
    pyramid = make_pyramid(2, pad_hw)
    t = rand_targets(3, pad_hw, 7)
    both, _ = head.forward_train(pyramid, [t, empty_target()], [pad_hw] * 2, pad_hw)
    expected = oracle_losses(head, pyramid, [t, empty_target()], [pad_hw] * 2, pad_hw)
    assert torch.allclose(both["loss_cls1"], expected["loss_cls1"], rtol=1e-5)


def test_empty_targets():
    head = small_head()
    pad_hw = (64, 96)
    pyramid = make_pyramid(2, pad_hw, grad=True)
    losses, pc = head.forward_train(pyramid, [empty_target()] * 2, [pad_hw, (40, 50)], pad_hw)
    assert losses["loss_bbox1"].item() == 0 and losses["loss_centerness1"].item() == 0
    assert losses["loss_cls1"].item() > 0 and all(torch.isfinite(v) for v in losses.values())
    assert all(v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in pyramid)
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    assert head.atss_reg.weight.grad is not None and head.scales[0].scale.grad is not None
    assert (pc.labels == K).all() and (pc.targets_xyxy == 0).all()


def test_focal_normaliser_for_all_empty_batch_is_two():
    head = small_head()
    pad_hw = (64, 64)
    pyramid = make_pyramid(2, pad_hw)
    losses, pc = head.forward_train(pyramid, [empty_target()] * 2, [pad_hw] * 2, pad_hw)
    cls = flatten_levels(head(pyramid)[0])
    direct = sigmoid_focal_loss(cls.reshape(-1, K), pc.labels.reshape(-1), reduction="sum") / (2 + EPS32)
    assert torch.allclose(losses["loss_cls1"], 12 * direct, rtol=1e-5)


def test_invalid_anchors_do_not_enter_the_class_loss():
    head = small_head()
    pad_hw, img_sizes = (96, 128), [(96, 128), (40, 50)]
    targets = [rand_targets(2, img_sizes[0], 0), rand_targets(2, img_sizes[1], 1)]
    tg = head.get_targets(featmap_sizes(pad_hw), targets, img_sizes, pad_hw)
    cls_maps, delta_maps, ctr_maps = head(make_pyramid(2, pad_hw))
    cls, deltas, ctr = flatten_levels(cls_maps), flatten_levels(delta_maps), flatten_levels(ctr_maps)[..., 0]
    base = head.loss(cls, deltas, ctr, tg)
    invalid = tg.label_weights == 0
    assert invalid[1].any() and not invalid[0].any()
    bumped = head.loss(cls + 5 * invalid[..., None], deltas, ctr, tg)
    assert torch.equal(base["loss_cls1"], bumped["loss_cls1"])
    assert (tg.labels[invalid] == K).all() and (tg.targets_xyxy[invalid] == 0).all()


def test_normalisers_go_through_reduce_mean(monkeypatch):
    "Another process with twice the positives and twice the centerness sum halves both loss parts."
    head = small_head()
    pad_hw = (96, 96)
    pyramid, targets = make_pyramid(1, pad_hw), [rand_targets(3, pad_hw, 4)]
    ref, _ = head.forward_train(pyramid, targets, [pad_hw], pad_hw)
    monkeypatch.setattr(atss_head_module, "reduce_mean", lambda x: x.detach() * 2)
    got, _ = head.forward_train(pyramid, targets, [pad_hw], pad_hw)
    for k in ref: assert torch.allclose(got[k], ref[k] / 2, rtol=1e-5), k


@pytest.mark.parametrize("weights", [dict(cls_weight=1.0, bbox_weight=2.0, centerness_weight=1.0),
                                     dict(cls_weight=0.0, bbox_weight=5.0, centerness_weight=3.0)])
def test_loss_weights_and_key_suffix(weights):
    pad_hw = (96, 96)
    pyramid, targets = make_pyramid(1, pad_hw), [rand_targets(3, pad_hw, 5)]
    ref, _ = small_head().forward_train(pyramid, targets, [pad_hw], pad_hw)
    got, _ = small_head(head_index=4, **weights).forward_train(pyramid, targets, [pad_hw], pad_hw)
    assert set(got) == {"loss_cls4", "loss_bbox4", "loss_centerness4"}
    for part, w, base in (("cls", "cls_weight", 12), ("bbox", "bbox_weight", 24), ("centerness", "centerness_weight", 12)):
        assert torch.allclose(got[f"loss_{part}4"], ref[f"loss_{part}1"] * weights[w] / base, rtol=1e-5)


def test_gradients_reach_the_pyramid_from_every_loss():
    head = small_head()
    pad_hw = (128, 128)
    pyramid = make_pyramid(2, pad_hw, grad=True)
    targets = [rand_targets(3, pad_hw, 0), rand_targets(2, pad_hw, 1)]
    losses, _ = head.forward_train(pyramid, targets, [pad_hw] * 2, pad_hw)
    for k, v in losses.items():
        grads = torch.autograd.grad(v, pyramid, retain_graph=True, allow_unused=True)
        assert all(g is not None for g in grads), k
        assert sum(g.abs().sum() for g in grads) > 0, k
    grads = torch.autograd.grad(losses["loss_cls1"], pyramid, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)  # every level takes part in the class loss


def test_scale_is_learnable():
    head = small_head()
    names = dict(head.named_parameters())
    assert all(names[f"scales.{i}.scale"].requires_grad for i in range(5))
    pad_hw = (128, 128)
    pyramid = make_pyramid(1, pad_hw)
    losses, pc = head.forward_train(pyramid, [rand_targets(3, pad_hw, 2)], [pad_hw], pad_hw)
    losses["loss_bbox1"].backward()
    level_of = torch.bucketize(pc.positive_mask(K)[0].nonzero().squeeze(1),
                               torch.tensor([h * w for h, w in featmap_sizes(pad_hw)]).cumsum(0), right=True)
    for lvl in range(5):
        g = head.scales[lvl].scale.grad
        assert (g != 0) if lvl in level_of.tolist() else (g == 0), lvl
    before = [d.detach() for d in head(pyramid)[1]]
    with torch.no_grad(): head.scales[2].scale.fill_(3.0)
    after = head(pyramid)[1]
    assert torch.allclose(after[2], 3 * before[2]) and torch.equal(after[1], before[1])
    s = Scale(0.5)
    (s(torch.tensor(4.0)) ** 2).backward()
    assert s.scale.grad.item() == pytest.approx(16.0)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 6), st.integers(40, 160), st.integers(40, 160))
def test_property_random_boxes(seed, n, h, w):
    head = small_head()
    pad_hw = (h, w)
    losses, pc = head.forward_train(make_pyramid(1, pad_hw, seed), [rand_targets(n, pad_hw, seed)], [pad_hw], pad_hw)
    assert all(torch.isfinite(v) for v in losses.values())
    pos = pc.positive_mask(K)[0]
    assert int(pos.sum()) <= 9 * 5 * n
    ctr = (pc.coords_xyxy[0, pos, :2] + pc.coords_xyxy[0, pos, 2:]) / 2
    tgt = pc.targets_xyxy[0, pos]
    assert ((ctr > tgt[:, :2]) & (ctr < tgt[:, 2:])).all()  # every positive's centre lies inside its box


# ---------------------------------------------------------------- errors
def test_errors_name_the_argument():
    head = small_head()
    pad_hw = (64, 64)
    pyr = make_pyramid(1, pad_hw)
    with pytest.raises(ValueError, match="expected 5"): head(pyr[:4])
    with pytest.raises(ValueError, match=r"pyramid\[0\]"): head([torch.zeros(1, 16, 8, 8)] + pyr[1:])
    bad = {"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([K])}
    with pytest.raises(ValueError, match="labels"): head.forward_train(pyr, [bad], [pad_hw], pad_hw)
    with pytest.raises(ValueError, match=r"1 images in the batch\), got 2"): head.forward_train(pyr, [empty_target()] * 2, [pad_hw] * 2, pad_hw)
    with pytest.raises(ValueError, match="one target and one img_size"): head.forward_train(pyr, [empty_target()], [pad_hw] * 2, pad_hw)
    with pytest.raises(ValueError, match="pad_hw"): head.forward_train(pyr, [empty_target()], [(70, 64)], pad_hw)
    with pytest.raises(ValueError, match="num_groups"): CoATSSHead(2, in_channels=30)
    with pytest.raises(ValueError, match="num_classes"): CoATSSHead(0)


# ---------------------------------------------------------------- inference
def oracle_predict(head, pyramid, img_hw, pad_hw, b=0):
    "Brute force over all (anchor, class) pairs, written from the mmdet description."
    cls_maps, delta_maps, ctr_maps = head(pyramid)
    boxes, scores, labels = [], [], []
    for anc, c, d, t in zip(oracle_anchors(pad_hw), cls_maps, delta_maps, ctr_maps):
        c = c[b].permute(1, 2, 0).reshape(-1, K).sigmoid()
        d = d[b].permute(1, 2, 0).reshape(-1, 4)
        t = t[b].reshape(-1).sigmoid()
        cand = [(float(c[i, k]), i, k) for i in range(len(c)) for k in range(K) if c[i, k] > head.score_thr]
        cand = sorted(cand, key=lambda x: -x[0])[:head.nms_pre]
        for s, i, k in cand:
            box = roi_box_coder().decode(anc[i:i + 1], d[i:i + 1])[0]
            box = torch.stack([box[0].clamp(0, img_hw[1]), box[1].clamp(0, img_hw[0]),
                               box[2].clamp(0, img_hw[1]), box[3].clamp(0, img_hw[0])])
            boxes.append(box); scores.append(s * float(t[i])); labels.append(k)
    boxes, scores, labels = torch.stack(boxes), torch.tensor(scores), torch.tensor(labels)
    keep = torchvision.ops.batched_nms(boxes, scores, labels, head.nms_iou)[:head.max_per_img]
    return boxes[keep], scores[keep], labels[keep]


PAD = (64, 96)


def test_untrained_head_predicts_nothing():
    head = small_head()
    dets = head.predict(make_pyramid(2, PAD), [PAD, (40, 40)])
    assert len(dets) == 2 and all(d["boxes"].shape == (0, 4) and d["labels"].dtype == torch.long for d in dets)


@pytest.mark.parametrize("nms_pre,max_per_img", [(1000, 100), (20, 100), (1000, 7)])
def test_predict_matches_brute_force(nms_pre, max_per_img):
    head = small_head(nms_pre=nms_pre, max_per_img=max_per_img)
    with torch.no_grad():
        head.atss_cls.weight.normal_(0, 0.05)
        head.atss_cls.bias.fill_(-1.0)
        head.atss_reg.weight.normal_(0, 0.05)
    pyramid = make_pyramid(1, PAD, 9)
    img_hw = (60, 90)
    with torch.no_grad():
        det = head.predict(pyramid, [img_hw])[0]
        boxes, scores, labels = oracle_predict(head, pyramid, img_hw, PAD)
    assert 0 < len(det["scores"]) <= max_per_img
    assert torch.allclose(det["scores"], scores, atol=1e-6)
    assert torch.equal(det["labels"], labels)
    assert torch.allclose(det["boxes"], boxes, atol=1e-4)


def test_predict_rescales_to_original_size():
    head = small_head()
    with torch.no_grad(): head.atss_cls.bias.fill_(1.0)
    pyramid = make_pyramid(2, PAD)
    with torch.no_grad():
        plain = head.predict(pyramid, [PAD, (50, 80)])
        big = head.predict(pyramid, [PAD, (50, 80)], orig_sizes=[(128, 192), (100, 40)])
    assert torch.allclose(big[0]["boxes"], plain[0]["boxes"] * 2)
    assert torch.allclose(big[1]["boxes"], plain[1]["boxes"] * torch.tensor([0.5, 2, 0.5, 2]))
    assert plain[1]["boxes"][:, 2].max() <= 80 and plain[1]["boxes"][:, 3].max() <= 50


# ---------------------------------------------------------------- overfit
def test_overfit_fixed_features():
    torch.manual_seed(0)
    head = small_head()
    pad_hw = (128, 128)
    pyramid = make_pyramid(1, pad_hw, 11)
    targets = [{"boxes": torch.tensor([[10., 14., 50., 60.], [60., 40., 120., 110.]]), "labels": torch.tensor([0, 2])}]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        losses, pc = head.forward_train(pyramid, targets, [pad_hw], pad_hw)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    last = {k: v.item() for k, v in losses.items()}
    assert last["loss_cls1"] < 0.1 * first["loss_cls1"], (first, last)
    assert last["loss_bbox1"] < 0.1 * first["loss_bbox1"], (first, last)
    # the centerness BCE cannot go below the entropy of its soft targets
    pos = pc.positive_mask(K)[0]
    ct = centerness_target(pc.coords_xyxy[0, pos], pc.targets_xyxy[0, pos])
    floor = 12 * binary_cross_entropy(torch.logit(ct.clamp(1e-6, 1 - 1e-6)), ct, reduction="sum") / max(int(pos.sum()), 1)
    assert last["loss_centerness1"] - floor < 0.1 * (first["loss_centerness1"] - floor), (first, last, floor)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    head = small_head()
    pad_hw = (96, 96)
    pyramid, targets = make_pyramid(2, pad_hw), [rand_targets(3, pad_hw, 0), rand_targets(1, pad_hw, 1)]
    ref, ref_pc = head.forward_train(pyramid, targets, [pad_hw] * 2, pad_hw)
    gpu_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    got, pc = head.cuda().forward_train([p.cuda() for p in pyramid], gpu_targets, [pad_hw] * 2, pad_hw)
    assert torch.equal(pc.labels.cpu(), ref_pc.labels)
    for k in ref: assert torch.allclose(got[k].cpu(), ref[k], rtol=1e-4), k
