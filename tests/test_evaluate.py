"""Tests for codetr.engine.evaluate: the canonical pycocotools check, per-class AP against COCOeval restricted to one
class, empty and invalid results, atomic run files, weights-only loading, evaluate() end to end and the CLI."""
import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from codetr.models.presets import PRESETS, get_preset
from codetr.data.coco import AugConfig, build_dataset
from codetr.core.config import config_from_dict, config_to_dict
import codetr.core.io
from codetr.core.io import CheckpointError, atomic_write, safe_load
from codetr.engine.checkpoint import load_state_dict_file
from codetr.engine.evaluate import (STAT_NAMES, ap_table, coco_evaluate, evaluate, inference, main, shard_loader,
                                    ShardSampler, write_metrics)
from codetr.data.synthetic import make_synthetic_coco

SMALL_AUG = AugConfig(scales=(48, 64), max_size=96, crop_scales=(48,), crop_max_size=96, crop_range=(32, 48),
                      test_scale=64, test_max_size=96)


@pytest.fixture(scope="module")
def fake100(shared_data):
    folder = shared_data / "coco_eval_fakebbox100"
    if not (folder / "expected.json").exists(): pytest.skip(f"canonical COCO check not found in {folder}")
    with contextlib.redirect_stdout(io.StringIO()): gt = COCO(str(folder / "instances_val2014_100.json"))
    results = json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text())
    return gt, results, json.loads((folder / "expected.json").read_text())


def test_canonical_fakebbox100(fake100):
    gt, results, expected = fake100
    assert expected["stats_order"] == list(STAT_NAMES)
    m = coco_evaluate(gt, results)
    np.testing.assert_allclose([m[k] for k in STAT_NAMES], expected["expected_stats"], rtol=0, atol=1e-10)


def test_per_class_ap_matches_single_class_cocoeval(fake100):
    gt, results, _ = fake100
    m = coco_evaluate(gt, results)
    present = [v for v in m["per_class_AP"].values() if v is not None]
    assert abs(np.mean(present) - m["AP"]) < 1e-12
    assert len(m["per_class_AP"]) == 80
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        for cat_id in sorted(gt.getCatIds())[:6]:
            ev = COCOeval(gt, dt, "bbox"); ev.params.catIds = [cat_id]
            ev.evaluate(); ev.accumulate(); ev.summarize()
            want = ev.stats[0] if ev.stats[0] >= 0 else None
            got = m["per_class_AP"][gt.cats[cat_id]["name"]]
            assert (got is None and want is None) or abs(got - want) < 1e-12, cat_id


def test_results_not_mutated_and_table(fake100, capsys):
    gt, results, _ = fake100
    before = copy.deepcopy(results[:50])
    m = coco_evaluate(gt, results[:50], print_table=True)
    assert results[:50] == before
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out and out.count("\n") == 12
    table = ap_table(m)
    assert table.splitlines()[0].split() == list(STAT_NAMES) and "person" in table


def tiny_gt():
    coco = COCO()
    coco.dataset = {"images": [{"id": 4, "width": 50, "height": 40}],
                    "categories": [{"id": 2, "name": "a"}, {"id": 9, "name": "b"}],
                    "annotations": [{"id": 1, "image_id": 4, "category_id": 9, "bbox": [1, 2, 20, 10], "area": 200, "iscrowd": 0}]}
    with contextlib.redirect_stdout(io.StringIO()): coco.createIndex()
    return coco


def test_empty_results_all_zeros():
    m = coco_evaluate(tiny_gt(), [], print_table=False)
    assert all(m[k] == 0.0 for k in STAT_NAMES) and m["per_class_AP"] == {"a": 0.0, "b": 0.0}
    json.dumps(m)


def test_invalid_results_named():
    det = {"image_id": 4, "category_id": 9, "bbox": [1, 2, 20, 10], "score": 0.5}
    m = coco_evaluate(tiny_gt(), [det])
    assert abs(m["AP"] - 1) < 1e-12 and m["per_class_AP"]["a"] is None and abs(m["per_class_AP"]["b"] - 1) < 1e-12
    with pytest.raises(ValueError, match=r"image id\(s\) \[5\]"): coco_evaluate(tiny_gt(), [{**det, "image_id": 5}])
    with pytest.raises(ValueError, match=r"category id\(s\) \[1\]"): coco_evaluate(tiny_gt(), [{**det, "category_id": 1}])


def test_atomic_write_and_metrics(tmp_path, monkeypatch):
    write_metrics(tmp_path, {"AP": 0.5}, [{"image_id": 1}])
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"AP": 0.5}
    def boom(*a): raise OSError("no space left")
    monkeypatch.setattr(codetr.core.io.os, "replace", boom)
    with pytest.raises(OSError, match="no space"): write_metrics(tmp_path, {"AP": 0.9})
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"AP": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detections.json", "metrics.json"]
    atomic_write(tmp_path / "sub" / "x.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("n,world", [(7, 1), (7, 2), (7, 3), (2, 4)])
def test_shard_sampler_covers_once(n, world):
    parts = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_roundtrip(name, tmp_path):
    cfg = get_preset(name)
    torch.save({"config": config_to_dict(cfg)}, tmp_path / "c.pt")
    assert config_from_dict(safe_load(tmp_path / "c.pt")["config"]) == cfg
    with pytest.raises(ValueError, match="no field"): config_from_dict({**config_to_dict(cfg), "bogus": 1})


def test_safe_load_refuses_code(tmp_path):
    torch.save({"model": {}, "cfg": get_preset("co_deformable_detr_tiny")}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="arbitrary code"): safe_load(tmp_path / "x.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "sd.pt")
    assert torch.equal(load_state_dict_file(tmp_path / "sd.pt")["w"], torch.ones(1))


# ---------------------------------------------------------------- end to end with stand-in detectors

class AnswerReaderDouble(nn.Module):
    "Test double: predicts the targets' boxes mapped back to original pixels (a correct pipeline scores AP 1)."
    def __init__(self, cfg=None):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
    def forward(self, images, targets=None, pad_mask=None):
        outs = []
        for t in targets:
            (h, w), (oh, ow) = t["img_size"], t["orig_size"]
            boxes = t["boxes"] * torch.tensor([ow / w, oh / h, ow / w, oh / h]) * self.w
            outs.append({"boxes": boxes, "scores": torch.linspace(1, 0.5, len(boxes)), "labels": t["labels"]})
        return outs


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), n_train=2, n_val=6, min_size=64, max_size=96, seed=1)


