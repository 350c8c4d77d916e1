"""The assembled Co-DINO: a batch without ground truth, loss keys of the tiny preset, inference format, and the clear
errors for weights of another family, another class count or an unknown preset."""
import pytest
import torch

from codetr.engine.checkpoint import best_preset, load_official, load_start_weights, to_official_state_dict
from codetr.models.co_deformable_detr import co_deformable_detr_r50_1x_coco
from codetr.models.co_dino import co_dino_5scale_r50_1x_coco, co_dino_tiny, dino_tiny
from codetr.models.detector import build_model, total_loss
from codetr.models.presets import get_preset


def batch(n_boxes=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [torch.randn(3, 96, 128, generator=g), torch.randn(3, 80, 112, generator=g)], []
    for (h, w), n in zip(((96, 128), (80, 112)), n_boxes):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (n,), generator=g),
                        "img_size": (h, w), "orig_size": (2 * h, 2 * w)})
    return images, targets


def test_loss_keys_of_the_tiny_preset():
    "The official Co-DINO loss names (the R50 set is checked against the official list in test_parity), at 2 layers."
    torch.manual_seed(0)
    losses = build_model(co_dino_tiny(3)).train()(*batch())
    main = {"loss_cls", "loss_bbox", "loss_iou"}
    expected = main | {f"d0.{k}" for k in main} | {f"enc_{k}" for k in main} | {f"dn_{k}" for k in main} \
        | {f"d0.dn_{k}" for k in main}
    expected |= {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls0", "loss_bbox0", "acc0", "loss_cls1", "loss_bbox1",
                 "loss_centerness1"}
    expected |= {f"{p}{k}_aux{i}" for i in (0, 1) for k in main for p in ("", "d0.")}
    assert set(losses) == expected
    base = build_model(dino_tiny(3)).train()(*batch())
    assert set(base) == {k for k in expected if "aux" not in k and "rpn" not in k and k[-1] not in "01"}


