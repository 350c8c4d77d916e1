"""Tests of codetr.heads.detr: shapes, Hungarian losses against brute force, positive queries, aux losses, predict, keys."""
import itertools
import math

import pytest
import torch
import torchvision.ops as tvo

from codetr.ops.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from codetr.heads.detr import AuxQueries, CoDeformDETRHead, DETRHeadOutput
from codetr.heads.base import PositiveCoords
from codetr.models.detector import AuxPyramid
from codetr.transformer.deformable import CoDeformableTransformer

C, K = 32, 3
LEVEL_HW = [(8, 10), (4, 5)]


def small_head(Q=8, num_dec=2, levels=2, **kw):
    torch.manual_seed(0)
    tr = CoDeformableTransformer(C, num_heads=2, num_levels=levels, num_points=2, ffn_dims=64, num_encoder_layers=1,
                                 num_decoder_layers=num_dec)
    return CoDeformDETRHead(K, C, Q, num_feature_levels=levels, transformer=tr, **kw)


def batch(B=2, levels=LEVEL_HW, pad_rows=40):
    torch.manual_seed(1)
    feats = [torch.randn(B, C, h, w) for h, w in levels]
    H, W = levels[0][0] * 8, levels[0][1] * 8
    pad = torch.zeros(B, H, W, dtype=torch.bool)
    if B > 1: pad[1, pad_rows:] = True
    return feats, pad, [(H, W)] + [(pad_rows, W)] * (B - 1)


