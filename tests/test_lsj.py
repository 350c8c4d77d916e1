"""Large-scale jitter: canvas size and gray padding, a resize/crop/flip case computed by hand, empty crops, the test
transform, the recipe chosen through `cfg.aug`, and a detector without the attention mask (spec 4.1, 5.3)."""
import json
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torchvision import tv_tensors

from codetr.core.config import config_from_dict, config_to_dict
from codetr.data.coco import AugConfig, build_dataset, collate, eval_transforms, train_transforms
from codetr.data.lsj import FilterSmallBoxes, LSJConfig, PadToSize, RandomScaleResize, lsj_augmentation
from codetr.data.synthetic import make_synthetic_coco
from codetr.data.viz import PIXEL_MEAN, PIXEL_STD
from codetr.models.co_dino import co_dino_5scale_r50_lsj_1x_coco, co_dino_tiny
from codetr.models.detector import build_model, total_loss
from codetr.ops.box_ops import box_cxcywh_to_xyxy


def sample(h, w, boxes, labels=None):
    img = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w)))
    tgt = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                             canvas_size=(h, w)),
           "labels": torch.tensor(labels if labels is not None else list(range(len(boxes))), dtype=torch.long)}
    return img, tgt


# ---------------------------------------------------------------------------------------------------------------
# the training pipeline

@settings(max_examples=int(os.environ.get("CODETR_HYPOTHESIS_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(8, 160), w=st.integers(8, 160), size=st.sampled_from([32, 64, 100]), seed=st.integers(0, 2 ** 31 - 1))
def test_train_output_is_the_canvas_with_gray_padding(h, w, size, seed):
    img, tgt = sample(h, w, [[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]])
    torch.manual_seed(seed)
    out, t = LSJConfig(size=size).train_transforms(normalize=False)(img, tgt)
    ih, iw = t["img_size"]
    assert out.shape == (3, size, size) and out.dtype == torch.uint8 and 1 <= ih <= size and 1 <= iw <= size
    assert (out[:, ih:] == 114).all() and (out[:, :, iw:] == 114).all()
    assert t["boxes"].canvas_size == (size, size) and len(t["boxes"]) == len(t["labels"])
    boxes = t["boxes"].as_subclass(torch.Tensor)
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= iw).all() and (boxes[:, 1::2] <= ih).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) > 0.01).all()


def test_padding_is_114_before_normalisation():
    img, tgt = sample(30, 50, [[5, 5, 20, 20]])
    torch.manual_seed(0)
    out, t = LSJConfig(size=64, ratio_range=(1.0, 1.0)).train_transforms()(img, tgt)
    assert out.dtype == torch.float32 and out.shape == (3, 64, 64) and t["img_size"] == (38, 64)
    gray = (114 - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)  # (3,)
    assert torch.allclose(out[:, 38:], gray[:, None, None].expand(3, 26, 64))


def replay_draws(seed, h, w, size, ratio):
    "The random draws of the LSJ training pipeline, in its order: scale factor, crop size (h, w), crop offset (top, left)."
    torch.manual_seed(seed)
    r = ratio[0] + (ratio[1] - ratio[0]) * float(torch.rand(()))
    side = int(size * r)
    scale = side / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    ch = int(torch.randint(min(rh, size), min(rh, size) + 1, ()))
    cw = int(torch.randint(min(rw, size), min(rw, size) + 1, ()))
    top, left = int(torch.randint(rh - ch + 1, ())), int(torch.randint(rw - cw + 1, ()))
    return (rh, rw), (top, left, ch, cw)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_resize_crop_flip_by_hand(seed):
    "A 50 x 100 image, scale factor 1.5 on a 100 canvas: 75 x 150, cropped to 75 x 100 at a random left offset, flipped."
    img, tgt = sample(50, 100, [[10, 5, 30, 25], [80, 40, 100, 50]], labels=[3, 4])
    cfg = LSJConfig(size=100, ratio_range=(1.5, 1.5), flip_prob=1.0)
    (rh, rw), (top, left, ch, cw) = replay_draws(seed, 50, 100, 100, cfg.ratio_range)
    assert (rh, rw, top, ch, cw) == (75, 150, 0, 75, 100)
    torch.manual_seed(seed)
    out, t = cfg.train_transforms(normalize=False)(img, tgt)
    expected, labels = [], []
    for (x1, y1, x2, y2), label in zip([[15, 7.5, 45, 37.5], [120, 60, 150, 75]], [3, 4]):  # resized by 1.5
        x1, x2 = min(max(x1 - left, 0), 100), min(max(x2 - left, 0), 100)  # cropped and clipped
        if x2 - x1 > 0.01: expected.append([100 - x2, y1, 100 - x1, y2]); labels.append(label)  # flipped
    assert out.shape == (3, 100, 100) and t["img_size"] == (75, 100)
    assert torch.allclose(t["boxes"].as_subclass(torch.Tensor), torch.tensor(expected).reshape(-1, 4))
    assert t["labels"].tolist() == labels
    assert (out[:, 75:] == 114).all() and not (out[:, :75] == 114).all()


