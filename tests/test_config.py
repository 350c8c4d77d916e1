"""Presets against the spec's numbers, overrides, stored configs (today's and the earlier layout), the loss-weight
table, and a new auxiliary head added through its config class alone."""
import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from codetr.core.config import config_from_dict, config_to_dict, override
from codetr.data.coco import AugConfig
from codetr.data.lsj import LSJConfig
from codetr.heads.atss import ATSSHeadConfig
from codetr.heads.base import AuxHeadConfig, PositiveCoords
from codetr.heads.roi import RPNRoIHeadConfig
from codetr.models.co_deformable_detr import (co_deformable_detr_r50_1x_coco, co_deformable_detr_tiny,
                                              deformable_detr_r50_1x_coco, deformable_detr_tiny)
from codetr.models.co_dino import co_dino_5scale_r50_1x_coco, co_dino_5scale_r50_lsj_1x_coco
from codetr.models.config import CoDETRConfig, config_from_stored, loss_weight_table
from codetr.models.detector import build_model, official_key_rules, total_loss
from codetr.models.presets import PRESETS, get_preset, run_config

DATA = Path(__file__).parent / "data"

# Spec section -> (config path, official value)
OFFICIAL = {
    "1.1 backbone": [("backbone.depth", 50), ("backbone.out_indices", (1, 2, 3)), ("backbone.frozen_stages", 1),
                     ("backbone.norm_eval", True), ("backbone.weights", "imagenet")],
    "1.1 neck": [("neck.num_outs", 4), ("neck.out_channels", 256), ("neck.kernel_size", 1), ("neck.num_groups", 32)],
    "1.1 transformer": [("query_head.transformer.embed_dims", 256), ("query_head.transformer.num_heads", 8),
                        ("query_head.transformer.num_levels", 4), ("query_head.transformer.num_points", 4),
                        ("query_head.transformer.num_encoder_layers", 6), ("query_head.transformer.num_decoder_layers", 6),
                        ("query_head.transformer.ffn_dims", 2048), ("query_head.transformer.dropout", 0.0),
                        ("query_head.pos_temperature", 10000.0), ("query_head.pos_offset", -0.5)],
    "1.1 queries": [("query_head.num_queries", 300), ("query_head.pos_queries.max_pos_coords", 300),
                    ("query_head.pos_queries.min_pos_coords", 9), ("query_head.pos_queries.lambda_1", 1.0),
                    ("query_head.pos_queries.with_coord_feat", True)],
    "2.2": [("lambda_2", 2.0), ("aux_loss_factor", 12.0)],
    "2.3 rpn": [("aux_heads.0.rpn.pos_iou_thr", 0.7), ("aux_heads.0.rpn.neg_iou_thr", 0.3),
                ("aux_heads.0.rpn.min_pos_iou", 0.3), ("aux_heads.0.rpn.num_samples", 256),
                ("aux_heads.0.rpn.pos_fraction", 0.5), ("aux_heads.0.rpn.nms_pre", 4000), ("aux_heads.0.rpn.nms_iou", 0.7),
                ("aux_heads.0.rpn.max_per_img", 1000)],
    "2.4 roi": [("aux_heads.0.roi.roi_size", 7), ("aux_heads.0.roi.finest_scale", 112), ("aux_heads.0.roi.fc_dims", 1024),
                ("aux_heads.0.roi.pos_iou_thr", 0.5), ("aux_heads.0.roi.neg_iou_thr", 0.5), ("aux_heads.0.roi.min_pos_iou", 0.5),
                ("aux_heads.0.roi.num_samples", 512), ("aux_heads.0.roi.pos_fraction", 0.25)],
    "2.5 atss": [("aux_heads.1.octave_base_scale", 8), ("aux_heads.1.topk", 9), ("aux_heads.1.stacked_convs", 1)],
    "4.1 matcher": [("query_head.match_cls_weight", 2.0), ("query_head.match_l1_weight", 5.0),
                    ("query_head.match_giou_weight", 2.0), ("query_head.focal_alpha", 0.25), ("query_head.focal_gamma", 2.0)],
    "4.2 losses": [("query_head.cls_weight", 2.0), ("query_head.l1_weight", 5.0), ("query_head.giou_weight", 2.0)],
    "5.1 recipe": [("optim.lr", 2e-4), ("optim.weight_decay", 1e-4), ("optim.betas", (0.9, 0.999)), ("optim.eps", 1e-8),
                   ("optim.clip_max_norm", 0.1), ("optim.epochs", 12), ("optim.lr_steps", (11,)),
                   ("optim.lr_gamma", 0.1), ("optim.batch_size", 2)],
    "5.4 test": [("query_head.test_top_k", 100), ("aug.test_scale", 800), ("aug.test_max_size", 1333)],
}