def targets_example():
    return [{"boxes": torch.tensor([[4., 6., 40., 30.], [50., 10., 78., 60.]]), "labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[10., 5., 30., 35.]]), "labels": torch.tensor([1])}]


# ------------------------------------------------------------------ forward, pyramid, gradients

def test_forward_shapes_and_pyramid():
    head, pyramid = small_head(), AuxPyramid(C, num_groups=8)
    feats, pad, _ = batch()
    out = head(feats, pad)
    S = sum(h * w for h, w in LEVEL_HW)
    assert out.all_logits.shape == (2, 2, 8, K) and out.all_boxes_cxcywh.shape == (2, 2, 8, 4)
    assert out.enc_logits.shape == (2, S, K) and out.enc_boxes_cxcywh.shape == (2, S, 4)
    assert out.pred_logits.shape == (2, 8, K) and out.pred_boxes.shape == (2, 8, 4)
    pyr = pyramid(out.state)
    assert [tuple(m.shape) for m in pyr] == [(2, C, 8, 10), (2, C, 4, 5), (2, C, 2, 3)]
    torch.testing.assert_close(pyr[0].flatten(2).transpose(1, 2), out.state.memory[:, :80])
    # the pyramid carries the encoder's gradient
    pyr[-1].sum().backward()
    assert head.transformer.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    assert pyramid.downsample[0].weight.grad.abs().sum() > 0


def test_four_levels_give_five_maps():
    levels = [(16, 16), (8, 8), (4, 4), (2, 2)]
    head = small_head(levels=4)
    feats, pad, _ = batch(1, levels)
    pyr = AuxPyramid(C, num_groups=8)(head(feats, pad).state)
    assert [m.shape[-2:] for m in pyr] == [torch.Size(s) for s in levels + [(1, 1)]]


def test_head_look_forward_twice():
    """The layer-1 box loss reaches reg_branches[0] through the non-detached reference; layer-1 features do not."""
    head = small_head()
    with torch.no_grad():  # give the zero-initialised last box layers a non-zero value so gradients flow
        for reg in head.reg_branches: reg[-1].weight.normal_(0, 0.01)
    feats, pad, _ = batch()
    out = head(feats, pad)
    w0 = head.reg_branches[0][-1].weight
    g = torch.autograd.grad(out.all_boxes_cxcywh[1].sum(), w0, retain_graph=True)[0]
    assert g.abs().sum() > 0
    g = torch.autograd.grad(out.state.hs[1].sum(), w0, allow_unused=True, retain_graph=True)[0]
    assert g is None or g.abs().sum() == 0
    # values: layer l predicts relative to the refined box of layer l-1
    ref = out.state.inter_references[0]
    expect = (head.reg_branches[1](out.state.hs[1]) + inverse_sigmoid(ref)).sigmoid()
    torch.testing.assert_close(out.all_boxes_cxcywh[1], expect)
    # layer 0 uses the detached initial reference: no gradient into the encoder's proposal branch from its boxes
    g = torch.autograd.grad(out.all_boxes_cxcywh[0].sum(), head.reg_branches[-1][-1].weight, allow_unused=True)[0]
    assert g is None or g.abs().sum() == 0


def test_init_and_errors():
    head = small_head()
    for cls in head.cls_branches: torch.testing.assert_close(cls.bias, torch.full((K,), -math.log(99)))
    for reg in head.reg_branches: assert reg[-1].weight.abs().sum() == 0 and reg[-1].bias.abs().sum() == 0
    with pytest.raises(ValueError, match="embed_dims"):
        CoDeformDETRHead(K, 64, 8, num_feature_levels=2, transformer=head.transformer)
    feats, pad, sizes = batch()
    out = head(feats, pad)
    with pytest.raises(ValueError, match="CoDeformDETRHead.loss: expected one target"):
        head.loss(out, targets_example()[:1], sizes)
    with pytest.raises(ValueError, match="pad_mask"):
        head(feats, pad[0])


# ------------------------------------------------------------------ Hungarian losses against brute force

def focal_cost(logits, labels, alpha=0.25, gamma=2.0, eps=1e-12):
    p = logits.sigmoid()[:, labels]
    return -(p + eps).log() * alpha * (1 - p) ** gamma + (1 - p + eps).log() * (1 - alpha) * p ** gamma


def brute_force_losses(logits, boxes, gt_xyxy, gt_labels, img_hw, num_pos_total):
    """Focal 2 / L1 5 / GIoU 2 of one image after an exhaustive search of the best one-to-one assignment."""
    Q, G = len(logits), len(gt_labels)
    h, w = img_hw
    whwh = torch.tensor([w, h, w, h], dtype=boxes.dtype)
    gt_cxcywh = box_xyxy_to_cxcywh(gt_xyxy / whwh)
    cost = (2 * focal_cost(logits, gt_labels) + 5 * torch.cdist(boxes, gt_cxcywh, p=1)
            - 2 * tvo.generalized_box_iou(box_cxcywh_to_xyxy(boxes) * whwh, gt_xyxy))  # (Q, G)
    best = min(itertools.permutations(range(Q), G), key=lambda qs: sum(cost[q, g].item() for g, q in enumerate(qs)))
    target = torch.zeros_like(logits)
    for g, q in enumerate(best): target[q, gt_labels[g]] = 1
    cls = tvo.sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="sum")
    q = list(best)
    l1 = (boxes[q] - gt_cxcywh).abs().sum()
    giou = tvo.generalized_box_iou_loss(box_cxcywh_to_xyxy(boxes[q]) * whwh, gt_xyxy, reduction="sum")
    n = max(num_pos_total, 1)
    return 2 * cls / n, 5 * l1 / n, 2 * giou / n


def fake_outputs(N=2, B=2, Q=4, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, B, Q, K, generator=g, requires_grad=True)
    boxes = torch.cat([torch.rand(N, B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(N, B, Q, 2, generator=g) * 0.4 + 0.1], -1)
    enc_logits = torch.randn(B, S, K, generator=g)
    enc_boxes = torch.cat([torch.rand(B, S, 2, generator=g) * 0.6 + 0.2, torch.rand(B, S, 2, generator=g) * 0.4 + 0.1], -1)
    return DETRHeadOutput(logits, boxes.requires_grad_(), enc_logits.requires_grad_(), enc_boxes.requires_grad_(), None)


@pytest.mark.parametrize("seed", range(4))
def test_hungarian_losses_equal_brute_force(seed):
    head = small_head()
    out = fake_outputs(seed=seed)
    tg = targets_example()
    sizes = [(64, 80), (40, 80)]
    losses = head.loss(out, tg, sizes)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_iou", "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou",
                           "enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"}
    num_pos = sum(len(t["labels"]) for t in tg)
    for layer, prefix in ((0, "d0."), (1, "")):
        expect = [sum(v) for v in zip(*[brute_force_losses(out.all_logits[layer, b].detach(),
                                                           out.all_boxes_cxcywh[layer, b].detach(), tg[b]["boxes"],
                                                           tg[b]["labels"], sizes[b], num_pos) for b in range(2)])]
        for name, e in zip(("loss_cls", "loss_bbox", "loss_iou"), expect):
            torch.testing.assert_close(losses[prefix + name].detach(), e, rtol=1e-4, atol=1e-5)
    enc = [sum(v) for v in zip(*[brute_force_losses(out.enc_logits[b].detach(), out.enc_boxes_cxcywh[b].detach(),
                                                    tg[b]["boxes"], torch.zeros_like(tg[b]["labels"]), sizes[b],
                                                    num_pos) for b in range(2)])]
    for name, e in zip(("enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"), enc):
        torch.testing.assert_close(losses[name].detach(), e, rtol=1e-4, atol=1e-5)


def test_empty_targets_finite_and_differentiable():
    head = small_head()
    feats, pad, sizes = batch()
    out = head(feats, pad)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)]
    losses = head.loss(out, empty, sizes)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_iou"] == 0 and losses["enc_loss_bbox"] == 0
    assert losses["loss_cls"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_official_key_set_with_six_layers():
    head = small_head(Q=4, num_dec=6)
    feats, pad, sizes = batch()
    losses = head.loss(head(feats, pad), targets_example(), sizes)
    names = ("loss_cls", "loss_bbox", "loss_iou")
    expected = set(names) | {f"d{l}.{n}" for l in range(5) for n in names} | {f"enc_{n}" for n in names}
    assert set(losses) == expected


# ------------------------------------------------------------------ customized positive queries

def positive_coords(labels, C_feat=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, N = labels.shape
    xy = torch.rand(B, N, 2, generator=g) * 40
    coords = torch.cat([xy, xy + 5 + torch.rand(B, N, 2, generator=g) * 30], -1)
    targets = (coords + torch.rand(B, N, 4, generator=g) * 3) * (labels < K)[..., None]
    return PositiveCoords(coords, labels, targets, torch.randn(B, N, C_feat, generator=g), head_index=1)


def rows_of(aux_rows, table):
    """Index of each row of aux_rows (R, D) in table (N, D) (exact match), -1 when absent."""
    eq = (aux_rows[:, None] == table[None]).all(-1)
    return torch.where(eq.any(1), eq.float().argmax(1), torch.tensor(-1))


@pytest.mark.parametrize("n_pos,N,M", [((0, 0), 20, 9), ((3, 5), 20, 9), ((12, 4), 30, 12), ((350, 10), 400, 300)])
def test_aux_query_count_rule(n_pos, N, M):
    head = small_head()
    labels = torch.full((2, N), K)
    for b, n in enumerate(n_pos): labels[b, :n] = torch.arange(n) % K
    aux = head.aux_queries(positive_coords(labels), [(64, 80), (48, 64)], torch.Generator().manual_seed(0))
    assert aux.coords_cxcywh.shape == (2, M, 4) and aux.labels.shape == (2, M) and aux.feats.shape == (2, M, C)
    assert aux.num_pos == [min(n, M) for n in n_pos]


@pytest.mark.parametrize("seed", range(3))
def test_aux_targets_equal_positive_coords(seed):
    head = small_head()
    g = torch.Generator().manual_seed(seed)
    N = 40
    labels = torch.where(torch.rand(2, N, generator=g) < 0.3, torch.randint(0, K, (2, N), generator=g), torch.tensor(K))
    labels[0, :12] = K  # image 0 has fewer positives: it gets padded
    pc = positive_coords(labels, seed=seed)
    sizes = [(64, 80), (48, 64)]
    aux = head.aux_queries(pc, sizes, torch.Generator().manual_seed(seed))
    M = aux.labels.shape[1]
    assert M == max(9, int(pc.positive_mask(K).sum(1).max()))
    for b, (h, w) in enumerate(sizes):
        whwh = torch.tensor([w, h, w, h], dtype=torch.float32)
        P = aux.num_pos[b]
        pos = pc.positive_mask(K)[b]
        assert P == int(pos.sum())
        idx = rows_of(aux.feats[b], pc.feats[b])  # which entry each query came from
        assert (idx >= 0).all()
        # positives: exactly the head's positives, once each, with their label and normalised cxcywh boxes
        assert sorted(idx[:P].tolist()) == pos.nonzero().squeeze(1).tolist()
        assert torch.equal(aux.labels[b, :P], pc.labels[b, idx[:P]])
        torch.testing.assert_close(aux.coords_cxcywh[b, :P], box_xyxy_to_cxcywh(pc.coords_xyxy[b, idx[:P]] / whwh))
        torch.testing.assert_close(aux.targets_cxcywh[b, :P], box_xyxy_to_cxcywh(pc.targets_xyxy[b, idx[:P]] / whwh))
        # padding: distinct negatives of the same image, background label, zero target, label weight 1, no box weight
        pad = idx[P:]
        assert (pc.labels[b, pad] == K).all() and len(set(pad.tolist())) == len(pad)
        torch.testing.assert_close(aux.coords_cxcywh[b, P:], box_xyxy_to_cxcywh(pc.coords_xyxy[b, pad] / whwh))
        assert (aux.labels[b, P:] == K).all() and (aux.targets_cxcywh[b, P:] == 0).all()
        assert (aux.label_weights[b] == 1).all()
        assert (aux.bbox_weights[b, :P] == 1).all() and (aux.bbox_weights[b, P:] == 0).all()
    assert not aux.coords_cxcywh.requires_grad


def test_aux_random_subset_above_cap_and_reproducible():
    head = small_head(max_pos_coords=10)
    labels = torch.full((1, 50), K); labels[0, :30] = 1
    pc = positive_coords(labels)
    a1 = head.aux_queries(pc, [(64, 80)], torch.Generator().manual_seed(3))
    a2 = head.aux_queries(pc, [(64, 80)], torch.Generator().manual_seed(3))
    idx = rows_of(a1.feats[0], pc.feats[0])
    assert a1.labels.shape == (1, 10) and (a1.labels == 1).all() and len(set(idx.tolist())) == 10
    assert (idx < 30).all() and sorted(idx.tolist()) != list(range(10))  # a random subset, not the first ten
    torch.testing.assert_close(a1.coords_cxcywh, a2.coords_cxcywh)


def test_aux_too_few_negatives_and_none():
    """Official quirk: fewer negatives than padding slots. We draw the remainder with replacement, or add dummies."""
    head = small_head()
    labels = torch.tensor([[0] * 9 + [K] * 3, [1] * 2 + [K] * 2 + [-1] * 8])  # image 1: 2 pos, 2 neg, M = 9
    pc = positive_coords(labels)
    aux = head.aux_queries(pc, [(64, 80), (64, 80)], torch.Generator().manual_seed(0))
    assert aux.labels.shape == (2, 9) and aux.num_pos == [9, 2]
    idx = rows_of(aux.feats[1], pc.feats[1])
    assert set(idx[2:].tolist()) == {2, 3}  # both negatives used, repeated
    assert (aux.label_weights == 1).all()
    # no negatives at all: dummy rows with zero weights and zero features
    labels = torch.tensor([[0, 1, 2, -1, -1]])
    aux = head.aux_queries(positive_coords(labels), [(64, 80)])
    assert aux.num_pos == [3] and aux.labels.shape == (1, 9)
    assert (aux.label_weights[0, 3:] == 0).all() and (aux.bbox_weights[0, 3:] == 0).all()
    assert (aux.feats[0, 3:] == 0).all() and (aux.labels[0, 3:] == K).all()
    torch.testing.assert_close(aux.coords_cxcywh[0, 3:], torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(6, 4))


def test_aux_without_features():
    head = small_head()
    labels = torch.full((2, 20), K); labels[:, :4] = 0
    pc = positive_coords(labels)
    pc.feats = None
    feats, pad, sizes = batch()
    out = head(feats, pad)
    losses = head.positive_query_loss(out, pc, sizes)
    assert all(torch.isfinite(v) for v in losses.values())


def test_aux_losses_keys_values_and_gradients():
    head = small_head(num_dec=2)
    feats, pad, sizes = batch()
    out = head(feats, pad)
    out.state.memory.retain_grad()
    labels = torch.full((2, 30), K); labels[0, [1, 5, 8]] = torch.tensor([0, 1, 2]); labels[1, :12] = 1
    pc = positive_coords(labels)
    pc.feats.requires_grad_()
    aux = head.aux_queries(pc, sizes, torch.Generator().manual_seed(0))
    logits, boxes = head.decode_positive_queries(out, aux)
    assert logits.shape == (2, 2, 12, K) and boxes.shape == (2, 2, 12, 4)
    assert aux.head_index == 1
    losses = head.positive_query_loss(out, pc, sizes, torch.Generator().manual_seed(0))  # the same draw again
    names = ("loss_cls", "loss_bbox", "loss_iou")
    assert set(losses) == {f"{n}_aux1" for n in names} | {f"d0.{n}_aux1" for n in names}
    # values: fixed targets, focal / L1 / GIoU normalised by the number of positives (15)
    n = 15
    whwh = torch.tensor([[80., 64, 80, 64]] * 12 + [[80., 40, 80, 40]] * 12)
    for layer, prefix in ((0, "d0."), (1, "")):
        lg, bx = logits[layer].detach().flatten(0, 1), boxes[layer].detach().flatten(0, 1)
        lab, tgt = aux.labels.flatten(), aux.targets_cxcywh.flatten(0, 1)
        onehot = torch.nn.functional.one_hot(lab, K + 1)[:, :K].float()
        pos = lab < K
        cls = 2 * tvo.sigmoid_focal_loss(lg, onehot, reduction="sum") / n
        l1 = 5 * (bx[pos] - tgt[pos]).abs().sum() / n
        giou = 2 * tvo.generalized_box_iou_loss(box_cxcywh_to_xyxy(bx[pos]) * whwh[pos],
                                                box_cxcywh_to_xyxy(tgt[pos]) * whwh[pos], reduction="sum") / n
        for name, e in zip(names, (cls, l1, giou)):
            torch.testing.assert_close(losses[f"{prefix}{name}_aux1"].detach(), e, rtol=1e-4, atol=1e-5)
    # gradients reach the encoder memory, the encoder itself, the head's features, and the aux-only modules
    sum(losses.values()).backward()
    tr = head.transformer
    assert out.state.memory.grad.abs().sum() > 0
    assert tr.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    assert pc.feats.grad.abs().sum() > 0
    for p in (tr.head_pos_embed.weight, tr.aux_pos_trans[1].weight, tr.pos_feats_trans[1].weight,
              head.cls_branches[0].weight, head.reg_branches[1][-1].weight):
        assert p.grad.abs().sum() > 0
    assert tr.aux_pos_trans[0].weight.grad is None and head.query_embedding.weight.grad is None


def test_aux_lambda_scales_losses():
    labels = torch.full((2, 20), K); labels[:, :3] = 2
    feats, pad, sizes = batch()
    vals = []
    for lam in (1.0, 0.5):
        head = small_head(lambda_1=lam)
        out = head(feats, pad)
        vals.append(head.positive_query_loss(out, positive_coords(labels), sizes, torch.Generator().manual_seed(0)))
    for k in vals[0]: torch.testing.assert_close(vals[1][k], 0.5 * vals[0][k])


# ------------------------------------------------------------------ predict

def test_predict_hand_case():
    head = small_head()
    Q = 3
    logits = torch.full((1, 1, Q, K), -10.)
    logits[0, 0, 2, 1], logits[0, 0, 0, 2], logits[0, 0, 2, 0] = 3., 2., 1.  # scores in this order
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.9, 0.2, 0.4, 0.2]]]])
    out = DETRHeadOutput(logits, boxes, None, None, None)
    dets = head.predict(out, [(100, 200)], [(50, 400)], top_k=3)
    assert len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}
    d = dets[0]
    torch.testing.assert_close(d["scores"], torch.tensor([3., 2., 1.]).sigmoid())
    assert d["labels"].tolist() == [1, 2, 0]
    # query 2: cxcywh (0.9, 0.2, 0.4, 0.2) in a 200x100 image: x 140..220 -> clamp 200, y 10..30; then x2, y/2
    q2 = torch.tensor([140., 10., 200., 30.]) * torch.tensor([2., 0.5, 2., 0.5])
    q0 = torch.tensor([80., 30., 120., 70.]) * torch.tensor([2., 0.5, 2., 0.5])
    torch.testing.assert_close(d["boxes"], torch.stack([q2, q0, q2]))
    assert head.predict(out, [(100, 200)], [(50, 400)], top_k=100)[0]["scores"].shape == (Q * K,)


