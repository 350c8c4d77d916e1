"""Presets against the spec's numbers, overrides, and the loss-weight table."""
import dataclasses

import pytest

from codetr.models.config import (CoDETRConfig, co_deformable_detr_r50_1x_coco, co_deformable_detr_tiny,
                           deformable_detr_r50_1x_coco, deformable_detr_tiny, get_preset, loss_weight_table, override)
from codetr.data.coco import AugConfig

# Spec section -> (config path, official value)
OFFICIAL = {
    "1.1 backbone": [("backbone.depth", 50), ("backbone.out_indices", (1, 2, 3)), ("backbone.frozen_stages", 1)],
    "1.1 transformer": [("transformer.embed_dims", 256), ("transformer.num_heads", 8), ("transformer.num_levels", 4),
                        ("transformer.num_points", 4), ("transformer.num_encoder_layers", 6),
                        ("transformer.num_decoder_layers", 6), ("transformer.ffn_dims", 2048),
                        ("transformer.dropout", 0.0), ("transformer.pos_temperature", 10000.0),
                        ("transformer.pos_offset", -0.5), ("neck_out_channels", 256)],
    "1.1 queries": [("head.num_queries", 300), ("pos_queries.max_pos_coords", 300), ("pos_queries.lambda_1", 1.0),
                    ("pos_queries.with_coord_feat", True)],
    "2.2": [("lambda_2", 2.0)],
    "2.3 rpn": [("rpn.pos_iou_thr", 0.7), ("rpn.neg_iou_thr", 0.3), ("rpn.min_pos_iou", 0.3), ("rpn.num_samples", 256),
                ("rpn.pos_fraction", 0.5), ("rpn.nms_pre", 4000), ("rpn.nms_iou", 0.7), ("rpn.max_per_img", 1000)],
    "2.4 roi": [("roi.roi_size", 7), ("roi.finest_scale", 112), ("roi.fc_dims", 1024), ("roi.pos_iou_thr", 0.5),
                ("roi.neg_iou_thr", 0.5), ("roi.min_pos_iou", 0.5), ("roi.num_samples", 512), ("roi.pos_fraction", 0.25)],
    "2.5 atss": [("atss.octave_base_scale", 8), ("atss.topk", 9), ("atss.stacked_convs", 1)],
    "4.1 matcher": [("head.match_cls_weight", 2.0), ("head.match_l1_weight", 5.0), ("head.match_giou_weight", 2.0),
                    ("head.focal_alpha", 0.25), ("head.focal_gamma", 2.0)],
    "4.2 losses": [("head.cls_weight", 2.0), ("head.l1_weight", 5.0), ("head.giou_weight", 2.0)],
    "5.1 recipe": [("optim.lr", 2e-4), ("optim.weight_decay", 1e-4), ("optim.betas", (0.9, 0.999)), ("optim.eps", 1e-8),
                   ("optim.clip_max_norm", 0.1), ("optim.epochs", 12), ("optim.lr_steps", (11,)),
                   ("optim.lr_gamma", 0.1), ("optim.batch_size", 2)],
    "5.4 test": [("head.test_top_k", 100), ("aug.test_scale", 800), ("aug.test_max_size", 1333)],
}


def get(cfg, dotted):
    for part in dotted.split("."): cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("section", sorted(OFFICIAL))
def test_official_numbers(section):
    cfg = co_deformable_detr_r50_1x_coco()
    for path, value in OFFICIAL[section]:
        assert get(cfg, path) == value, f"spec {section}: {path} = {get(cfg, path)!r}, expected {value!r}"


def test_official_lr_multipliers_and_augmentation():
    cfg = co_deformable_detr_r50_1x_coco()
    assert dict(cfg.optim.lr_mult) == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    assert cfg.aug == AugConfig()
    assert cfg.aug.scales == tuple(range(480, 801, 32)) and cfg.aug.crop_range == (384, 600)


def test_baseline_differs_only_in_aux_parts():
    co, base = co_deformable_detr_r50_1x_coco(), deformable_detr_r50_1x_coco()
    diff = {f.name for f in dataclasses.fields(CoDETRConfig) if getattr(co, f.name) != getattr(base, f.name)}
    assert diff == {"name", "aux_heads", "pos_queries"}
    assert base.aux_heads == () and not base.pos_queries.enabled
    tiny, tiny_base = co_deformable_detr_tiny(), deformable_detr_tiny()
    diff = {f.name for f in dataclasses.fields(CoDETRConfig) if getattr(tiny, f.name) != getattr(tiny_base, f.name)}
    assert diff == {"name", "aux_heads", "pos_queries"}


def test_class_count_is_one_field():
    cfg = get_preset("co_deformable_detr_r50_1x_coco", num_classes=3)
    assert cfg.num_classes == 3
    assert sum(isinstance(v, int) and v == 3 for v in vars(cfg).values()) == 1
    with pytest.raises(ValueError, match="num_classes"): co_deformable_detr_r50_1x_coco(0)
    with pytest.raises(ValueError, match="unknown preset"): get_preset("co_dino_swin")


def test_loss_weight_table_official():
    w = loss_weight_table(co_deformable_detr_r50_1x_coco())
    assert w == {"loss_cls": 2, "loss_bbox": 5, "loss_iou": 2, "enc_loss_cls": 2, "enc_loss_bbox": 5, "enc_loss_iou": 2,
                 "loss_rpn_cls": 12, "loss_rpn_bbox": 12, "loss_cls0": 12, "loss_bbox0": 120,
                 "loss_cls_aux0": 2, "loss_bbox_aux0": 5, "loss_iou_aux0": 2,
                 "loss_cls1": 12, "loss_bbox1": 24, "loss_centerness1": 12,
                 "loss_cls_aux1": 2, "loss_bbox_aux1": 5, "loss_iou_aux1": 2}


def test_loss_weight_table_follows_lambdas_and_heads():
    cfg = override(co_deformable_detr_r50_1x_coco(), **{"lambda_2": 1.0, "pos_queries.lambda_1": 0.5,
                                                         "transformer.num_decoder_layers": 3, "aux_heads": "atss"})
    w = loss_weight_table(cfg)
    assert w["loss_cls0"] == 3 and w["loss_bbox0"] == 6 and w["loss_centerness0"] == 3   # ATSS is head 0 now
    assert w["loss_cls_aux0"] == 1 and "loss_rpn_cls" not in w


def test_override_parses_and_reports():
    cfg = co_deformable_detr_tiny()
    new = override(cfg, **{"optim.lr": "3e-4", "optim.lr_steps": "8,11", "backbone.weights": "none",
                           "pos_queries.enabled": "false", "aug.scales": "(96, 128)"})
    assert new.optim.lr == 3e-4 and new.optim.lr_steps == (8, 11) and new.backbone.weights is None
    assert new.pos_queries.enabled is False and new.aug.scales == (96, 128)
    with pytest.raises(ValueError, match="has no field 'lr'"): override(cfg, lr=1)
    with pytest.raises(ValueError, match="true or false"): override(cfg, **{"pos_queries.enabled": "maybe"})
    with pytest.raises(ValueError, match="divisible"): override(cfg, **{"transformer.num_heads": "5"})
