"""Tests for codetr.workbench.explore without a browser: the helpers against pycocotools, scipy and brute force, every head's
positives against the assignment rules they must satisfy, the sampling hook against the op's reference
implementation, and loading a checkpoint (the widgets are tested in test_widgets.py)."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import linear_sum_assignment

from codetr.ops.assigners import match_cost
from codetr.ops.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh
from codetr.workbench.explore import (capture_sampling, class_counts, decoder_sampling, detect, explorer_model,
                            filter_detections, gt_view, head_assignments, open_dataset, show_assignments,
                            show_sampling)
from codetr.ops.msda import ms_deform_attn_reference
from codetr.engine.predict import Predictor, identity_class_mapping


@pytest.fixture(scope="module")
def env(explorer_env):
    work, synth, cfg = explorer_env["work"], explorer_env["synth"], explorer_env["cfg"]
    # the same images with the annotations of image 0 removed: an image without boxes
    data = json.loads(synth.val_json.read_text())
    first = min(i["id"] for i in data["images"])
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    (work / "empty.json").write_text(json.dumps(data))
    empty = open_dataset(synth.val_images, work / "empty.json", aug=cfg.aug)
    return dict(explorer_env, empty=empty)


@pytest.fixture(scope="module")
def asg(explorer_asg): return explorer_asg


# ---------------------------------------------------------------- data set browsing

def test_gt_view_matches_pycocotools(env):
    ds = env["ds"]
    for i in range(len(ds)):
        v = gt_view(ds, i)
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[ds.ids[i]]))
        expected = sorted((a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3],
                           ds.cat_id_to_label[a["category_id"]]) for a in anns)
        got = sorted(tuple(b) + (l,) for b, l in zip(v.boxes_xyxy.tolist(), v.labels.tolist()))
        np.testing.assert_allclose(np.array(got).reshape(-1, 5), np.array(expected).reshape(-1, 5), atol=1e-4)
        info = ds.coco.imgs[ds.ids[i]]
        assert v.image.shape == (info["height"], info["width"], 3) and v.image_id == info["id"]


@pytest.mark.parametrize("classes", [(), (0,), (1, 3), (0, 1, 2, 3, 4, 5)])
def test_gt_view_class_filter(env, classes):
    for i in range(len(env["ds"])):
        full, part = gt_view(env["ds"], i), gt_view(env["ds"], i, classes)
        assert set(part.labels.tolist()) <= set(classes)
        assert len(part.labels) == sum(int(l) in classes for l in full.labels)


def test_class_counts_and_bad_index(env):
    ds = env["ds"]
    assert class_counts(ds) == [len(ds.coco.getAnnIds(catIds=[c])) for c in ds.label_to_cat_id]
    with pytest.raises(IndexError, match="out of range"): gt_view(ds, len(ds))
    with pytest.raises(IndexError, match="out of range"): head_assignments(env["model"], ds, -1)


# ---------------------------------------------------------------- predictions

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), thr=st.floats(0, 1), classes=st.none() | st.sets(st.integers(0, 5)), seed=st.integers(0, 99))
def test_filter_detections_brute_force(n, thr, classes, seed):
    g = torch.Generator().manual_seed(seed)
    det = {"boxes": torch.rand(n, 4, generator=g), "scores": torch.rand(n, generator=g),
           "labels": torch.randint(0, 6, (n,), generator=g)}
    out = filter_detections(det, thr, classes)
    keep = [i for i in range(n) if det["scores"][i] >= thr and (classes is None or int(det["labels"][i]) in classes)]
    for k in det: torch.testing.assert_close(out[k], det[k][keep])


def test_detect_equals_predictor_on_the_file(env):
    "Oracle: codetr.engine.predict's Predictor on the image file gives the same detections in file pixels."
    ds, model, cfg = env["ds"], env["model"], env["cfg"]
    p = Predictor(model, cfg, identity_class_mapping(cfg.num_classes))
    for i in (0, 3):
        det = detect(model, ds, i)
        ref = p([gt_view(ds, i).image])[0]
        torch.testing.assert_close(det["boxes"], ref["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(det["scores"], ref["scores"])
    assert not model.training


def test_detect_restores_training_mode(env):
    model = env["model"]
    model.train()
    try: detect(model, env["ds"], 1)
    finally: was = model.training; model.eval()
    assert was


# ---------------------------------------------------------------- assignments

def test_panels_present_in_order(asg):
    assert tuple(asg[0].panels) == ("detr", "rpn", "roi", "atss", "queries_rcnn", "queries_atss")


def test_detr_matches_scipy(env, asg):
    "Oracle: scipy's linear_sum_assignment on the same cost matrix, from a separate forward pass."
    model, ds = env["model"], env["ds"]
    from codetr.data.coco import collate
    for i, a in enumerate(asg):
        batch = collate([ds[i]])
        with torch.no_grad():
            out = model.query_head(model.neck(model.backbone(batch.images)), batch.pad_mask)
        h, w = batch.targets[0]["img_size"]
        whwh = torch.tensor([w, h, w, h], dtype=torch.float32)
        cost = match_cost(out.pred_logits[0], out.pred_boxes[0], a.gt_labels, box_xyxy_to_cxcywh(a.gt_boxes_xyxy / whwh),
                          (h, w), **model.query_head.match_weights)
        rows, cols = linear_sum_assignment(cost.numpy())
        p = a.panels["detr"]
        assert sorted(zip(cols.tolist(), rows.tolist())) == sorted(zip(p.gt_index.tolist(), _query_ids(p, out, whwh)))
        torch.testing.assert_close(p.labels, a.gt_labels[p.gt_index])


def _query_ids(panel, out, whwh):
    "The query whose predicted box each panel row shows."
    boxes = box_cxcywh_to_xyxy(out.pred_boxes[0]) * whwh  # (Q, 4)
    return [int(torch.cdist(b[None], boxes, p=1).argmin()) for b in panel.boxes_xyxy]


def test_one_to_many_rules(env, asg):
    cfg = env["cfg"]
    for a in asg:
        gt = a.gt_boxes_xyxy
        for key, min_iou in (("rpn", cfg.aux_heads[0].rpn.min_pos_iou), ("roi", cfg.aux_heads[0].roi.pos_iou_thr)):
            p = a.panels[key]
            iou = box_iou(p.boxes_xyxy, gt)[torch.arange(len(p.labels)), p.gt_index]
            assert (iou >= min_iou - 1e-5).all(), key  # (a small box may have no anchor at IoU >= 0.3: no positive)
        atss = a.panels["atss"]
        centres = (atss.boxes_xyxy[:, :2] + atss.boxes_xyxy[:, 2:]) / 2
        g = gt[atss.gt_index]
        inside = (centres > g[:, :2]) & (centres < g[:, 2:])
        assert inside.all(), "ATSS positives have their centre inside their box"
        torch.testing.assert_close(atss.labels, a.gt_labels[atss.gt_index])
        assert len(a.panels["roi"].labels) >= len(gt)  # the gt boxes themselves are proposals


def test_positive_queries_are_the_heads_positives(env, asg):
    cap = env["cfg"].query_head.pos_queries.max_pos_coords
    for a in asg:
        for head, src in (("queries_rcnn", "roi"), ("queries_atss", "atss")):
            q, s = a.panels[head], a.panels[src]
            assert len(q.labels) == min(len(s.labels), cap)
            d = torch.cdist(q.boxes_xyxy, s.boxes_xyxy, p=1)  # each query box is one of the head's positives
            assert (d.min(1).values < 1e-2).all()
            torch.testing.assert_close(q.labels, a.gt_labels[q.gt_index])


def test_assignments_seeded_and_deterministic_parts(env, asg):
    again = head_assignments(env["model"], env["ds"], 0, seed=0)
    assert again.counts() == asg[0].counts()
    other = head_assignments(env["model"], env["ds"], 0, seed=7)
    for key in ("detr", "atss"):  # no random sampling in these
        torch.testing.assert_close(other.panels[key].boxes_xyxy, asg[0].panels[key].boxes_xyxy)


def test_image_without_boxes(env):
    a = head_assignments(env["model"], env["empty"], 0)
    assert len(a.gt_labels) == 0 and all(n == 0 for n in a.counts().values())
    fig = show_assignments(a)
    assert len(fig.axes) == len(a.panels) and all(len(ax.patches) == 0 for ax in fig.axes)


@pytest.fixture(scope="module")
def dino_env(explorer_env):
    from dataclasses import replace
    model, cfg = explorer_model(preset="co_dino_tiny", seed=0)
    cfg = replace(cfg, aug=cfg.aug.scaled(0.5))
    synth = explorer_env["synth"]
    return dict(model=model, cfg=cfg, ds=open_dataset(synth.val_images, synth.val_json, aug=cfg.aug),
                empty=open_dataset(synth.val_images, explorer_env["work"] / "empty.json", aug=cfg.aug))


def test_denoising_panels_are_the_training_step_queries(env, dino_env):
    "Oracle: the head's own training forward on the same image and generator seed builds the same noised boxes."
    from codetr.data.coco import collate
    model, ds = dino_env["model"], dino_env["ds"]
    a = head_assignments(model, ds, 1, seed=3)
    assert tuple(a.panels)[:3] == ("detr", "dn_positive", "dn_negative") and "queries_atss" in a.panels
    batch = collate([ds[1]])
    pad_mask, sizes = model.mask_and_sizes(batch.pad_mask, [tuple(batch.targets[0]["img_size"])])
    model.train()
    try:
        with torch.no_grad():
            out = model.query_head(model.features(batch.images), pad_mask, batch.targets, sizes,
                                   generator=torch.Generator().manual_seed(3))
    finally: model.eval()
    dn, (h, w), g = out.dn, sizes[0], len(a.gt_labels)
    groups = model.query_head.num_dn_queries // g  # dynamic groups
    assert dn.layout.num_groups == groups and a.counts()["dn_positive"] == a.counts()["dn_negative"] == groups * g
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    for key, shift in (("dn_positive", 0), ("dn_negative", g)):
        slots = torch.arange(groups)[:, None] * 2 * g + shift + torch.arange(g)[None]  # (groups, g) by hand
        p = a.panels[key]
        torch.testing.assert_close(p.boxes_xyxy, box_cxcywh_to_xyxy(dn.boxes_cxcywh[0, slots.flatten()]) * scale,
                                   rtol=0, atol=1e-3)
        assert torch.equal(p.labels, dn.labels[0, slots.flatten()])
        assert torch.equal(p.gt_index, torch.arange(g).repeat(groups))
        # the noise rule: positives move every corner by less than half a side, negatives by half to one side
        gt = a.gt_boxes_xyxy[p.gt_index]
        half = (gt[:, 2:] - gt[:, :2]).repeat(1, 2) / 2
        moved = (p.boxes_xyxy - gt).abs()
        clipped = (p.boxes_xyxy <= 1e-3) | (p.boxes_xyxy >= scale - 1e-3)
        if key == "dn_positive": assert (moved <= half + 1e-3).all()
        else: assert ((moved >= half - 1e-3) | clipped).all() and (moved <= 2 * half + 1e-3).all()


def test_no_denoising_panels_without_boxes_or_denoising(asg, dino_env):
    assert not any(k.startswith("dn_") for k in asg[0].panels)  # Co-Deformable-DETR has no denoising queries
    a = head_assignments(dino_env["model"], dino_env["empty"], 0)
    assert len(a.gt_labels) == 0 and not any(k.startswith("dn_") for k in a.panels)


def test_show_assignments_draws_each_panel(asg):
    a = asg[1]
    fig = show_assignments(a, ["atss", "detr"])
    assert len(fig.axes) == 2
    G = len(a.gt_labels)
    assert [len(ax.patches) for ax in fig.axes] == [G + a.counts()["atss"], G + a.counts()["detr"]]


# ---------------------------------------------------------------- sampling points

def test_hook_reproduces_every_layer_output(env):
    "Oracle: the recorded points and weights through the grid_sample reference give each layer's output."
    model, ds = env["model"], env["ds"]
    from codetr.data.coco import collate
    batch = collate([ds[2]])
    layers = [l.cross_attn for l in model.query_head.transformer.decoder.layers]
    queries = []
    hooks = [m.register_forward_hook(lambda m, a, k, o: queries.append(a[0]), with_kwargs=True) for m in layers]
    try:
        with capture_sampling(layers) as recs, torch.no_grad():
            st_ = model.query_head(model.neck(model.backbone(batch.images)), batch.pad_mask).state
            assert len(recs) == len(layers)
            for m, r, q in zip(layers, recs, queries):
                core = ms_deform_attn_reference(m._project_value(st_.memory, st_.memory_pad_mask), st_.spatial_shapes,
                                                st_.level_start_index, r.locations, r.weights)
                torch.testing.assert_close(r.output, m.output_proj(core) + q, rtol=1e-4, atol=1e-4)
    finally:
        for h in hooks: h.remove()
    assert all(len(m._forward_hooks) == 0 for m in layers)


def test_hooks_removed_after_an_error(env):
    layer = env["model"].query_head.transformer.decoder.layers[0].cross_attn
    with pytest.raises(RuntimeError, match="boom"):
        with capture_sampling([layer]): raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_fresh_model_points_centre_on_reference(env):
    "At initialisation the offsets point in M symmetric directions: the mean point of a query is its reference."
    samp = decoder_sampling(env["model"], env["ds"], 1)
    model = env["model"]
    if model.query_head.transformer.decoder.layers[0].cross_attn.sampling_offsets.weight.abs().sum() != 0:
        pytest.skip("the model is not freshly initialised")
    for level, (H, W) in enumerate(samp.spatial_shapes.tolist()):
        s = samp.strides[level]
        for q in (0, 7, samp.num_queries - 1):
            xy, w, heads = samp.points(0, q, level)
            expected = samp.references_cxcywh[0, q, :2] * torch.tensor([W * s, H * s])
            torch.testing.assert_close(xy.mean(0), expected, rtol=1e-4, atol=1e-3)
            assert sorted(set(heads.tolist())) == list(range(env["cfg"].query_head.transformer.num_heads))


def test_sampling_weights_and_errors(env):
    samp = decoder_sampling(env["model"], env["ds"], 0)
    torch.testing.assert_close(samp.weights.sum((-1, -2)), torch.ones(samp.weights.shape[:3]))
    assert samp.strides == [8, 16, 32, 64]
    with pytest.raises(IndexError, match="layer"): show_sampling(samp, samp.num_layers, 0)
    with pytest.raises(IndexError, match="query"): show_sampling(samp, 0, samp.num_queries)
    fig = show_sampling(samp, 1, 3)
    t = env["cfg"].query_head.transformer
    assert [len(ax.collections[0].get_offsets()) for ax in fig.axes] == [t.num_heads * t.num_points] * t.num_levels


def test_explorer_model_from_checkpoint(env, tmp_path):
    from codetr.core.config import config_to_dict
    path = tmp_path / "ckpt.pt"
    torch.save({"model": env["model"].state_dict(), "config": config_to_dict(env["cfg"])}, path)
    m, c = explorer_model(path, ann_file=env["synth"].val_json)
    assert c.aug == env["cfg"].aug and not m.training
    own = env["model"].state_dict()
    assert all(torch.equal(v, own[k]) for k, v in m.state_dict().items())
    torch.testing.assert_close(detect(m, env["ds"], 1)["boxes"], detect(env["model"], env["ds"], 1)["boxes"])


def test_panel_captions_count_in_words(asg):
    "One box reads '1 box', several 'N boxes'."
    from dataclasses import replace as dc_replace
    a = asg[0]
    one = dc_replace(a, panels={"detr": dc_replace(a.panels["detr"], boxes_xyxy=a.panels["detr"].boxes_xyxy[:1],
                                                   labels=a.panels["detr"].labels[:1], gt_index=a.panels["detr"].gt_index[:1])})
    assert "\n1 box;" in show_assignments(one).axes[0].get_title()
    assert f"\n{len(a.panels['atss'].labels)} boxes;" in show_assignments(a, ["atss"]).axes[0].get_title()
