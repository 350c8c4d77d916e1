"""codetr.data.synthetic: determinism, caching, COCO compatibility, tight boxes and the variety of the default set."""
import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from codetr.data.synthetic import (SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASSES, Shape, dataset_summary, default_data_dir,
                              make_synthetic_coco, render_scene, sample_scene, shape_area, shape_mask,
                              shape_polygons, synthetic_dataset, synthetic_sample, visible_boxes)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=10, n_val=4, min_size=64, max_size=96, seed=0)


def files_of(root: Path) -> dict[str, bytes]:
    "Every file the generator wrote under `root` (the lock file aside), by relative path."
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def bbox_of(mask: np.ndarray) -> list[float]:
    "COCO [x, y, w, h] of the True pixels of a (H, W) mask, by brute force."
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def run_quiet(fn):
    with contextlib.redirect_stdout(io.StringIO()): return fn()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("small") / "set", **SMALL)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    "The default set, made through synthetic_dataset() with $CODETR_DATA_DIR pointing at a temporary folder."
    data_dir, old = tmp_path_factory.mktemp("data"), os.environ.get("CODETR_DATA_DIR")
    os.environ["CODETR_DATA_DIR"] = str(data_dir)
    try: paths = synthetic_dataset()
    finally:
        if old is None: del os.environ["CODETR_DATA_DIR"]
        else: os.environ["CODETR_DATA_DIR"] = old
    assert paths.root == data_dir / "synthetic"
    return paths


# --- determinism ---------------------------------------------------------------------------------------------

def test_same_arguments_give_byte_identical_files(small_set, tmp_path):
    again = make_synthetic_coco(tmp_path / "again", **SMALL)
    ref, new = files_of(small_set.root), files_of(again.root)
    assert sorted(ref) == sorted(new) and len(ref) == SMALL["n_train"] + SMALL["n_val"] + 3
    assert ref == new


def test_byte_identical_in_another_process(small_set, tmp_path):
    code = ("import sys; from codetr.data.synthetic import make_synthetic_coco; "
            f"make_synthetic_coco(sys.argv[1], **{SMALL!r})")
    env = dict(os.environ, PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env, timeout=120)
    assert files_of(tmp_path / "other") == files_of(small_set.root)


def test_other_seed_gives_other_images(small_set, tmp_path):
    other = make_synthetic_coco(tmp_path / "s1", **{**SMALL, "seed": 1})
    assert (other.train_images / "000000.png").read_bytes() != (small_set.train_images / "000000.png").read_bytes()


def test_smaller_set_is_a_prefix(small_set, tmp_path):
    part = make_synthetic_coco(tmp_path / "part", **{**SMALL, "n_train": 4, "n_val": 2})
    for split in ("train", "val"):
        big, small = (json.loads((p.root / f"{split}.json").read_text()) for p in (small_set, part))
        n = len(small["images"])
        assert small["images"] == big["images"][:n]
        assert small["annotations"] == [a for a in big["annotations"] if a["image_id"] <= n]
        for img in small["images"]:
            assert ((part.root / split / img["file_name"]).read_bytes()
                    == (small_set.root / split / img["file_name"]).read_bytes())


# --- caching, overwrite and errors ---------------------------------------------------------------------------

def test_second_call_finds_the_set_without_writing(small_set):
    before = {p: p.stat().st_mtime_ns for p in small_set.root.rglob("*") if p.is_file() and p.name != ".lock"}
    assert make_synthetic_coco(small_set.root, **SMALL) == small_set
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("param, value", [("n_train", 11), ("n_val", 3), ("min_size", 70), ("max_size", 90), ("seed", 5)])
def test_other_parameters_are_an_error_naming_root_and_parameter(small_set, param, value):
    with pytest.raises(ValueError) as e: make_synthetic_coco(small_set.root, **{**SMALL, param: value})
    msg = str(e.value)
    assert str(small_set.root) in msg and f"{param}={SMALL[param]!r} (asked {value!r})" in msg
    others = [k for k in SMALL if k != param]
    assert not any(f"{k}=" in msg for k in others)


