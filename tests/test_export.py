"""Exported detectors (ONNX through onnxruntime, torch.export programs) against the PyTorch model they came from:
the same detections at image sizes the export never saw, Co-DINO's soft-NMS after the graph, the command lines, and
the errors for bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from codetr.core.config import config_to_dict
from codetr.engine.export import ExportedModel, ExportedPredictor, InferenceModel, export_model, main as export_main
from codetr.engine.predict import load_predictor, main as predict_main
from codetr.models.detector import build_model
from codetr.models.presets import get_preset
from codetr.ops.box_ops import box_iou

pytest.importorskip("onnxruntime")


def trained_like(preset: str, cfg_options=()):
    "A fresh model with spread-out class scores, as after training (fresh class layers tie across classes)."
    from codetr.core.config import override, parse_cfg_options
    cfg = override(get_preset(preset).without_pretrained(), **parse_cfg_options(list(cfg_options)))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.query_head.cls_branches.parameters(): p.normal_(0, 0.5)
    return model, cfg


def save_checkpoint(model, cfg, path):
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": [f"c{i}" for i in range(cfg.num_classes)],
                "label_to_cat_id": list(range(1, cfg.num_classes + 1))}, path)
    return path


def match(dets, want, box_px=1e-2, score=1e-4):
    "Every reference detection has one of ours with the same label, IoU > 0.99, scores within `score`; boxes within `box_px`."
    assert len(dets["scores"]) == len(want["scores"]), (len(dets["scores"]), len(want["scores"]))
    iou = box_iou(want["boxes"].double(), dets["boxes"].double())
    gap = (want["scores"][:, None].double() - dets["scores"][None].double()).abs()
    cost = torch.where((iou > 0.99) & (want["labels"][:, None] == dets["labels"][None]), gap, torch.full_like(gap, 1e6))
    rows, cols = linear_sum_assignment(cost.numpy())
    assert (cost[rows, cols] < 1e6).all(), "detections without a partner"
    assert float(gap[rows, cols].max()) <= score
    assert float((dets["boxes"][cols].double() - want["boxes"][rows].double()).abs().max()) <= box_px


@pytest.fixture(scope="module")
def co_def(tmp_path_factory):
    work = tmp_path_factory.mktemp("export_codef")
    model, cfg = trained_like("co_deformable_detr_tiny")
    ckpt = save_checkpoint(model, cfg, work / "tiny.pt")
    files = {fmt: export_model(ckpt, work / fmt, fmt, example_hw=(128, 160)) for fmt in ("onnx", "torch_export")}
    return dict(work=work, model=model, cfg=cfg, ckpt=ckpt, files=files)


def photos(sizes, seed=0):
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_exported_graph_equals_pytorch_at_untraced_sizes(co_def, fmt):
    graph = InferenceModel(co_def["model"], 100)
    for hw in ((96, 144), (200, 120)):  # neither is the traced (128, 160)
        x = torch.randn(2, 3, *hw)
        sizes = torch.tensor([list(hw), [hw[0] - 21, hw[1] - 13]])
        with torch.no_grad(): want = graph(x, sizes)
        got = ExportedModel(co_def["files"][fmt])(x, sizes)
        for b in range(2):  # by matching: two near-tied scores may come out in either order
            match(dict(zip(("boxes", "scores", "labels"), (t[b] for t in got))),
                  dict(zip(("boxes", "scores", "labels"), (t[b] for t in want))))


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_exported_predictor_equals_the_checkpoints_predictor(co_def, fmt):
    "The whole path (test transform, graph, scaling to the file's pixels) against the eager model with its CPU attention."
    eager = load_predictor(co_def["ckpt"])
    exported = ExportedPredictor(co_def["files"][fmt])
    assert exported.classes.names == eager.classes.names and exported.classes.cat_ids == eager.classes.cat_ids
    for im in photos([(90, 130), (150, 70)]):
        match(exported([im])[0], eager([im])[0])


def test_co_dino_soft_nms_runs_after_the_graph(tmp_path):
    "mmdet 3.x post-processing: the graph's top 100 candidates, then class-aware soft-NMS, as CoDINOHead.predict."
    model, cfg = trained_like("co_dino_tiny", ["query_head.postprocess=mmdet3"])
    ckpt = save_checkpoint(model, cfg, tmp_path / "dino.pt")
    path = export_main([str(ckpt), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--example-size", "128", "160"])
    meta = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert meta["postprocess"] == {"candidates": 100, "soft_nms_iou": 0.8, "keep": 100}
    eager, exported = load_predictor(ckpt), ExportedPredictor(path)
    for im in photos([(100, 120), (140, 90)], seed=1):
        want, got = eager([im])[0], exported([im])[0]
        assert len(want["scores"]) < 100 or want["scores"].min() < want["scores"].max()  # soft-NMS decayed scores
        match(got, want)


def test_exported_model_on_the_parity_input_and_raccoon_photos(co_def, shared_data):
    "The official parity input (512x512, a size not traced) through both graphs, and two real photos at their own sizes."
    from parity_utils import missing_reference, parity_input, reference_folder
    x, folder = parity_input(reference_folder("co_deformable_detr_r50")), shared_data / "raccoon" / "images"
    if not folder.is_dir(): missing_reference(f"raccoon photos not found at {folder} (set CODETR_SHARED_DATA)")
    sizes = torch.tensor([[512, 512]])
    with torch.no_grad(): want = InferenceModel(co_def["model"], 100)(torch.from_numpy(x), sizes)
    as_det = lambda t: dict(zip(("boxes", "scores", "labels"), (v[0] for v in t)))
    eager = load_predictor(co_def["ckpt"])
    ims = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))[:2]]
    assert len(ims) == 2 and len({im.size for im in ims}) == 2
    for fmt in ("onnx", "torch_export"):
        match(as_det(ExportedModel(co_def["files"][fmt])(torch.from_numpy(x), sizes)), as_det(want))
        exported = ExportedPredictor(co_def["files"][fmt])
        for im in ims: match(exported([im])[0], eager([im])[0])


def test_predict_cli_runs_an_exported_file(co_def, tmp_path):
    ims = photos([(80, 100), (120, 90)], seed=2)
    folder = tmp_path / "images"; folder.mkdir()
    for i, im in enumerate(ims): im.save(folder / f"im{i}.png")
    a = predict_main([str(co_def["ckpt"]), str(folder), "--out", str(tmp_path / "eager"), "--no-draw", "--device", "cpu"])
    b = predict_main([str(co_def["files"]["onnx"]), str(folder), "--out", str(tmp_path / "onnx"), "--no-draw"])
    assert a["detections"] == b["detections"] > 0
    ra, rb = (json.loads((tmp_path / d / "detections.json").read_text()) for d in ("eager", "onnx"))
    assert sorted(r["category_id"] for r in ra) == sorted(r["category_id"] for r in rb)
    assert abs(sum(r["score"] for r in ra) - sum(r["score"] for r in rb)) < 1e-3


def test_bad_input_names_the_file_or_argument(co_def, tmp_path):
    onnx_file = co_def["files"]["onnx"]
    with pytest.raises(ValueError, match="RGB"): ExportedModel(onnx_file)(torch.randn(1, 4, 96, 96), torch.tensor([[96, 96]]))
    with pytest.raises(ValueError, match="height 32 is outside"):
        ExportedModel(onnx_file)(torch.randn(1, 3, 32, 96), torch.tensor([[32, 96]]))
    with pytest.raises(ValueError, match="opset=11"): export_model(co_def["ckpt"], tmp_path / "x", "onnx", opset=11)
    with pytest.raises(ValueError, match="format"): export_model(co_def["ckpt"], tmp_path / "x", "tflite")
    bare = tmp_path / "bare.pt"
    torch.save(co_def["model"].state_dict(), bare)  # weights without a config
    with pytest.raises(ValueError, match=f"{bare}.*stores no config"): export_model(bare, tmp_path / "x")
    with pytest.raises(Exception, match="co_deformable_detr_tiny"):  # another family's preset: names the one that fits
        export_model(bare, tmp_path / "x", preset="co_dino_tiny")
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(onnx_file.read_bytes())
    with pytest.raises(FileNotFoundError, match="export.json"): ExportedPredictor(lone)