# The Co-DINO LSJ preset (Sense-X co_dino_5scale_lsj_r50_1x_coco): spec section -> (config path, official value)
OFFICIAL_CO_DINO_LSJ = {
    "1.2 model": [("backbone.depth", 50), ("backbone.out_indices", (0, 1, 2, 3)), ("neck.num_outs", 5),
                  ("query_head.transformer.num_levels", 5), ("query_head.num_queries", 900),
                  ("query_head.num_dn_queries", 100), ("aux_heads.0.roi.finest_scale", 56), ("lambda_2", 2.0)],
    "4.1 / 5.3 no padding mask": [("with_attn_mask", False)],
    "5.1 recipe": [("optim.lr", 2e-4), ("optim.weight_decay", 1e-4), ("optim.clip_max_norm", 0.1), ("optim.epochs", 12),
                   ("optim.lr_steps", (11,)), ("optim.lr_gamma", 0.1), ("optim.batch_size", 2),
                   ("optim.lr_mult", (("backbone", 0.1),))],
    "5.3 lsj": [("aug.size", 1024), ("aug.ratio_range", (0.1, 2.0)), ("aug.pad_value", 114), ("aug.flip_prob", 0.5),
                ("aug.min_box_size", 0.01)],
    "5.4 test": [("query_head.test_top_k", 300), ("query_head.nms_iou", 0.8), ("query_head.postprocess", "mmdet3")],
}


def get(cfg, dotted):
    for part in dotted.split("."): cfg = cfg[int(part)] if part.isdigit() else getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("section", sorted(OFFICIAL))
def test_official_numbers(section):
    cfg = co_deformable_detr_r50_1x_coco()
    for path, value in OFFICIAL[section]:
        assert get(cfg, path) == value, f"spec {section}: {path} = {get(cfg, path)!r}, expected {value!r}"


@pytest.mark.parametrize("section", sorted(OFFICIAL_CO_DINO_LSJ))
def test_official_co_dino_lsj_numbers(section):
    cfg = get_preset("co_dino_5scale_r50_lsj_1x_coco")
    for path, value in OFFICIAL_CO_DINO_LSJ[section]:
        assert get(cfg, path) == value, f"spec {section}: {path} = {get(cfg, path)!r}, expected {value!r}"


def test_lsj_preset_changes_only_the_recipe_and_the_mask():
    lsj, detr = co_dino_5scale_r50_lsj_1x_coco(), co_dino_5scale_r50_1x_coco()
    diff = {f.name for f in dataclasses.fields(CoDETRConfig) if getattr(lsj, f.name) != getattr(detr, f.name)}
    assert diff == {"name", "with_attn_mask", "aug"} and type(lsj.aug) is LSJConfig and detr.with_attn_mask
    assert co_dino_5scale_r50_lsj_1x_coco(3).num_classes == 3


def test_aug_is_any_augmentation_config_and_old_stores_keep_the_mask():
    cfg = co_deformable_detr_tiny()
    with pytest.raises(TypeError, match="CoDETRConfig.aug"): replace(cfg, aug=cfg.optim)
    stored = json.loads(json.dumps(config_to_dict(replace(cfg, aug=LSJConfig(size=64)))))
    assert config_from_stored(stored).aug == LSJConfig(size=64)
    stored = json.loads(json.dumps(config_to_dict(cfg)))
    del stored["with_attn_mask"]  # a config stored before the field existed
    assert config_from_stored(stored) == cfg and config_from_stored(stored).with_attn_mask is True
    assert override(cfg, with_attn_mask="false", **{"aug.flip_prob": "0.25"}).with_attn_mask is False


