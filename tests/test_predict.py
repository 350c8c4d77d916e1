"""Tests for codetr.engine.predict: input discovery, class mappings, every checkpoint kind (training, bare state dict,
safetensors with and without its run folder's config, official names), the class-count checks, the predictor
against the test transform and the model's own output, the files written, clear errors, and the CLI."""
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.ops.box_ops import scale_boxes
from codetr.engine.checkpoint import to_official_state_dict
from codetr.models.co_deformable_detr import co_deformable_detr_tiny
from codetr.data.coco import CocoDetection, eval_transforms, load_image, resized_hw
from codetr.core.config import config_to_dict
from codetr.engine.evaluate import coco_evaluate
from codetr.models.detector import build_model
from codetr.engine.checkpoint import checkpoint_num_classes, read_weights
from codetr.engine.predict import (ClassMapping, Predictor, annotate, coco_class_mapping, identity_class_mapping,
                                   image_files, load_predictor, main, predict_files, resolve_config, stored_class_mapping)
from codetr.data.synthetic import SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASSES, make_synthetic_coco
from codetr.engine.checkpoint import export_safetensors

REPO = Path(__file__).resolve().parents[1]


def _cfg():
    cfg = co_deformable_detr_tiny()
    return replace(cfg, aug=cfg.aug.scaled(0.5))  # half the preset's test sizes: fast


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("predict")
    synth = make_synthetic_coco(work / "synthetic", n_train=0, n_val=3, min_size=64, max_size=96, seed=3)
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    run = work / "run"; run.mkdir()
    ckpt = run / "epoch_0001_iter_000000.pt"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 1}, ckpt)
    return dict(work=work, synth=synth, cfg=cfg, model=model, ckpt=ckpt)


@pytest.fixture(scope="module")
def predictor(env):
    return load_predictor(env["ckpt"], ann_file=env["synth"].val_json)


# ---------------------------------------------------------------- inputs

def test_image_files_folders_files_and_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("c.PNG", "a.jpeg", "b.webp", "x.txt", "sub/d.png"): (tmp_path / name).write_bytes(b"")
    assert [p.name for p in image_files(tmp_path)] == ["a.jpeg", "b.webp", "c.PNG"]  # not recursive, any case
    assert [p.name for p in image_files([tmp_path / "x.txt", tmp_path])] == ["x.txt", "a.jpeg", "b.webp", "c.PNG"]
    assert len(image_files([tmp_path, tmp_path])) == 3


@pytest.mark.parametrize("bad, match", [("missing", "missing"), ("emptydir", "no image files")])
def test_image_files_errors_name_the_path(tmp_path, bad, match):
    if bad == "emptydir": (tmp_path / bad).mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match=match): image_files(tmp_path / bad)


# ---------------------------------------------------------------- class mappings

def test_coco_mapping_matches_cocodetection(env):
    m = coco_class_mapping(env["synth"].val_json)
    ds = CocoDetection(env["synth"].val_images, env["synth"].val_json)
    assert m.cat_ids == ds.label_to_cat_id == list(SYNTHETIC_CATEGORY_IDS)
    assert m.names == ds.class_names == list(SYNTHETIC_CLASSES)


@pytest.mark.parametrize("meta, expected", [
    ({"label_to_cat_id": [4, 2], "class_names": ["a", "b"]}, ([4, 2], ["a", "b"])),
    ({"label_to_cat_id": "[4, 2]"}, ([4, 2], ["4", "2"])),
    ({}, None)])
def test_stored_mapping(meta, expected):
    m = stored_class_mapping(meta, "here")
    assert (m if m is None else (m.cat_ids, m.names)) == expected


def test_stored_mapping_length_mismatch():
    with pytest.raises(ValueError, match="class_names has 1"):
        stored_class_mapping({"label_to_cat_id": [1, 2], "class_names": ["a"]}, "ckpt.pt")


# ---------------------------------------------------------------- checkpoint kinds

def test_training_checkpoint_roundtrip(env, predictor):
    assert read_weights(env["ckpt"]).kind == "train"
    assert predictor.cfg.aug == env["cfg"].aug and predictor.cfg.backbone.weights is None
    own = env["model"].state_dict()
    assert all(torch.equal(v, own[k]) for k, v in predictor.model.state_dict().items())
    assert not predictor.model.training


