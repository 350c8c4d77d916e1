"""Official parity: the official Co-Deformable-DETR R50, rebuilt from its key names (`fill.py`), converted with
codetr's converter and loaded strictly, computes on the fixed input what the official model computed
(`../shared/parity/co_deformable_detr_r50`). Also: parameter counts per official module and the loss-key set.

The references live outside the repository. Without them these tests skip, except under the CI entry point
(`CODETR_REQUIRE_SHARED=1`, set by `.ci/run`), where a missing reference is a failure."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from codetr.core.config import override
from codetr.engine.checkpoint import load_official, to_official_key
from codetr.models.co_deformable_detr import co_deformable_detr_r50_1x_coco
from codetr.models.detector import build_model
from codetr.ops.box_ops import box_iou
from codetr.transformer.deformable import CoDeformableTransformer

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("CODETR_SHARED_PARITY", REPO.parent / "shared" / "parity"))
REF = PARITY / "co_deformable_detr_r50"
REQUIRED = os.environ.get("CODETR_REQUIRE_SHARED", "") not in ("", "0")

LOGIT_TOL = 1e-4   # the official model's own 1- vs 2-thread spread is ~6e-6 (meta.json)
BOX_PX_TOL = 1e-3  # pixels; the spread is ~3e-4 px


def _reference_folder() -> Path:
    files = ("keys.txt", "meta.json", "outputs.npz", "params.json", "loss_keys.txt")
    missing = [f for f in files if not (REF / f).is_file()] + ([] if (PARITY / "fill.py").is_file() else ["../fill.py"])
    if missing:
        msg = f"official parity reference {REF} lacks {missing} (set CODETR_SHARED_PARITY to its folder)"
        if REQUIRED: pytest.fail(msg)
        pytest.skip(msg)
    return REF


def _fill_module():
    spec = importlib.util.spec_from_file_location("codetr_parity_fill", PARITY / "fill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_cfg():
    "The official config with the ImageNet download off (the weights come from the reference)."
    return override(co_deformable_detr_r50_1x_coco(), **{"backbone.weights": None})


@pytest.fixture(scope="module")
def ref():
    folder = _reference_folder()
    fill = _fill_module()
    meta = json.loads((folder / "meta.json").read_text())
    sd = fill.fill_state_dict(fill.load_keys(folder / "keys.txt"))
    assert fill.fingerprint(sd) == meta["weights"]["fingerprint"], "fill.py did not rebuild the reference weights"
    x = np.random.default_rng(0).normal(0, 1, size=(1, 3, 512, 512)).astype(np.float32)
    out = dict(np.load(folder / "outputs.npz"))
    np.testing.assert_array_equal(x[0, :, 0, :8], out["input_head"])
    return dict(folder=folder, meta=meta, state_dict=sd, image=torch.from_numpy(x), out=out)


def build_official(ref):
    cfg = official_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    load_official(model, ref["state_dict"], cfg, strict=True)
    return model.eval(), cfg


def run_model(model, image):
    "Every output the model exposes on the fixed input: neck maps, head outputs, top-100 detections."
    pad_mask = torch.zeros(1, *image.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        neck = model.neck(model.backbone(image))
        outputs = model.query_outputs(image, pad_mask)
        dets = model.query_head.predict(outputs, [(512, 512)], [(512, 512)], top_k=100)[0]
    st = outputs.state
    return dict(neck=neck, memory=st.memory[0], shapes=st.spatial_shapes, starts=st.level_start_index,
                enc_logits=outputs.enc_logits[0], init_ref=st.init_reference[0], inter_refs=st.inter_references[:, 0],
                logits=outputs.all_logits[:, 0], boxes=outputs.all_boxes_cxcywh[:, 0], dets=dets)


@pytest.fixture(scope="module")
def ours(ref):
    model, _ = build_official(ref)
    return run_model(model, ref["image"])


def _close(name: str, got, want, atol: float):
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, official {want.shape}"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    assert err <= atol, f"{name}: max abs difference {err:.3g} > {atol:.3g}"
    return err


def compare_raw(o, r) -> dict[str, float]:
    "Elementwise comparison of every raw output against the reference; returns the max errors."
    errs = {}
    np.testing.assert_array_equal(np.array([[1, 256, *f.shape[-2:]] for f in o["neck"]]), r["neck_shapes"])
    errs["neck_patch"] = _close("neck_patch", torch.stack([f[0, :8, 0, :8] for f in o["neck"]]), r["neck_patch"], 1e-4)
    errs["neck_mean"] = _close("neck_mean", [f.double().mean() for f in o["neck"]], r["neck_mean"], 1e-6)
    errs["neck_std"] = _close("neck_std", [f.double().std() for f in o["neck"]], r["neck_std"], 1e-6)
    mem, starts = o["memory"], o["starts"]
    np.testing.assert_array_equal(starts.numpy(), r["memory_level_start"])
    errs["memory_head"] = _close("memory_head", mem[:8, :8], r["memory_head"], 1e-4)
    errs["memory_level_heads"] = _close("memory_level_heads", torch.stack([mem[s:s + 8, :8] for s in starts.tolist()]),
                                        r["memory_level_heads"], 1e-4)
    errs["memory_mean"] = _close("memory_mean", mem.double().mean(), r["memory_mean"], 1e-6)
    errs["memory_std"] = _close("memory_std", mem.double().std(), r["memory_std"], 1e-6)
    errs["enc_score_fg"] = _close("enc_score_fg", o["enc_logits"][:, 0], r["enc_score_fg"], LOGIT_TOL)
    errs["enc_topk_ref"] = _close("enc_topk_ref_cxcywh (px)", 512 * o["init_ref"], 512 * r["enc_topk_ref_cxcywh"], BOX_PX_TOL)
    errs["dec_inter_refs"] = _close("dec_inter_refs_cxcywh (px)", 512 * o["inter_refs"], 512 * r["dec_inter_refs_cxcywh"],
                                    BOX_PX_TOL)
    errs["cls_logits"] = _close("cls_logits", o["logits"], r["cls_logits"], LOGIT_TOL)
    errs["boxes"] = _close("boxes_cxcywh (px)", 512 * o["boxes"], 512 * r["boxes_cxcywh"], BOX_PX_TOL)
    return errs


def match_detections(dets: dict, r) -> dict[str, float]:
    "Match every official detection to one of ours with the same label (greedy on IoU); returns the worst errors."
    boxes, scores, labels = dets["boxes"].double(), dets["scores"].double(), dets["labels"]
    want_boxes = torch.from_numpy(r["det_bboxes_xyxy"]).double()
    want_scores, want_labels = torch.from_numpy(r["det_scores"]).double(), torch.from_numpy(r["det_labels"])
    assert len(boxes) == len(want_boxes), f"{len(boxes)} detections, official {len(want_boxes)}"
    iou = box_iou(want_boxes, boxes)  # (100, 100)
    iou[want_labels[:, None] != labels[None]] = -1
    score_gap = (want_scores[:, None] - scores[None]).abs()  # (100, 100)
    taken, worst_box, worst_score = set(), 0.0, 0.0
    for i in range(len(want_boxes)):
        cost = torch.where(iou[i] > 0.999, score_gap[i], torch.full_like(score_gap[i], float("inf")))
        for j in taken: cost[j] = float("inf")
        j = int(cost.argmin())
        assert torch.isfinite(cost[j]), f"official detection {i} (label {int(want_labels[i])}) has no match"
        taken.add(j)
        worst_box = max(worst_box, float((boxes[j] - want_boxes[i]).abs().max()))
        worst_score = max(worst_score, float(score_gap[i, j]))
    assert worst_box <= BOX_PX_TOL, f"matched detection boxes differ by {worst_box:.3g} px"
    assert worst_score <= 1e-5, f"matched detection scores differ by {worst_score:.3g}"
    return dict(det_box_px=worst_box, det_score=worst_score)


def test_raw_outputs_equal_official(ref, ours):
    errs = compare_raw(ours, ref["out"])
    print({k: f"{v:.2g}" for k, v in errs.items()})


def test_detections_equal_official(ref, ours):
    print(match_detections(ours["dets"], ref["out"]))


def test_parity_fails_when_two_stage_ranks_by_max_class(ref, monkeypatch):
    "The check has teeth: ranking the encoder proposals by the max class (DINO) instead of class 0 breaks parity."
    original = CoDeformableTransformer.select_queries
    def by_max(self, enc_class, enc_coord, query_embed):
        return original(self, enc_class.max(-1, keepdim=True).values.expand_as(enc_class), enc_coord, query_embed)
    monkeypatch.setattr(CoDeformableTransformer, "select_queries", by_max)
    model, _ = build_official(ref)
    with pytest.raises(AssertionError, match="enc_topk_ref"):
        compare_raw(run_model(model, ref["image"]), ref["out"])


def test_parameter_counts_per_official_module(ref):
    cfg = official_cfg()
    model = build_model(cfg)
    params = json.loads((ref["folder"] / "params.json").read_text())
    names = {to_official_key(n, cfg): p for n, p in model.named_parameters()}
    count = lambda prefix, trainable=False: sum(p.numel() for n, p in names.items()
                                                if (n + ".").startswith(prefix + ".") and (p.requires_grad or not trainable))
    assert sum(p.numel() for p in names.values()) == params["total_params"]
    assert sum(p.numel() for p in names.values() if p.requires_grad) == params["trainable_params"]
    for top, want in params["top_level"].items():
        assert (count(top), count(top, True)) == (want["params"], want["trainable"]), top
    wrong = {k: (count(k), v) for k, v in params["second_level_params"].items() if count(k) != v}
    assert not wrong, f"parameter counts (ours, official) differ: {wrong}"
    tops = {n.split(".")[0] for n in names}
    assert tops == set(params["top_level"]), tops


def test_state_dict_keys_equal_official(ref):
    cfg = official_cfg()
    keys = {to_official_key(k, cfg): tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ref["state_dict"].items()}
    assert keys == want


def test_loss_keys_equal_official(ref):
    "One training step of the official model returns these loss names (values depend on the official sampling)."
    cfg = official_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = torch.randn(1, 3, 256, 256)
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 140.0, 170.0], [100.0, 60.0, 230.0, 200.0]]),
                "labels": torch.tensor([3, 17]), "img_size": (256, 256)}]
    losses = model(images, targets)
    want = set((ref["folder"] / "loss_keys.txt").read_text().split())
    assert set(losses) == want, (sorted(set(losses) - want), sorted(want - set(losses)))
