"""The official state_dict layout (written here from spec 8.2) maps one to one onto our model."""
import math
from dataclasses import replace

import pytest
import torch
import torchvision

from codetr.core.io import CheckpointError, safe_load
from codetr.engine.checkpoint import (from_official_key, from_official_state_dict, load_official,
                               to_official_key, to_official_state_dict)
from codetr.models.co_deformable_detr import co_deformable_detr_r50_1x_coco, co_deformable_detr_tiny, deformable_detr_r50_1x_coco
from codetr.models.detector import build_model, parameter_counts


def official_co_deformable_detr_r50_shapes(num_classes: int = 80) -> dict:
    "Key -> shape of the official co_deformable_detr_r50_1x_coco state_dict, from spec 8.2."
    K, C, F = num_classes, 256, 2048
    shapes = {f"backbone.{k}": tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()
              if not k.startswith("fc.")}
    for i, cin in enumerate((512, 1024, 2048)):
        shapes |= {f"neck.convs.{i}.conv.weight": (C, cin, 1, 1), f"neck.convs.{i}.gn.weight": (C,),
                   f"neck.convs.{i}.gn.bias": (C,)}
    shapes |= {"neck.extra_convs.0.conv.weight": (C, 2048, 3, 3), "neck.extra_convs.0.gn.weight": (C,),
               "neck.extra_convs.0.gn.bias": (C,)}
    q = "query_head."
    shapes[q + "query_embedding.weight"] = (300, C)
    for i in range(7):
        shapes |= {f"{q}cls_branches.{i}.weight": (K, C), f"{q}cls_branches.{i}.bias": (K,)}
        for j, out in ((0, C), (2, C), (4, 4)):
            shapes |= {f"{q}reg_branches.{i}.{j}.weight": (out, C), f"{q}reg_branches.{i}.{j}.bias": (out,)}
    shapes |= {q + "downsample.0.weight": (C, C, 3, 3), q + "downsample.0.bias": (C,),
               q + "downsample.1.weight": (C,), q + "downsample.1.bias": (C,)}
    t = q + "transformer."
    shapes[t + "level_embeds"] = (4, C)

    def msda(p):
        return {f"{p}.sampling_offsets.weight": (256, C), f"{p}.sampling_offsets.bias": (256,),
                f"{p}.attention_weights.weight": (128, C), f"{p}.attention_weights.bias": (128,),
                f"{p}.value_proj.weight": (C, C), f"{p}.value_proj.bias": (C,),
                f"{p}.output_proj.weight": (C, C), f"{p}.output_proj.bias": (C,)}

    def ffn_norms(p, n):
        d = {f"{p}.ffns.0.layers.0.0.weight": (F, C), f"{p}.ffns.0.layers.0.0.bias": (F,),
             f"{p}.ffns.0.layers.1.weight": (C, F), f"{p}.ffns.0.layers.1.bias": (C,)}
        return d | {f"{p}.norms.{j}.{w}": (C,) for j in range(n) for w in ("weight", "bias")}

    for l in range(6):
        enc, dec = f"{t}encoder.layers.{l}", f"{t}decoder.layers.{l}"
        shapes |= msda(f"{enc}.attentions.0") | ffn_norms(enc, 2)
        shapes |= {f"{dec}.attentions.0.attn.in_proj_weight": (3 * C, C), f"{dec}.attentions.0.attn.in_proj_bias": (3 * C,),
                   f"{dec}.attentions.0.attn.out_proj.weight": (C, C), f"{dec}.attentions.0.attn.out_proj.bias": (C,)}
        shapes |= msda(f"{dec}.attentions.1") | ffn_norms(dec, 3)
    shapes |= {t + "enc_output.weight": (C, C), t + "enc_output.bias": (C,), t + "enc_output_norm.weight": (C,),
               t + "enc_output_norm.bias": (C,), t + "pos_trans.weight": (2 * C, 2 * C), t + "pos_trans.bias": (2 * C,),
               t + "pos_trans_norm.weight": (2 * C,), t + "pos_trans_norm.bias": (2 * C,),
               t + "head_pos_embed.weight": (2, 1)}
    for i in range(2):
        shapes |= {f"{t}aux_pos_trans.{i}.weight": (2 * C, 2 * C), f"{t}aux_pos_trans.{i}.bias": (2 * C,),
                   f"{t}aux_pos_trans_norm.{i}.weight": (2 * C,), f"{t}aux_pos_trans_norm.{i}.bias": (2 * C,),
                   f"{t}pos_feats_trans.{i}.weight": (C, C), f"{t}pos_feats_trans.{i}.bias": (C,),
                   f"{t}pos_feats_norm.{i}.weight": (C,), f"{t}pos_feats_norm.{i}.bias": (C,)}
    shapes |= {"rpn_head.rpn_conv.weight": (C, C, 3, 3), "rpn_head.rpn_conv.bias": (C,),
               "rpn_head.rpn_cls.weight": (9, C, 1, 1), "rpn_head.rpn_cls.bias": (9,),
               "rpn_head.rpn_reg.weight": (36, C, 1, 1), "rpn_head.rpn_reg.bias": (36,)}
    r = "roi_head.0.bbox_head."
    shapes |= {r + "shared_fcs.0.weight": (1024, C * 49), r + "shared_fcs.0.bias": (1024,),
               r + "shared_fcs.1.weight": (1024, 1024), r + "shared_fcs.1.bias": (1024,),
               r + "fc_cls.weight": (K + 1, 1024), r + "fc_cls.bias": (K + 1,),
               r + "fc_reg.weight": (4 * K, 1024), r + "fc_reg.bias": (4 * K,)}
    a = "bbox_head.0."
    for tower in ("cls_convs", "reg_convs"):
        shapes |= {f"{a}{tower}.0.conv.weight": (C, C, 3, 3), f"{a}{tower}.0.gn.weight": (C,), f"{a}{tower}.0.gn.bias": (C,)}
    shapes |= {a + "atss_cls.weight": (K, C, 3, 3), a + "atss_cls.bias": (K,), a + "atss_reg.weight": (4, C, 3, 3),
               a + "atss_reg.bias": (4,), a + "atss_centerness.weight": (1, C, 3, 3), a + "atss_centerness.bias": (1,)}
    return shapes | {f"{a}scales.{i}.scale": () for i in range(5)}