def test_checkpoint_mapping_is_used(env, tmp_path):
    path = tmp_path / "with_classes.pt"
    torch.save({"model": env["model"].state_dict(), "config": config_to_dict(env["cfg"]),
                "label_to_cat_id": list(range(10, 16)), "class_names": list("abcdef")}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no class mapping" warning
        p = load_predictor(path)
    assert p.classes.cat_ids == list(range(10, 16)) and p.classes.names == list("abcdef")
    # an annotation file takes precedence
    assert load_predictor(path, ann_file=env["synth"].val_json).classes.cat_ids == list(SYNTHETIC_CATEGORY_IDS)


def test_no_mapping_warns_and_uses_labels(env):
    with pytest.warns(UserWarning, match="no class mapping"):
        p = load_predictor(env["ckpt"])
    assert p.classes.cat_ids == list(range(6)) and p.classes.names == [str(i) for i in range(6)]


def test_safetensors_with_and_without_run_config(env, tmp_path):
    with_cfg = export_safetensors(env["model"].state_dict(), tmp_path / "run" / "model.safetensors")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config_to_dict(env["cfg"])))
    ck = read_weights(with_cfg)
    assert ck.kind == "safetensors" and ck.config is not None
    assert load_predictor(with_cfg, ann_file=env["synth"].val_json).cfg.aug == env["cfg"].aug
    alone = export_safetensors(env["model"].state_dict(), tmp_path / "alone" / "model.safetensors")
    with pytest.raises(ValueError, match="stores no config"): load_predictor(alone)
    p = load_predictor(alone, preset="co_deformable_detr_tiny", ann_file=env["synth"].val_json)
    assert p.cfg.num_classes == 6


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_names_are_converted(env, predictor, tmp_path, wrapped):
    sd = to_official_state_dict(env["model"].state_dict(), env["cfg"])
    assert any(".attentions." in k for k in sd)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 12}} if wrapped else sd, path)
    assert read_weights(path).kind == "official"
    p = load_predictor(path, preset="co_deformable_detr_tiny", ann_file=env["synth"].val_json,
                       cfg_options=[f"aug.test_scale={env['cfg'].aug.test_scale}",
                                    f"aug.test_max_size={env['cfg'].aug.test_max_size}"])
    own = env["model"].state_dict()
    assert all(torch.equal(v, own[k]) for k, v in p.model.state_dict().items())
    img = load_image(env["synth"].val_images / "000000.png")
    assert (p.cfg.aug.test_scale, p.cfg.aug.test_max_size) == (predictor.cfg.aug.test_scale, predictor.cfg.aug.test_max_size)
    torch.testing.assert_close(p([img])[0]["boxes"], predictor([img])[0]["boxes"])


def test_checkpoint_num_classes():
    assert checkpoint_num_classes({"module.query_head.cls_branches.0.weight": torch.zeros(7, 4)}) == 7
    assert checkpoint_num_classes({"x": torch.zeros(1)}) is None


# ---------------------------------------------------------------- errors

def test_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"): load_predictor(tmp_path / "nothere.pt")


def test_class_count_mismatch_with_annotation(env, tmp_path):
    ann = tmp_path / "three.json"
    ann.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}))
    with pytest.raises(ValueError, match=r"class-count mismatch.*6 classes.*has 3"):
        load_predictor(env["ckpt"], ann_file=ann)