def test_official_heads_lr_multipliers_and_augmentation():
    cfg = co_deformable_detr_r50_1x_coco()
    assert [type(h) for h in cfg.aux_heads] == [RPNRoIHeadConfig, ATSSHeadConfig]  # RoI head first (spec 3.1)
    assert dict(cfg.optim.lr_mult) == {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    assert cfg.aug == AugConfig()
    assert cfg.aug.scales == tuple(range(480, 801, 32)) and cfg.aug.crop_range == (384, 600)


@pytest.mark.parametrize("co,base", [(co_deformable_detr_r50_1x_coco, deformable_detr_r50_1x_coco),
                                     (co_deformable_detr_tiny, deformable_detr_tiny)])
def test_baseline_differs_only_in_aux_parts(co, base):
    co, base = co(), base()
    diff = {f.name for f in dataclasses.fields(CoDETRConfig) if getattr(co, f.name) != getattr(base, f.name)}
    assert diff == {"name", "aux_heads", "query_head"}
    assert base.aux_heads == () and not base.query_head.pos_queries.enabled
    assert replace(base.query_head, pos_queries=co.query_head.pos_queries) == co.query_head


def test_class_count_is_one_field():
    cfg = get_preset("co_deformable_detr_r50_1x_coco", num_classes=3)
    assert cfg.num_classes == 3
    ints = lambda obj: [v for v in vars(obj).values() if isinstance(v, int) and not isinstance(v, bool)]
    assert ints(cfg).count(3) == 1 and all(3 not in ints(h) for h in cfg.aux_heads)
    with pytest.raises(ValueError, match="num_classes"): co_deformable_detr_r50_1x_coco(0)
    with pytest.raises(ValueError, match="unknown preset"): get_preset("co_dino_swin")


def test_parts_must_fit():
    cfg = co_deformable_detr_tiny()
    with pytest.raises(ValueError, match="neck.num_outs"): override(cfg, **{"neck.num_outs": 5})
    with pytest.raises(ValueError, match="neck.out_channels"): override(cfg, **{"query_head.transformer.embed_dims": 128})
    with pytest.raises(TypeError, match="aux_heads"): replace(cfg, aux_heads=("atss",))
    with pytest.raises(TypeError, match="backbone"): replace(cfg, backbone=cfg.neck)


def test_loss_weight_table_official():
    w = loss_weight_table(co_deformable_detr_r50_1x_coco())
    assert w == {"loss_cls": 2, "loss_bbox": 5, "loss_iou": 2, "enc_loss_cls": 2, "enc_loss_bbox": 5, "enc_loss_iou": 2,
                 "loss_rpn_cls": 12, "loss_rpn_bbox": 12, "loss_cls0": 12, "loss_bbox0": 120,
                 "loss_cls_aux0": 2, "loss_bbox_aux0": 5, "loss_iou_aux0": 2,
                 "loss_cls1": 12, "loss_bbox1": 24, "loss_centerness1": 12,
                 "loss_cls_aux1": 2, "loss_bbox_aux1": 5, "loss_iou_aux1": 2}


def test_loss_weight_table_follows_lambdas_and_heads():
    cfg = co_deformable_detr_r50_1x_coco()
    cfg = override(replace(cfg, aux_heads=(cfg.aux_heads[1],)),  # ATSS alone: it is head 0 now
                   **{"lambda_2": 1.0, "query_head.pos_queries.lambda_1": 0.5, "query_head.transformer.num_decoder_layers": 3})
    w = loss_weight_table(cfg)
    assert w["loss_cls0"] == 3 and w["loss_bbox0"] == 6 and w["loss_centerness0"] == 3
    assert w["loss_cls_aux0"] == 1 and "loss_rpn_cls" not in w and "loss_cls_aux1" not in w


def test_loss_weight_table_equals_the_built_heads():
    "The table and the weights the built model uses come from the same rule."
    cfg = co_deformable_detr_tiny(3)
    model = build_model(cfg)
    rcnn, atss = model.aux_heads
    w = loss_weight_table(cfg)
    assert (rcnn.rpn_head.loss_cls_weight, rcnn.roi_head.loss_bbox_weight) == (w["loss_rpn_cls"], w["loss_bbox0"])
    assert atss.loss_weights == {"cls": w["loss_cls1"], "bbox": w["loss_bbox1"], "centerness": w["loss_centerness1"]}
    assert model.query_head.weights == {"cls": w["loss_cls"], "bbox": w["loss_bbox"], "iou": w["loss_iou"]}


def test_override_parses_and_reports():
    cfg = co_deformable_detr_tiny()
    new = override(cfg, **{"optim.lr": "3e-4", "optim.lr_steps": "8,11", "backbone.weights": "none",
                           "query_head.pos_queries.enabled": "false", "aug.scales": "(96, 128)",
                           "aux_heads.0.rpn.nms_pre": "300", "aux_heads.1.topk": "5"})
    assert new.optim.lr == 3e-4 and new.optim.lr_steps == (8, 11) and new.backbone.weights is None
    assert new.query_head.pos_queries.enabled is False and new.aug.scales == (96, 128)
    assert (new.aux_heads[0].rpn.nms_pre, new.aux_heads[1].topk) == (300, 5)
    assert override(cfg, aux_heads="()").aux_heads == ()
    with pytest.raises(ValueError, match="has no field 'lr'"): override(cfg, lr=1)
    with pytest.raises(ValueError, match="true or false"): override(cfg, **{"query_head.pos_queries.enabled": "maybe"})
    with pytest.raises(ValueError, match="divisible"): override(cfg, **{"query_head.transformer.num_heads": "5"})
    with pytest.raises(ValueError, match="index"): override(cfg, **{"aux_heads.2.topk": "5"})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    cfg = get_preset(name)
    stored = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(stored) == cfg and config_from_stored(stored) == cfg
    assert run_config(None, stored=stored) == cfg


@pytest.mark.parametrize("name", ["co_deformable_detr_tiny", "co_deformable_detr_r50_1x_coco", "deformable_detr_tiny"])
def test_configs_stored_before_the_restructure_load(name):
    "tests/data/configs_v0.json was written by the earlier layout (aux_heads as names, top-level head/rpn/roi/atss)."
    stored = json.loads((DATA / "configs_v0.json").read_text())[name]
    assert "head" in stored and "type" not in stored
    assert config_from_stored(stored) == get_preset(name)


@dataclass(frozen=True)
class CenterHeadConfig(AuxHeadConfig):
    "A new auxiliary head made for this test: one conv predicting a box per location; positives at box centres."
    loss_weight: float = 1.0

    def build(self, num_classes, in_channels, strides, head_index, loss_factor):
        return CenterHead(in_channels, strides, head_index, self.loss_weight * loss_factor)

    def loss_weights(self, loss_factor, head_index):
        return {f"loss_center{head_index}": self.loss_weight * loss_factor}


class CenterHead(nn.Module):
    name = "center"
    def __init__(self, in_channels, strides, head_index, weight):
        super().__init__()
        self.head_index, self.strides, self.weight = head_index, strides, weight
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)

    def forward_train(self, pyramid, targets, img_sizes, pad_hw=None, generator=None):
        B, s = len(targets), self.strides[0]
        out = self.conv(pyramid[0])  # (B, 4, H, W)
        coords, labels, tgts = [], [], []
        for b, t in enumerate(targets):
            c = ((t["boxes"][:, :2] + t["boxes"][:, 2:]) / 2 / s).long()  # (G, 2) cells of the box centres
            coords.append(torch.cat([c * s, c * s + s], 1).float()); labels.append(t["labels"]); tgts.append(t["boxes"])
        n = max(1, max(len(l) for l in labels))
        pad = lambda ts, fill: torch.stack([torch.cat([x, x.new_full((n - len(x), *x.shape[1:]), fill)]) for x in ts])
        pos = PositiveCoords(pad(coords, 0.0), pad(labels, 3), pad(tgts, 0.0), head_index=self.head_index)  # K = 3: background
        return {f"loss_center{self.head_index}": self.weight * out.abs().mean()}, pos

    def predict(self, pyramid, img_sizes): return [{} for _ in img_sizes]

    def explain(self, pyramid, targets, img_sizes, pad_hw=None, seed=0):
        return {}, self.forward_train(pyramid, targets, img_sizes, pad_hw)[1]


def test_a_new_aux_head_is_one_config_class():
    "A head defined outside codetr trains inside the detector with its own losses and positive queries."
    base = co_deformable_detr_tiny(3)
    cfg = replace(base, aux_heads=(base.aux_heads[1], CenterHeadConfig()))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    targets = [{"boxes": torch.tensor([[10., 20., 60., 70.]]), "labels": torch.tensor([2]), "img_size": (96, 128)}]
    losses = model(torch.randn(1, 3, 96, 128), targets)
    assert {"loss_cls0", "loss_center1", "loss_cls_aux1", "loss_iou_aux1"} <= set(losses)
    assert loss_weight_table(cfg)["loss_center1"] == cfg.aux_loss_factor
    total_loss(losses).backward()
    assert model.aux_heads[1].conv.weight.grad.abs().sum() > 0
    assert model.query_head.transformer.aux_pos_trans[1].weight.grad.abs().sum() > 0  # its positive queries trained
    rules = official_key_rules(cfg)
    assert ("^aux_heads\\.1\\.", "bbox_head.1.") in rules  # the second dense head of the official layout