class NeedsCode:
    "Unpickling an object of this class calls a function (a harmless one here): loading must refuse it."
    def __reduce__(self): return (print, ("unpickled",))


def r50_on_meta(cfg):
    with torch.device("meta"):
        return build_model(replace(cfg, backbone=replace(cfg.backbone, weights=None)))


@pytest.fixture(scope="module")
def r50():
    cfg = co_deformable_detr_r50_1x_coco()
    return cfg, r50_on_meta(cfg)


def test_official_layout_maps_one_to_one(r50):
    cfg, model = r50
    official = official_co_deformable_detr_r50_shapes()
    converted = {k: tuple(v.shape) for k, v in to_official_state_dict(model.state_dict(), cfg).items()}
    assert len(converted) == len(model.state_dict())                       # no two keys collapse
    missing, unexpected = sorted(set(official) - set(converted)), sorted(set(converted) - set(official))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    wrong = {k: (converted[k], official[k]) for k in official if converted[k] != official[k]}
    assert not wrong, list(wrong.items())[:5]


def test_keys_round_trip(r50):
    cfg, model = r50
    for k in model.state_dict():
        assert from_official_key(to_official_key(k, cfg), cfg) == k
    official = official_co_deformable_detr_r50_shapes()
    back = from_official_state_dict({k: torch.empty(0) for k in official}, cfg)
    assert set(back) == set(model.state_dict())


def test_parameter_count_matches_official_shapes(r50):
    _, model = r50
    official = official_co_deformable_detr_r50_shapes()
    n_official = sum(math.prod(s) for k, s in official.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    counts = parameter_counts(model)
    assert counts["total"] == n_official == 65_129_894
    # the inference model is the baseline: the aux-only keys of spec 8.4 are the difference
    base = parameter_counts(r50_on_meta(deformable_detr_r50_1x_coco()))
    aux_only = sum(math.prod(s) for k, s in official.items()
                   if k.startswith(("rpn_head.", "roi_head.", "bbox_head.", "query_head.downsample."))
                   or any(a in k for a in ("head_pos_embed", "aux_pos_trans", "pos_feats_")))
    assert base["total"] == counts["inference"] == n_official - aux_only


def test_mmcv_checkpoint_file_loads(tmp_path):
    cfg = co_deformable_detr_tiny(num_classes=3)
    torch.manual_seed(0)
    src, dst = build_model(cfg), build_model(cfg)
    sd = {"module." + k: v for k, v in to_official_state_dict(src.state_dict(), cfg).items()}
    path = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ("a", "b", "c"), "mmdet_version": "2.25.3"}, "state_dict": sd}, path)
    report = load_official(dst, path, cfg)
    assert report == {"missing": [], "unexpected": [], "skipped": []}
    for k, v in src.state_dict().items(): assert torch.equal(v, dst.state_dict()[k]), k


def test_class_count_mismatch(tmp_path):
    cfg80, cfg3 = co_deformable_detr_tiny(num_classes=80), co_deformable_detr_tiny(num_classes=3)
    sd = to_official_state_dict(build_model(cfg80).state_dict(), cfg80)
    with pytest.raises(ValueError, match="another class count"):
        load_official(build_model(cfg3), sd, cfg3)
    model = build_model(cfg3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_official(model, sd, cfg3, skip_class_mismatch=True)
    skipped = set(report["skipped"])
    assert {"query_head.cls_branches.0.weight", "aux_heads.0.roi_head.bbox_head.fc_cls.weight",
            "aux_heads.0.roi_head.bbox_head.fc_reg.bias", "aux_heads.1.atss_cls.weight"} <= skipped
    for k, v in model.state_dict().items():
        if k in skipped: assert torch.equal(v, before[k])
    ours80 = from_official_state_dict(sd, cfg80)
    assert torch.equal(model.state_dict()["query_head.query_embedding.weight"], ours80["query_head.query_embedding.weight"])


def test_bad_files(tmp_path):
    cfg = co_deformable_detr_tiny(num_classes=3)
    with pytest.raises(FileNotFoundError, match="nope.pth"): load_official(build_model(cfg), tmp_path / "nope.pth", cfg)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "obj": NeedsCode()}, path)
    with pytest.raises(CheckpointError, match="arbitrary code"): load_official(build_model(cfg), path, cfg)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cut.pth"): safe_load(tmp_path / "cut.pth")
    cfg = co_deformable_detr_tiny(num_classes=3)
    with pytest.raises(ValueError, match="missing keys"): load_official(build_model(cfg), {"state_dict": {}}, cfg)