def test_a_batch_without_any_box_is_a_correct_zero_target_step():
    """No ground truth anywhere: no denoising query is built, the box terms are exactly zero, every class term pushes
    all scores down (the QFL of an all-background target), and one optimiser step is finite."""
    torch.manual_seed(0)
    model = build_model(co_dino_tiny(3)).train()
    images, targets = batch((0, 0))
    img_sizes = [t["img_size"] for t in targets]
    padded, pad_mask = model._batch(images, None)
    outputs = model.query_outputs(padded, pad_mask, targets, img_sizes)
    losses = model._losses(outputs, targets, img_sizes, tuple(padded.shape[-2:]))
    assert outputs.dn_logits is None or outputs.dn_logits.shape[-2] == 0  # no denoising query
    assert set(losses) == set(build_model(co_dino_tiny(3)).train()(*batch()))  # the same keys as with boxes
    assert all(torch.isfinite(v) for v in losses.values())
    for k, v in losses.items():
        if "dn_" in k or "bbox" in k or "iou" in k or "centerness" in k: assert v.item() == 0, k
    # the last layer's class loss is QFL with every target background: the sum over queries and classes of
    # BCE(logit, 0) * sigmoid(logit)^2, over max(1, number of positives) = 1 (+ float32 eps, as mmdet's avg_factor)
    logits = outputs.pred_logits  # (B, Q, K) the last layer
    qfl = (torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
           * logits.sigmoid() ** 2).sum() / (1 + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(losses["loss_cls"], model.query_head.weights["cls"] * qfl)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    total_loss(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    before = model.query_head.cls_branches[-1].bias.clone()
    opt.step()
    assert (model.query_head.cls_branches[-1].bias < before).all()  # every class pushed down


def test_eval_output():
    "Detections in original pixels, at most test_top_k per image, scores sorted, and no auxiliary module runs."
    torch.manual_seed(0)
    cfg = co_dino_tiny(3)
    model = build_model(cfg).eval()
    called = []
    for h in model.aux_heads: h.register_forward_hook(lambda *a: called.append(1))
    images, targets = batch()
    with torch.no_grad(): dets = model(images, targets)
    assert not called and len(dets) == 2
    for det, t in zip(dets, targets):
        H, W = t["orig_size"]
        assert len(det["boxes"]) <= cfg.query_head.test_top_k
        assert (det["boxes"][:, 0::2] >= 0).all() and (det["boxes"][:, 0::2] <= W).all()
        assert (det["boxes"][:, 1::2] >= 0).all() and (det["boxes"][:, 1::2] <= H).all()
        assert (det["labels"] >= 0).all() and (det["labels"] < 3).all()


# ---------------------------------------------------------------------------------------------------------------
# Clear errors

@pytest.fixture(scope="module")
def r50_weights():
    "Weights of both R50 families under their official names (mmdet 2.x naming for Co-DINO: Sense-X)."
    torch.manual_seed(0)
    co_def, co_dino = co_deformable_detr_r50_1x_coco(80).without_pretrained(), co_dino_5scale_r50_1x_coco(80).without_pretrained()
    return {"co_def": (co_def, to_official_state_dict(build_model(co_def).state_dict(), co_def)),
            "co_dino": (co_dino, to_official_state_dict(build_model(co_dino).state_dict(), co_dino, "sensex"))}


def test_official_weights_of_the_other_family_name_their_preset(r50_weights):
    co_def, def_weights = r50_weights["co_def"]
    co_dino, dino_weights = r50_weights["co_dino"]
    assert best_preset(dino_weights) == ("co_dino_5scale_r50_1x_coco", 1.0)
    with pytest.raises(ValueError, match="fit the preset 'co_deformable_detr_r50_1x_coco'"):
        load_official(build_model(co_dino), def_weights, co_dino)
    with pytest.raises(ValueError, match="fit the preset 'co_dino_5scale_r50_1x_coco'"):
        load_official(build_model(co_def), dino_weights, co_def)


def test_the_9_encoder_variant_is_told_apart(r50_weights):
    "A preset of the same family with another depth is named too (its keys differ, not its shapes)."
    co_dino, dino_weights = r50_weights["co_dino"]
    nine = get_preset("co_dino_5scale_9encoder_r50_1x_coco").without_pretrained()
    with pytest.raises(ValueError, match="fit the preset 'co_dino_5scale_r50_1x_coco'"):
        load_official(build_model(nine), dino_weights, nine)


def test_fine_tuning_co_dino_on_another_class_count(tmp_path, capsys):
    "COCO-style weights with 6 classes start a 3-class run: the class layers (and the label embedding) start fresh."
    torch.manual_seed(0)
    six, three = co_dino_tiny(6), co_dino_tiny(3)
    src = build_model(six)
    torch.save({"meta": {"epoch": 12}, "state_dict": to_official_state_dict(src.state_dict(), six)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="another class count"):
        load_official(build_model(three), tmp_path / "w.pth", three)
    model = build_model(three)
    report = load_start_weights(model, tmp_path / "w.pth", three)
    assert any("label_embedding" in k for k in report["skipped"]) and any("cls_branches" in k for k in report["skipped"])
    assert "another class count" in capsys.readouterr().out
    for k, v in src.state_dict().items():
        if k not in report["skipped"]: assert torch.equal(model.state_dict()[k], v), k


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'co_dino_5scale_r50_1x_coco'"):
        get_preset("co_dino_5scale_r50_coco")


def test_presets_checkpoint_the_encoder_layers_the_official_configs_do():
    "Spec 1.2: with_cp=4 in the 6-layer encoder, all 9 layers in the 9-encoder model; the small CPU presets keep everything."
    want = {"co_dino_5scale_r50_1x_coco": 4, "co_dino_5scale_r50_lsj_1x_coco": 4, "dino_5scale_r50_1x_coco": 4,
            "co_dino_5scale_9encoder_r50_1x_coco": 9, "co_dino_tiny": 0, "dino_tiny": 0}
    assert {name: get_preset(name).query_head.transformer.with_cp for name in want} == want