def test_evaluate_end_to_end_perfect(synth):
    val = build_dataset("val", synth.val_images, synth.val_json, aug=SMALL_AUG)
    assert val.label_to_cat_id != list(range(1, val.num_classes + 1))  # non-contiguous ids exercise the mapping
    model = AnswerReaderDouble().train()
    metrics, results = evaluate(model, shard_loader(val, batch_size=3), val, progress=False)
    assert model.training  # mode restored
    assert abs(metrics["AP"] - 1.0) < 1e-9 and all(v in (None, 1.0) or abs(v - 1) < 1e-9 for v in metrics["per_class_AP"].values())
    assert len(results) == len(val.coco.getAnnIds())
    gt = {(a["image_id"], a["category_id"]) for a in val.coco.dataset["annotations"]}
    assert {(r["image_id"], r["category_id"]) for r in results} == gt


def test_evaluate_with_trainable_double(synth):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import TinyDetectorDouble, tiny_cfg
    val = build_dataset("val", synth.val_images, synth.val_json, aug=SMALL_AUG)
    torch.manual_seed(0)
    model = TinyDetectorDouble(tiny_cfg(num_classes=val.num_classes))
    metrics, results = evaluate(model, shard_loader(val, batch_size=2), val, progress=False)
    assert 0 <= metrics["AP"] <= 1 and len(results) == len(val) * 3
    assert {r["category_id"] for r in results} <= set(val.label_to_cat_id)
    again = inference(model, shard_loader(val, batch_size=4), val.label_to_cat_id, progress=False)  # batch size invariant
    assert [(r["image_id"], r["category_id"]) for r in again] == [(r["image_id"], r["category_id"]) for r in results]
    np.testing.assert_allclose([r["bbox"] for r in again], [r["bbox"] for r in results], atol=1e-3)


def test_evaluate_cli(tmp_path, synth):
    cfg_opts = ["--cfg-options", "aug.test_scale=64", "aug.test_max_size=96"]
    torch.save({"model": AnswerReaderDouble().state_dict()}, tmp_path / "plain.pt")
    metrics = main(["co_deformable_detr_tiny", "--checkpoint", str(tmp_path / "plain.pt"), "--images",
                    str(synth.val_images), "--ann", str(synth.val_json), "--batch-size", "2", *cfg_opts],
                   model_factory=AnswerReaderDouble)
    assert abs(metrics["AP"] - 1) < 1e-9
    assert json.loads((tmp_path / "metrics.json").read_text())["AP"] == metrics["AP"]
    assert len(json.loads((tmp_path / "detections.json").read_text())) == len(COCO(str(synth.val_json)).getAnnIds())
    from safetensors.torch import save_file
    save_file(AnswerReaderDouble().state_dict(), tmp_path / "w.safetensors")
    metrics = main(["co_deformable_detr_tiny", "--checkpoint", str(tmp_path / "w.safetensors"), "--images",
                    str(synth.val_images), "--ann", str(synth.val_json), "--work-dir", str(tmp_path / "out"), *cfg_opts],
                   model_factory=AnswerReaderDouble)
    assert (tmp_path / "out" / "metrics.json").exists() and abs(metrics["AP"] - 1) < 1e-9


def test_evaluate_cli_needs_one_source_of_weights(tmp_path, capsys):
    with pytest.raises(SystemExit): main(["co_deformable_detr_tiny"])
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit): main(["co_deformable_detr_tiny", "--checkpoint", "a.pt", "--pretrained", "b"])
    assert "not allowed with" in capsys.readouterr().err
    torch.save({"model": AnswerReaderDouble().state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="stores no config: name its preset"): main(["--checkpoint", str(tmp_path / "plain.pt")])


def test_evaluate_cli_uses_the_checkpoint_config(tmp_path, synth):
    from dataclasses import replace
    stored = replace(get_preset("co_deformable_detr_tiny"), lambda_2=3.0)
    torch.save({"model": AnswerReaderDouble().state_dict(), "config": config_to_dict(stored)}, tmp_path / "c.pt")
    seen = []
    def factory(cfg):
        seen.append(cfg)
        return AnswerReaderDouble()
    main(["co_deformable_detr_r50_1x_coco", "--checkpoint", str(tmp_path / "c.pt"), "--images", str(synth.val_images),
          "--ann", str(synth.val_json), "--cfg-options", "aug.test_scale=64", "aug.test_max_size=96"], model_factory=factory)
    assert seen[0].name == "co_deformable_detr_tiny" and seen[0].lambda_2 == 3.0 and seen[0].aug.test_scale == 64
    assert seen[0].num_classes == 6  # from the data set's categories
