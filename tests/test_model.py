"""The assembled CoDETR: loss keys, gradient paths, empty images, eval format, inference cost, overfitting."""
from dataclasses import replace

import pytest
import torch

from codetr.core.config import override
from codetr.data.coco import pad_images
from codetr.models.co_deformable_detr import co_deformable_detr_tiny, deformable_detr_tiny
from codetr.models.detector import build_model, total_loss, unpadded_sizes


def tiny(num_classes=3, **changes):
    return override(co_deformable_detr_tiny(num_classes), **changes)


def batch(seed=0, empty=False):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 96, 128, generator=g), torch.randn(3, 80, 112, generator=g)]
    targets = []
    for (h, w), n in zip(((96, 128), (80, 112)), (3, 0 if empty else 2)):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (n,), generator=g),
                        "img_size": (h, w), "orig_size": (2 * h, 2 * w)})
    if empty: targets[0] = {**targets[0], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    return images, targets


def official_keys(num_dec_layers=6):
    main = ["loss_cls", "loss_bbox", "loss_iou"]
    keys = set(main) | {f"d{l}.{k}" for l in range(num_dec_layers - 1) for k in main} | {f"enc_{k}" for k in main}
    keys |= {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0", "acc0", "loss_cls1", "loss_bbox1", "loss_centerness1"}
    for i in (0, 1):
        keys |= {f"{k}_aux{i}" for k in main} | {f"d{l}.{k}_aux{i}" for l in range(num_dec_layers - 1) for k in main}
    return keys


def test_loss_keys_equal_the_official_set():
    torch.manual_seed(0)
    model = build_model(tiny(**{"query_head.transformer.num_decoder_layers": 6})).train()
    losses = model(*batch())
    assert set(losses) == official_keys(6)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert total_loss(losses) == sum(v for k, v in losses.items() if k != "acc0")


def test_baseline_has_only_detr_losses_and_no_aux_modules():
    model = build_model(deformable_detr_tiny(3)).train()
    losses = model(*batch())
    assert set(losses) == {k for k in official_keys(2) if "aux" not in k and k[-1] not in "01" and "rpn" not in k}
    assert len(model.aux_heads) == 0 and model.aux_pyramid is None and not model.query_head.positive_queries
    assert not any("aux_pos_trans" in n or "head_pos_embed" in n for n, _ in model.named_parameters())


def test_every_aux_loss_reaches_encoder_and_backbone():
    torch.manual_seed(0)
    model = build_model(tiny()).train()
    # The official init zeroes the last layer of every box branch, so at step 0 the box losses cannot depend on the
    # decoder output; after the first update they do. Give those layers small weights to open that path.
    with torch.no_grad():
        for reg in model.query_head.reg_branches: reg[-1].weight.normal_(std=0.01)
    losses = model(*batch())
    enc_param = model.query_head.transformer.encoder.layers[0].self_attn.value_proj.weight
    backbone_param = model.backbone.layer4[0].conv1.weight if hasattr(model.backbone, "layer4") else \
        next(p for n, p in model.backbone.named_parameters() if p.requires_grad)
    assert backbone_param.requires_grad
    aux_keys = [k for k in losses if "loss" in k and (k[-1] in "01" or "rpn" in k) and "." not in k]
    assert len(aux_keys) == 13      # RPN 2, RoI 2, ATSS 3, positive queries 3 per head
    for k in aux_keys:
        g_enc, g_bb = torch.autograd.grad(losses[k], [enc_param, backbone_param], retain_graph=True, allow_unused=True)
        assert g_enc is not None and g_enc.abs().sum() > 0, f"{k} does not reach the encoder"
        assert g_bb is not None and g_bb.abs().sum() > 0, f"{k} does not reach the backbone"


def test_images_without_boxes():
    torch.manual_seed(0)
    model = build_model(tiny()).train()
    images, targets = batch(empty=True)
    targets[1] = {**targets[1], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    total_loss(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padded_batch_equals_list_input():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    images, targets = batch()
    padded, pad_mask = pad_images(images)
    assert unpadded_sizes(pad_mask) == [(96, 128), (80, 112)]
    with torch.no_grad():
        a = model(images, targets)
        b = model(padded, targets, pad_mask=pad_mask)
    for x, y in zip(a, b):
        for k in ("boxes", "scores", "labels"): torch.testing.assert_close(x[k], y[k])


def test_eval_output_and_no_aux_at_inference(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    for head in model.aux_heads:
        monkeypatch.setattr(head, "forward_train", lambda *a, **k: pytest.fail("aux head ran at inference"))
    monkeypatch.setattr(model.aux_pyramid, "forward", lambda *a, **k: pytest.fail("pyramid built at inference"))
    images, targets = batch()
    with torch.no_grad(): dets = model(images, targets)
    assert len(dets) == 2
    for d, t in zip(dets, targets):
        assert set(d) == {"boxes", "scores", "labels"}
        assert d["boxes"].shape == (model.cfg.query_head.test_top_k, 4) and d["labels"].dtype == torch.int64
        h, w = t["orig_size"]
        assert (d["boxes"] >= 0).all() and (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and ((d["labels"] >= 0) & (d["labels"] < 3)).all()
    with torch.no_grad(): plain = model(images)          # without targets: sizes from the images themselves
    assert plain[1]["boxes"][:, 2].max() <= 112


def test_input_errors():
    model = build_model(tiny()).train()
    images, targets = batch()
    with pytest.raises(ValueError, match="targets are required"): model(images)
    with pytest.raises(ValueError, match="pad_mask"): model(torch.zeros(2, 3, 32, 32), pad_mask=torch.zeros(2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"images\[1\]"): pad_images([torch.zeros(3, 8, 8), torch.zeros(8, 8)])


@pytest.mark.slow
def test_one_batch_overfit(tmp_path):
    "A tiny Co-Deformable-DETR memorises one batch of synthetic images: the total loss falls by at least 90%."
    from codetr.data.coco import AugConfig, CocoDetection, collate, eval_transforms
    from codetr.data.synthetic import make_synthetic_coco
    torch.manual_seed(0)
    paths = make_synthetic_coco(tmp_path / "syn", n_train=8, n_val=2)
    ds = CocoDetection(paths.train_images, paths.train_json, transforms=eval_transforms(AugConfig(test_scale=96, test_max_size=128)))
    b = collate([ds[0], ds[1]])
    assert sum(len(t["boxes"]) for t in b.targets) > 0
    model = build_model(co_deformable_detr_tiny(ds.num_classes)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for step in range(200):
        if step == 150:                              # a step decay, as in the official schedule, settles the noise
            for group in opt.param_groups: group["lr"] *= 0.1
        loss = total_loss(model(b.images, b.targets, pad_mask=b.pad_mask))
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        history.append(loss.item())
    assert min(history[-10:]) <= 0.1 * history[0], (history[0], history[-10:])


def test_query_head_gets_the_targets_in_training_only(monkeypatch):
    "The query-head contract: targets reach the head's forward in training (a denoising head builds queries from them)."
    torch.manual_seed(0)
    model = build_model(tiny())
    seen = []
    forward = type(model.query_head).forward
    monkeypatch.setattr(type(model.query_head), "forward",
                        lambda self, feats, pad_mask, targets=None, img_sizes=None:
                        seen.append(targets) or forward(self, feats, pad_mask, targets, img_sizes))
    images, targets = batch()
    model.train()(images, targets)
    with torch.no_grad(): model.eval()(images, targets)
    assert seen[0] is targets and seen[1] is None


def test_pyramid_strides_follow_the_neck():
    "The auxiliary heads' anchors sit on the neck's strides plus one extra level: 5 levels from C2 give 4 ... 128."
    cfg = tiny(**{"backbone.out_indices": "(0, 1, 2, 3)", "query_head.transformer.num_levels": "5", "neck.num_outs": "5"})
    model = build_model(cfg)
    assert model.neck.strides == [4, 8, 16, 32, 64]
    assert model.aux_heads[1].anchor_generator.strides == (4, 8, 16, 32, 64, 128)
    assert model.aux_heads[0].roi_head.strides == (4, 8, 16, 32, 64)
    losses = model.train()(*batch())
    assert all(torch.isfinite(v) for v in losses.values())