def test_the_hand_computed_seeds_cover_one_and_two_boxes():
    lefts = [replay_draws(s, 50, 100, 100, (1.5, 1.5))[1][1] for s in range(4)]
    assert any(l <= 20 for l in lefts) and any(20 < l < 45 for l in lefts), lefts


def test_empty_crops_are_kept_with_zero_boxes():
    "An object in the left fifth of an image twice the canvas wide: most crops miss it."
    img, tgt = sample(50, 100, [[0, 0, 10, 10]])
    tf = LSJConfig(size=100, ratio_range=(2.0, 2.0), flip_prob=0.0).train_transforms(normalize=False)
    results = []
    for seed in range(20):
        torch.manual_seed(seed)
        results.append(tf(img, tgt))
    empty = [(out, t) for out, t in results if len(t["boxes"]) == 0]
    assert empty and len(empty) < len(results)
    out, t = empty[0]
    assert out.shape == (3, 100, 100) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    batch = collate([empty[0], results[0]])
    assert batch.targets[0]["boxes"].shape == (0, 4) and not batch.pad_mask.any()


def test_filter_small_boxes_is_strict():
    img, tgt = sample(20, 20, [[0, 0, 5, 5], [1, 1, 1.01, 9], [2, 2, 2.02, 2.02], [3, 3, 3, 8]])
    _, t = FilterSmallBoxes(0.01)(img, tgt)
    assert t["labels"].tolist() == [0, 2]  # 0.01 wide is not above 0.01
    assert type(t["boxes"]) is tv_tensors.BoundingBoxes


def test_random_scale_resize_long_side():
    img, _ = sample(30, 40, [])
    torch.manual_seed(0)
    sizes = [RandomScaleResize(100, (0.1, 2.0))(img).shape[-2:] for _ in range(100)]
    assert all(10 <= max(s) <= 200 and abs(s[0] / s[1] - 0.75) < 0.1 for s in sizes)
    assert RandomScaleResize(100, (1.0, 1.0))(img).shape[-2:] == (75, 100)


# ---------------------------------------------------------------------------------------------------------------
# the test transform and the config

@pytest.mark.parametrize("hw,resized", [((480, 640), (768, 1024)), ((640, 427), (1024, 683)), ((2000, 100), (1024, 51))])
def test_eval_transform_long_side_and_pad(hw, resized):
    img, tgt = sample(*hw, [[0, 0, hw[1], hw[0]]])
    out, t = eval_transforms(LSJConfig(), normalize=False)(img, tgt)
    assert out.shape == (3, 1024, 1024) and t["img_size"] == resized
    assert (out[:, resized[0]:] == 114).all() and (out[:, :, resized[1]:] == 114).all()
    assert torch.allclose(t["boxes"].as_subclass(torch.Tensor), torch.tensor([[0., 0., resized[1], resized[0]]]))
    assert eval_transforms(LSJConfig())(img).shape == (3, 1024, 1024)  # an image alone, as a predictor passes it