def test_overwrite_replaces_the_set(small_set, tmp_path):
    root = tmp_path / "ow"
    make_synthetic_coco(root, **SMALL)
    paths = make_synthetic_coco(root, **{**SMALL, "n_train": 3}, overwrite=True)
    assert sorted(p.name for p in paths.train_images.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert json.loads((root / "meta.json").read_text())["params"]["n_train"] == 3
    back = make_synthetic_coco(root, **SMALL, overwrite=True)
    assert files_of(back.root) == files_of(small_set.root)


def test_killed_generation_is_redone(small_set, tmp_path):
    root = tmp_path / "killed"
    make_synthetic_coco(root, **SMALL)
    (root / "meta.json").unlink()  # a generation killed before its last step
    (root / "val.json").unlink()
    (root / "train" / "000003.png").write_bytes(b"truncated")
    make_synthetic_coco(root, **SMALL)
    assert files_of(root) == files_of(small_set.root)


def test_refuses_to_delete_foreign_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.json").write_text('{"images": []}')
    with pytest.raises(FileExistsError, match="train.json"): make_synthetic_coco(tmp_path / "a", **SMALL)
    (tmp_path / "b" / "val").mkdir(parents=True)
    (tmp_path / "b" / "val" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"): make_synthetic_coco(tmp_path / "b", **SMALL)
    assert (tmp_path / "b" / "val" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("bad, name", [({"n_train": -1}, "n_train"), ({"n_val": 2.5}, "n_val"), ({"seed": -3}, "seed"),
                                       ({"min_size": 8}, "min_size"), ({"max_size": 50}, "max_size"),
                                       ({"n_train": True}, "n_train")])
def test_bad_arguments_name_the_argument(tmp_path, bad, name):
    with pytest.raises(ValueError, match=name): make_synthetic_coco(tmp_path / "x", **{**SMALL, **bad})


def test_concurrent_generations_agree(small_set, tmp_path):
    code = ("import sys; from codetr.data.synthetic import make_synthetic_coco; "
            f"make_synthetic_coco(sys.argv[1], **{SMALL!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "shared")]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert files_of(tmp_path / "shared") == files_of(small_set.root)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CODETR_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("CODETR_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "codetr"


# --- COCO compatibility --------------------------------------------------------------------------------------

def test_pycocotools_loads_and_perfect_detections_score_ap_one(small_set):
    for ann_file in (small_set.train_json, small_set.val_json):
        gt = run_quiet(lambda: COCO(str(ann_file)))
        assert sorted(gt.getCatIds()) == list(SYNTHETIC_CATEGORY_IDS)
        anns = gt.loadAnns(gt.getAnnIds())
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
                for a in anns]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        run_quiet(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
        assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)
        shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in dets]  # IoU 1/3
        ev = COCOeval(gt, gt.loadRes(shifted), "bbox")
        run_quiet(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
        assert ev.stats[1] < 0.05  # a shifted box may still hit another object of its class


def test_coco_fields(small_set):
    coco = json.loads(small_set.train_json.read_text())
    assert [c["id"] for c in coco["categories"]] == list(SYNTHETIC_CATEGORY_IDS)
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CLASSES)
    assert all(set(c) == {"id", "name", "supercategory"} for c in coco["categories"])
    assert [img["id"] for img in coco["images"]] == list(range(1, SMALL["n_train"] + 1))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    for a in coco["annotations"]:
        assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
        assert a["iscrowd"] == 0 and a["segmentation"] == [] and all(isinstance(v, float) for v in a["bbox"])
        assert 0 < a["area"] <= a["bbox"][2] * a["bbox"][3]
    for img in coco["images"]:
        with Image.open(small_set.train_images / img["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (img["width"], img["height"])


# --- tight boxes ---------------------------------------------------------------------------------------------

def test_boxes_match_the_shapes_drawn_in_the_files(small_set):
    """Re-rasterise each shape on its own and overlay them (painter's algorithm): the visible pixels carry the
    shape's colour in the PNG, and the annotated box is their exact extent."""
    for split, n in (("train", SMALL["n_train"]), ("val", SMALL["n_val"])):
        coco = json.loads((small_set.root / f"{split}.json").read_text())
        for img in coco["images"]:
            s = synthetic_sample(SMALL["seed"], split, img["id"] - 1, SMALL["min_size"], SMALL["max_size"])
            pixels = np.asarray(Image.open(small_set.root / split / img["file_name"]))
            assert np.array_equal(pixels, s.image)
            hw = pixels.shape[:2]
            masks = [shape_mask(shape, hw) for shape in s.shapes]
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            assert len(anns) == len(s.shapes)
            for k, (shape, a) in enumerate(zip(s.shapes, anns)):
                visible = masks[k] & ~np.any(masks[k + 1:], axis=0) if k + 1 < len(masks) else masks[k]
                assert (pixels[visible] == shape.color).all()
                assert a["bbox"] == bbox_of(visible) and a["area"] == visible.sum()
                assert a["category_id"] == SYNTHETIC_CATEGORY_IDS[SYNTHETIC_CLASSES.index(shape.kind)]


shapes = st.builds(lambda kind, cx, cy, rx, ry, angle, inner: Shape(kind, (cx, cy), (rx, ry), angle, inner, (250, 20, 30)),
                   st.sampled_from(SYNTHETIC_CLASSES), st.floats(0, 80), st.floats(0, 60), st.floats(3, 40),
                   st.floats(3, 40), st.floats(0, 7), st.floats(0.2, 0.7))


@settings(max_examples=60, deadline=None)
@given(shape=shapes)
def test_box_of_single_shape_on_plain_background_from_the_png(shape, tmp_path_factory):
    "Draw one shape on a plain background, save and reload the PNG, find the pixels that differ from the background."
    hw = (60, 80)
    mask = shape_mask(shape, hw)
    if not mask.any(): return
    owner = np.where(mask, 0, -1).astype(np.int16)
    path = tmp_path_factory.mktemp("png") / "one.png"
    Image.fromarray(render_scene(np.full((*hw, 3), 40, np.uint8), [shape], owner)).save(path)
    drawn = (np.asarray(Image.open(path)) != 40).any(-1)
    boxes, areas = visible_boxes(owner, 1)
    assert boxes[0] == bbox_of(drawn) and areas[0] == drawn.sum()
    x, y, w, h = boxes[0]
    assert 0 <= x and 0 <= y and x + w <= hw[1] and y + h <= hw[0]
    poly = np.concatenate(shape_polygons(shape))  # the box lies within the exact outline's extent, give or take a pixel
    assert x >= np.floor(poly[:, 0].min()) - 1 and x + w <= np.ceil(poly[:, 0].max()) + 2
    assert y >= np.floor(poly[:, 1].min()) - 1 and y + h <= np.ceil(poly[:, 1].max()) + 2


@pytest.mark.parametrize("kind", SYNTHETIC_CLASSES)
def test_rasterised_area_matches_exact_area(kind):
    shape = Shape(kind, (50.3, 40.6), (30.0, 21.0), 0.4, {"ring": 0.55, "star": 0.45, "cross": 0.3}.get(kind, 0.0))
    mask = shape_mask(shape, (90, 110))
    perimeter = sum(np.linalg.norm(np.diff(p, axis=0, append=p[:1]), axis=1).sum() for p in shape_polygons(shape))
    assert abs(mask.sum() - shape_area(shape)) <= perimeter  # only boundary pixels may differ


def test_ellipse_mask_against_the_ellipse_equation():
    shape = Shape("ellipse", (40.3, 30.7), (25.0, 14.0), 0.0)
    yy, xx = np.mgrid[0:64, 0:80]
    exact = ((xx - 40.3) / 25.0) ** 2 + ((yy - 30.7) / 14.0) ** 2 <= 1  # pixel centres inside the ellipse
    mask = shape_mask(shape, (64, 80))
    inner = ((xx - 40.3) / 23.5) ** 2 + ((yy - 30.7) / 12.5) ** 2 <= 1
    outer = ((xx - 40.3) / 26.5) ** 2 + ((yy - 30.7) / 15.5) ** 2 <= 1
    assert mask[inner].all() and not mask[~outer].any() and (mask != exact).sum() < 0.1 * exact.sum()


def test_occlusion_rules_hold_in_sampled_scenes():
    for i in range(30):
        rng = np.random.default_rng([7, i])
        hw = (int(rng.integers(64, 200)), int(rng.integers(64, 200)))
        scene, owner = sample_scene(rng, hw)
        masks = [shape_mask(s, hw) for s in scene]
        painter = np.full(hw, -1)
        for k, m in enumerate(masks): painter[m] = k
        assert np.array_equal(painter, owner)
        for k, m in enumerate(masks):
            assert (owner == k).sum() >= max(12, 0.5 * m.sum())  # no shape loses more than half its pixels
            assert m.sum() >= 0.6 * shape_area(scene[k]) - 1e-9  # at least 60% inside the image


# --- the default set ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_set_size_and_variety(default_set):
    for ann_file, n_images in ((default_set.train_json, 512), (default_set.val_json, 128)):
        coco = json.loads(ann_file.read_text())
        anns, images = coco["annotations"], {img["id"]: img for img in coco["images"]}
        assert len(images) == n_images
        per_image = np.bincount([a["image_id"] for a in anns], minlength=n_images + 1)[1:]
        assert (per_image == 0).sum() >= 0.03 * n_images and per_image.max() == 8
        assert len(set(per_image)) == 9  # every count from 0 to 8 occurs
        classes = np.bincount([SYNTHETIC_CATEGORY_IDS.index(a["category_id"]) for a in anns], minlength=6)
        assert (classes >= 0.1 * len(anns)).all()
        areas = np.array([a["area"] for a in anns])
        assert (areas < 32 ** 2).mean() > 0.25 and ((areas >= 32 ** 2) & (areas < 96 ** 2)).mean() > 0.25
        assert (areas >= 96 ** 2).sum() >= 10 and (areas < 8 ** 2).sum() >= 5  # large and tiny objects too
        sizes = {(img["width"], img["height"]) for img in images.values()}
        assert len(sizes) > n_images / 4 and any(w != h for w, h in sizes) and any(w == h for w, h in sizes)
        assert all(160 <= v <= 256 for wh in sizes for v in wh)
        for a in anns:
            x, y, w, h = a["bbox"]
            img = images[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert len(list((default_set.root / ann_file.stem).glob("*.png"))) == n_images


@pytest.mark.slow
def test_dataset_summary_against_a_recount(default_set):
    coco = json.loads(default_set.train_json.read_text())
    summ = dataset_summary(default_set.train_json)
    anns = coco["annotations"]
    assert (summ["images"], summ["boxes"], summ["classes"]) == (512, len(anns), 6)
    assert summ["images_without_boxes"] == len({i["id"] for i in coco["images"]} - {a["image_id"] for a in anns})
    assert summ["small"] + summ["medium"] + summ["large"] == len(anns)
    assert summ["small"] == sum(a["area"] < 1024 for a in anns) and summ["large"] == sum(a["area"] >= 9216 for a in anns)
    assert summ["boxes_per_class"] == {n: sum(a["category_id"] == i for a in anns)
                                       for i, n in zip(SYNTHETIC_CATEGORY_IDS, SYNTHETIC_CLASSES)}
    sides = sorted(np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in anns)
    assert summ["box_side_percentiles"]["p50"] == pytest.approx(np.median(sides), abs=0.05)


def test_dataset_summary_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"): dataset_summary(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"): dataset_summary(tmp_path / "bad.json")
    (tmp_path / "part.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="annotations"): dataset_summary(tmp_path / "part.json")


def test_dataset_summary_of_an_empty_set(tmp_path):
    paths = make_synthetic_coco(tmp_path / "empty", n_train=0, n_val=0)
    summ = dataset_summary(paths.train_json)
    assert (summ["images"], summ["boxes"], summ["max_boxes_per_image"]) == (0, 0, 0)


# --- command line ---------------------------------------------------------------------------------------------

def test_cli_generates_and_prints_the_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "codetr.data.synthetic", "--root", str(tmp_path / "cli"),
                          "--n_train", "6", "--n_val", "2", "--seed", "3"],
                         capture_output=True, text=True, check=True, timeout=120, cwd=REPO).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.strip()}
    assert rows["images"] == ["6", "2"] and rows["classes"] == ["6", "6"]
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["params"]["seed"] == 3


def test_cli_uses_the_default_folder(tmp_path):
    env = dict(os.environ, CODETR_DATA_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "codetr.data.synthetic", "--n_train", "2", "--n_val", "1"],
                         capture_output=True, text=True, check=True, timeout=120, env=env).stdout
    assert str(tmp_path / "synthetic") in out and (tmp_path / "synthetic" / "meta.json").exists()