def test_class_count_mismatch_config_vs_weights(env, tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": env["model"].state_dict(), "config": config_to_dict(replace(env["cfg"], num_classes=3))}, path)
    with pytest.raises(ValueError, match="num_classes=3 but its weights have 6"): load_predictor(path)


def test_official_other_class_count(env, tmp_path):
    other = build_model(replace(env["cfg"], num_classes=4))
    path = tmp_path / "official4.pth"
    torch.save({"state_dict": to_official_state_dict(other.state_dict(), env["cfg"])}, path)
    with pytest.raises(ValueError, match="class-count mismatch"):
        load_predictor(path, preset="co_deformable_detr_tiny", ann_file=env["synth"].val_json)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(Exception, match="junk.pt"): load_predictor(tmp_path / "junk.pt")
    torch.save({"model": {}, "config": {}}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt"): load_predictor(tmp_path / "empty.pt", preset="co_deformable_detr_tiny")


def test_unreadable_image_named(env, predictor, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(OSError, match="broken.jpg"):
        predict_files(predictor, [env["synth"].val_images, tmp_path], tmp_path / "out", draw=False)
    with pytest.warns(UserWarning, match="broken.jpg"):
        s = predict_files(predictor, [tmp_path / "broken.jpg", env["synth"].val_images], tmp_path / "out2",
                          skip_unreadable=True, draw=False)
    assert s["images"] == 3 and len(s["skipped"]) == 1


# ---------------------------------------------------------------- the predictor

@pytest.mark.parametrize("hw", [(40, 90), (96, 64), (123, 123), (300, 70)])
def test_predictor_sizes_and_bounds(predictor, hw):
    rng = np.random.default_rng(hw[0])
    arr = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    x, sizes = predictor.prepare(arr)
    aug = predictor.cfg.aug
    assert sizes == {"img_size": resized_hw(hw, aug.test_scale, aug.test_max_size), "orig_size": hw}
    det = predictor([arr])[0]
    assert det["boxes"].shape == (predictor.cfg.query_head.test_top_k, 4)
    assert (det["boxes"] >= 0).all()
    assert (det["boxes"][:, 0::2] <= hw[1] + 1e-3).all() and (det["boxes"][:, 1::2] <= hw[0] + 1e-3).all()
    assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_predictor_input_forms_agree(env, predictor):
    pil = load_image(env["synth"].val_images / "000001.png")
    arr = np.array(pil)
    outs = [predictor([im])[0] for im in (pil, arr, torch.from_numpy(arr).permute(2, 0, 1))]
    for o in outs[1:]: torch.testing.assert_close(o["boxes"], outs[0]["boxes"])
    with pytest.raises(ValueError, match="RGB image"): predictor([np.zeros((5, 5), np.float32)])


def test_predictor_matches_model_on_transformed_input(env, predictor):
    "Oracle: the model called directly on eval_transforms' output, boxes rescaled to the file by hand."
    ds = CocoDetection(env["synth"].val_images, env["synth"].val_json, eval_transforms(env["cfg"].aug))
    image, target = ds[2]
    with torch.no_grad(): direct = env["model"]([image.as_subclass(torch.Tensor)], [{"img_size": target["img_size"]}])[0]
    (h, w), (oh, ow) = target["img_size"], target["orig_size"]
    expected = scale_boxes(direct["boxes"], (ow / w, oh / h))
    got = predictor([load_image(ds.img_folder / ds.coco.imgs[ds.ids[2]]["file_name"])])[0]
    torch.testing.assert_close(got["boxes"], expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["scores"], direct["scores"])


def test_batch_keeps_each_image_in_its_own_pixels(env, predictor):
    "A padded batch gives each image boxes in its own pixels (scores differ slightly from one-by-one runs: the"
    " neck's GroupNorm statistics include the padding, as in the official code, so predict_files goes one by one)."
    imgs = [load_image(p) for p in image_files(env["synth"].val_images)]
    assert len({im.size for im in imgs}) > 1
    for im, det in zip(imgs, predictor(imgs)):
        assert (det["boxes"][:, 0::2] <= im.width + 1e-3).all() and (det["boxes"][:, 1::2] <= im.height + 1e-3).all()


# ---------------------------------------------------------------- files written

def test_predict_files_outputs(env, predictor, tmp_path):
    s = predict_files(predictor, env["synth"].val_images, tmp_path, score_thr=0.3, ann_file=env["synth"].val_json)
    files = image_files(env["synth"].val_images)
    results = json.loads((tmp_path / "detections.json").read_text())
    images = json.loads((tmp_path / "images.json").read_text())
    assert s["images"] == 3 and s["detections"] == len(results) == 3 * predictor.cfg.query_head.test_top_k
    assert s["drawn"] == sum(r["score"] >= 0.3 for r in results)
    coco = CocoDetection(env["synth"].val_images, env["synth"].val_json).coco
    by_name = {i["file_name"]: i["id"] for i in coco.dataset["images"]}
    assert [i["id"] for i in images] == [by_name[f.name] for f in files]
    # oracle: the predictor's boxes, converted to xywh by hand
    det = predictor([load_image(files[0])])[0]
    mine = [r for r in results if r["image_id"] == images[0]["id"]]
    b = det["boxes"]
    np.testing.assert_allclose([r["bbox"] for r in mine], torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).numpy(),
                               rtol=1e-5, atol=1e-4)
    assert [r["category_id"] for r in mine] == [SYNTHETIC_CATEGORY_IDS[int(l)] for l in det["labels"]]
    for f, im in zip(files, images):
        with Image.open(tmp_path / "annotated" / f"{f.stem}.png") as a: assert a.size == (im["width"], im["height"])
    assert 0 <= coco_evaluate(coco, results)["AP"] <= 1


def test_ids_without_annotations_and_name_clashes(env, predictor, tmp_path):
    other = tmp_path / "other"; other.mkdir()
    src = env["synth"].val_images / "000000.png"
    (other / "000000.png").write_bytes(src.read_bytes())
    s = predict_files(predictor, [env["synth"].val_images, other], tmp_path / "out", draw=True)
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [i["id"] for i in images] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "out" / "annotated").iterdir()) == \
        ["000000.png", "000000_1.png", "000001.png", "000002.png"]
    s2 = predict_files(predictor, src, tmp_path / "nodraw", draw=False)
    assert s2["images"] == 1 and not (tmp_path / "nodraw" / "annotated").exists()