def test_config_defaults_scaling_and_round_trip():
    cfg = lsj_augmentation()
    assert cfg == LSJConfig(size=1024, ratio_range=(0.1, 2.0), pad_value=114, flip_prob=0.5, min_box_size=0.01)
    assert cfg.scaled(0.125) == replace(cfg, size=128)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    for bad in ({"size": 0}, {"ratio_range": (2.0, 1.0)}, {"pad_value": 300}, {"flip_prob": 1.5}, {"min_box_size": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))): LSJConfig(**bad)
    with pytest.raises(ValueError, match="canvas"): PadToSize(10)(torch.zeros(3, 11, 5))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), n_train=4, n_val=2, min_size=64, max_size=96, seed=0)


def test_recipe_follows_the_config_type(synth):
    "build_dataset / train_transforms / eval_transforms pick the recipe from the type of `aug`."
    lsj, detr = LSJConfig(size=48), AugConfig().scaled(0.1)
    train = build_dataset("train", synth.train_images, synth.train_json, aug=lsj)
    val = build_dataset("val", synth.val_images, synth.val_json, aug=lsj)
    torch.manual_seed(0)
    for img, t in [train[0], train[1], val[0]]:
        assert img.shape == (3, 48, 48) and max(t["img_size"]) <= 48 and t["orig_size"] != t["img_size"]
    assert max(val[0][1]["img_size"]) == 48
    assert build_dataset("val", synth.val_images, synth.val_json, aug=detr)[0][0].shape[-2:] != (48, 48)
    torch.manual_seed(0)
    a = train_transforms(lsj)(*sample(60, 80, [[1, 1, 30, 30]]))
    torch.manual_seed(0)
    b = lsj.train_transforms()(*sample(60, 80, [[1, 1, 30, 30]]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_collate_masks_the_gray_border(synth):
    ds = build_dataset("val", synth.val_images, synth.val_json, aug=LSJConfig(size=64))
    batch = collate([ds[0], ds[1]])
    assert batch.images.shape == (2, 3, 64, 64)
    for m, t in zip(batch.pad_mask, batch.targets):
        h, w = t["img_size"]
        assert not m[:h, :w].any() and m.sum() == 64 * 64 - h * w


# ---------------------------------------------------------------------------------------------------------------
# the detector without the attention mask

def tiny_lsj(with_attn_mask=False, size=64):
    return replace(co_dino_tiny(6), with_attn_mask=with_attn_mask, aug=LSJConfig(size=size))


class Recorder:
    "Records what the query head and the auxiliary heads receive."
    def __init__(self, model):
        self.calls = []
        model.query_head.register_forward_pre_hook(lambda m, a: self.calls.append(("query", a[1], a[3])))
        for head in model.aux_heads:
            orig = head.forward_train
            head.forward_train = lambda *a, _f=orig, **k: (self.calls.append(("aux", None, a[2])), _f(*a, **k))[1]


@pytest.fixture(scope="module")
def lsj_batch(synth):
    torch.manual_seed(0)
    ds = build_dataset("train", synth.train_images, synth.train_json, aug=LSJConfig(size=64))
    return collate([ds[i] for i in range(4)])


def test_no_attn_mask_training_step(lsj_batch):
    torch.manual_seed(0)
    model = build_model(tiny_lsj()).train()
    rec = Recorder(model)
    assert lsj_batch.pad_mask.any()  # the collated mask covers the gray border; the model must ignore it
    losses = model(lsj_batch.images, lsj_batch.targets, pad_mask=lsj_batch.pad_mask)
    kind, mask, sizes = rec.calls[0]
    assert kind == "query" and not mask.any() and mask.shape == (4, 64, 64) and sizes == [(64, 64)] * 4
    assert [c[2] for c in rec.calls[1:]] == [[(64, 64)] * 4] * 2  # both auxiliary heads see the canvas as the image
    assert all(torch.isfinite(v) for v in losses.values()) and {"dn_loss_cls", "loss_cls_aux1"} <= set(losses)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.query_head.cls_branches[0].weight.detach().clone()
    total_loss(losses).backward()
    opt.step()
    assert not torch.equal(before, model.query_head.cls_branches[0].weight)


def test_attn_mask_kept_when_asked(lsj_batch):
    "with_attn_mask=True on LSJ data: the gray border is masked and the sizes are the unpadded ones, as officially."
    torch.manual_seed(0)
    model = build_model(tiny_lsj(with_attn_mask=True)).train()
    rec = Recorder(model)
    model(lsj_batch.images, lsj_batch.targets, pad_mask=lsj_batch.pad_mask)
    _, mask, sizes = rec.calls[0]
    assert torch.equal(mask, lsj_batch.pad_mask) and sizes == [tuple(t["img_size"]) for t in lsj_batch.targets]


def test_no_attn_mask_detections_in_original_pixels(synth):
    "Each detection is a canvas-normalised query box x canvas / resize factor, clipped to the original image."
    torch.manual_seed(0)
    model = build_model(tiny_lsj(size=96)).eval()
    ds = build_dataset("val", synth.val_images, synth.val_json, aug=model.cfg.aug)
    batch = collate([ds[0], ds[1]])
    with torch.no_grad():
        dets = model(batch.images, batch.targets, pad_mask=batch.pad_mask)
        outputs = model.query_outputs(batch.images, torch.zeros_like(batch.pad_mask))
    for b, (det, t) in enumerate(zip(dets, batch.targets)):
        (h, w), (oh, ow) = t["img_size"], t["orig_size"]
        assert max(h, w) == 96 and (h, w) != (oh, ow)
        boxes = (box_cxcywh_to_xyxy(outputs.pred_boxes[b]) * 96).clamp(0, 96)  # (Q, 4) canvas pixels
        boxes = boxes * torch.tensor([ow / w, oh / h] * 2)  # (Q, 4) original pixels
        boxes = torch.minimum(boxes, torch.tensor([ow, oh, ow, oh], dtype=torch.float32))  # (Q, 4)
        dist = torch.cdist(det["boxes"], boxes, p=1).amin(1)  # (k,) each detection is one of the query boxes
        assert len(det["boxes"]) > 0 and dist.max() < 1e-3
        assert (det["boxes"] >= 0).all() and (det["boxes"][:, 0::2] <= ow).all() and (det["boxes"][:, 1::2] <= oh).all()


def test_preset_differs_from_the_detr_one_in_recipe_and_mask_only():
    from codetr.models.co_dino import co_dino_5scale_r50_1x_coco
    lsj, detr = co_dino_5scale_r50_lsj_1x_coco(), co_dino_5scale_r50_1x_coco()
    assert replace(lsj, name=detr.name, with_attn_mask=True, aug=detr.aug) == detr
    assert lsj.with_attn_mask is False and lsj.aug == LSJConfig()


@pytest.mark.slow
def test_cli_trains_the_lsj_preset(tmp_path, synth):
    "The official LSJ preset, shrunk through --cfg-options, trains one epoch and evaluates through the command line."
    from codetr.engine.train import main
    small = ["backbone.depth=18", "backbone.weights=none", "neck.out_channels=32", "query_head.transformer.embed_dims=32",
             "query_head.transformer.num_heads=2", "query_head.transformer.num_points=1",
             "query_head.transformer.num_encoder_layers=1", "query_head.transformer.num_decoder_layers=2",
             "query_head.transformer.ffn_dims=64", "query_head.num_queries=30", "query_head.num_dn_queries=10",
             "query_head.test_top_k=30", "query_head.postprocess=topk", "aux_heads.0.roi.fc_dims=64", "aug.size=64"]
    metrics = main(["co_dino_5scale_r50_lsj_1x_coco", "--epochs", "1", "--batch-size", "2", "--num-workers", "0",
                    "--no-progress", "--device", "cpu", "--train-images", str(synth.train_images), "--train-ann",
                    str(synth.train_json), "--val-images", str(synth.val_images), "--val-ann", str(synth.val_json),
                    "--work-dir", str(tmp_path), "--cfg-options", *small])
    assert 0 <= metrics["AP"] <= 1
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["with_attn_mask"] is False and stored["aug"]["type"] == "LSJConfig" and stored["aug"]["size"] == 64
    log = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r["mode"] == "train"]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