def test_predict_batch_format():
    head = small_head()
    feats, pad, sizes = batch()
    dets = head.predict(head(feats, pad), sizes, [(128, 160), (80, 160)], top_k=5)
    for d, (h, w) in zip(dets, [(128, 160), (80, 160)]):
        assert d["boxes"].shape == (5, 4) and d["scores"].shape == (5,) and d["labels"].dtype == torch.long
        assert (d["boxes"] >= 0).all() and (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and not d["scores"].requires_grad


# ------------------------------------------------------------------ official parameter names and shapes

def test_official_head_keys_at_real_widths():
    head = CoDeformDETRHead(80)
    sd = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected = {"query_embedding.weight": (300, 256)}  # the pyramid's downsample is the detector's (AuxPyramid)
    for i in range(7):
        expected.update({f"cls_branches.{i}.weight": (80, 256), f"cls_branches.{i}.bias": (80,)})
        for j, (o, n) in zip((0, 2, 4), ((256, 256), (256, 256), (4, 256))):
            expected.update({f"reg_branches.{i}.{j}.weight": (o, n), f"reg_branches.{i}.{j}.bias": (o,)})
    head_keys = {k: v for k, v in sd.items() if not k.startswith("transformer.")}
    assert head_keys == expected
    aux = {"transformer.head_pos_embed.weight": (2, 1), "transformer.aux_pos_trans.0.weight": (512, 512),
           "transformer.aux_pos_trans.1.bias": (512,), "transformer.aux_pos_trans_norm.1.weight": (512,),
           "transformer.pos_feats_trans.0.weight": (256, 256), "transformer.pos_feats_norm.1.bias": (256,),
           "transformer.level_embeds": (4, 256), "transformer.pos_trans.weight": (512, 512),
           "transformer.enc_output_norm.weight": (256,)}
    assert all(sd[k] == v for k, v in aux.items())


def test_aux_empty_positive_coords():
    head = small_head()
    pc = PositiveCoords(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 4),
                        torch.zeros(2, 0, C))
    aux = head.aux_queries(pc, [(64, 80), (40, 80)])
    assert aux.labels.shape == (2, 9) and (aux.labels == K).all() and (aux.label_weights == 0).all()
    feats, pad, sizes = batch()
    losses = head.positive_query_loss(head(feats, pad), pc, sizes)
    assert all(v == 0 for v in losses.values())


@pytest.mark.cuda
def test_cuda_matches_cpu():
    head = small_head()
    feats, pad, sizes = batch()
    labels = torch.full((2, 20), K); labels[:, :5] = 1
    pc = positive_coords(labels)
    def run(h, dev):
        out = h(*([f.to(dev) for f in feats], pad.to(dev)))
        tg = [{k: v.to(dev) for k, v in t.items()} for t in targets_example()]
        pc_dev = PositiveCoords(*(t.to(dev) for t in (pc.coords_xyxy, pc.labels, pc.targets_xyxy, pc.feats)))
        losses = h.loss(out, tg, sizes)
        losses.update(h.positive_query_loss(out, pc_dev, sizes, torch.Generator().manual_seed(0)))
        return losses, h.predict(out, sizes, sizes)
    cpu_losses, cpu_dets = run(head, "cpu")
    gpu_losses, gpu_dets = run(head.cuda(), "cuda")
    for k, v in cpu_losses.items(): torch.testing.assert_close(gpu_losses[k].cpu(), v, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu_dets[0]["scores"].cpu(), cpu_dets[0]["scores"], rtol=1e-3, atol=1e-4)