def test_annotate_draws_only_above_threshold(predictor, env):
    img = load_image(env["synth"].val_images / "000000.png")
    det = {"boxes": torch.tensor([[1., 1., 20., 20.], [5., 5., 30., 40.]]), "scores": torch.tensor([0.9, 0.1]),
           "labels": torch.tensor([0, 3])}
    fig = annotate(img, det, list(SYNTHETIC_CLASSES), score_thr=0.5)
    assert len(fig.axes[0].patches) == 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["ellipse 0.90"]
    w, h = fig.get_size_inches() * fig.dpi
    assert (round(w), round(h)) == img.size


# ---------------------------------------------------------------- command line

@pytest.mark.slow
def test_cli_writes_annotated_images(env, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "codetr.engine.predict", str(env["ckpt"]), str(env["synth"].val_images),
                           "--out", str(out), "--ann", str(env["synth"].val_json), "--device", "cpu"],
                          capture_output=True, text=True, env=dict(os.environ, MPLBACKEND="Agg"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 images" in proc.stdout
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert json.loads((out / "detections.json").read_text())


def test_cli_errors_name_the_file(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        main([str(tmp_path / "nope.pt"), str(env["synth"].val_images), "--out", str(tmp_path / "o")])


def test_cli_options_may_come_between_checkpoint_and_inputs(env, tmp_path):
    summary = main([str(env["ckpt"]), "--out", str(tmp_path / "o"), str(env["synth"].val_images), "--no-draw",
                    "--ann", str(env["synth"].val_json), "--device", "cpu"])
    assert summary["images"] == 3


def test_cli_needs_a_checkpoint_or_pretrained(env, tmp_path, capsys):
    with pytest.raises(SystemExit): main([str(env["synth"].val_images), "--out", str(tmp_path)])
    assert "or --pretrained NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit): main(["--pretrained", "co_dino_5scale_r50_1x_coco", "--preset", "co_dino_tiny",
                                          str(env["synth"].val_images), "--out", str(tmp_path)])
    assert "--preset does not go with --pretrained" in capsys.readouterr().err


def test_import_does_not_run_cli(monkeypatch):
    import importlib
    import codetr.engine.predict
    monkeypatch.setattr(sys, "argv", ["x", "--bogus"])  # main() would exit on this
    importlib.reload(codetr.engine.predict)


def test_predictor_with_a_padding_recipe_knows_the_image_size():
    """LSJ pads every image to a square canvas: the predictor gives the model the resized image's own size (not the
    canvas), so detections map back to the original pixels on both axes."""
    from codetr.data.lsj import LSJConfig
    from codetr.models.co_dino import co_dino_tiny
    cfg = replace(co_dino_tiny(3), aug=LSJConfig(size=64), with_attn_mask=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    pred = Predictor(model, cfg, identity_class_mapping(3))
    image = torch.randint(0, 255, (3, 60, 120), dtype=torch.uint8)
    x, sizes = pred.prepare(image)
    assert tuple(x.shape) == (3, 64, 64) and sizes == {"img_size": (32, 64), "orig_size": (60, 120)}
    det = pred([image])[0]
    assert len(det["boxes"]) > 0
    assert (det["boxes"][:, 0::2] <= 120).all() and (det["boxes"][:, 1::2] <= 60).all()
    # the same detections as the model's own call with these sizes: boxes scaled from the 64 x 64 canvas by 120 / 64
    with torch.no_grad(): direct = model([x], [sizes])[0]
    torch.testing.assert_close(det["boxes"], direct["boxes"])
    assert det["boxes"][:, 1::2].max() > 30  # y reaches beyond half the image (the wrong scale would halve it)
