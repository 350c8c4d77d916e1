"""Tests for codetr.engine.zoo, offline: the table (every entry names a preset and a source), a release made here in
the official layout and served through the real download path from a `file://` URL (outputs equal the source model's,
the second call uses the cache), hashes (table, recorded, corrupted files), the class-count check, clear errors for
unknown names, missing networks and manual sources, and the command lines of zoo, predict and evaluate."""
import json
import os
import re
import subprocess
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import codetr
import codetr.engine.zoo as zoo
from codetr.data.synthetic import make_synthetic_coco
from codetr.engine.checkpoint import to_official_state_dict
from codetr.engine.evaluate import main as evaluate_main
from codetr.engine.predict import main as predict_main
from codetr.engine.zoo import (COCO_CATEGORIES, ZOO, ChecksumError, Source, ZooEntry, cache_dir, checkpoint_path,
                               entry_classes, from_pretrained, hash_record, sha256_file, zoo_entry, zoo_table)
from codetr.models.detector import build_model
from codetr.models.presets import PRESETS, get_preset

TINY = "co_deformable_detr_tiny"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    "A small model with seeded weights, saved as mmcv saves an official checkpoint."
    folder = tmp_path_factory.mktemp("release")
    cfg = get_preset(TINY)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = folder / "co_deformable_detr_tiny_release.pth"
    torch.save({"meta": {"epoch": 6, "CLASSES": ["a"] * cfg.num_classes},
                "state_dict": to_official_state_dict(model.state_dict(), cfg)}, path)
    return dict(path=path, model=model, cfg=cfg, sha=sha256_file(path))


@pytest.fixture
def entry(release, monkeypatch, tmp_path):
    "A temporary zoo entry served from a file:// URL, with a fresh cache and a download counter."
    e = ZooEntry("tiny_release", TINY, TINY, (Source("file", release["path"].as_uri(), release["path"].name),),
                 num_classes=release["cfg"].num_classes, dataset="synthetic")
    monkeypatch.setitem(ZOO, e.name, e)
    monkeypatch.setenv("CODETR_CACHE", str(tmp_path / "cache"))
    calls = []
    real = zoo.download_url_to_file
    monkeypatch.setattr(zoo, "download_url_to_file", lambda url, dst, **kw: calls.append(url) or real(url, dst, **kw))
    return dict(entry=e, calls=calls, cache=tmp_path / "cache")


def _outputs(model, image):
    with torch.no_grad(): return model([image])[0]


# ---------------------------------------------------------------- the table

def test_every_entry_names_a_preset_and_a_source():
    assert len(ZOO) >= 20
    for name, e in ZOO.items():
        assert e.name == name and e.preset in PRESETS and e.test_time_from in (None, *PRESETS), name
        assert e.sources and any(s.url.startswith("https://") or s.manual for s in e.sources), name
        for s in e.sources:
            assert s.url.startswith("https://"), (name, s.url)
            assert s.manual == (s.host == "gdrive"), (name, s)
            if s.sha256_prefix: assert re.fullmatch(r"[0-9a-f]{8}", s.sha256_prefix) and s.sha256_prefix in s.file_name
        cfg = e.config()
        assert cfg.num_classes == e.num_classes == 80 and e.dataset == "coco"
    names = [s.file_name for e in ZOO.values() for s in e.sources]
    assert len(names) == len(set(names)), "two sources would share a cache file"


def test_table_covers_the_released_coco_configs():
    assert {e.official_config for e in ZOO.values()} >= {
        "co_deformable_detr_r50_1x_coco", "co_deformable_detr_swin_large_900q_3x_coco", "co_dino_5scale_r50_1x_coco",
        "co_dino_5scale_lsj_r50_1x_coco", "co_dino_5scale_9encoder_lsj_r50_3x_coco", "co_dino_5scale_lsj_swin_large_3x_coco",
        "co_dino_5scale_swin_large_16e_o365tococo", "co_dino_5scale_vit_large_coco"}
    nine = ZOO["co_dino_5scale_9encoder_r50_lsj_1x_coco"].config()
    lsj = get_preset("co_dino_5scale_r50_lsj_1x_coco")
    assert nine.query_head.transformer.num_encoder_layers == 9 and nine.aug == lsj.aug and not nine.with_attn_mask


def test_table_renders_from_the_data(tmp_path):
    table = zoo_table()
    assert table.count("\n") == len(ZOO) + 1 and "download.openmmlab.com" in table and "huggingface.co" in table
    (tmp_path / "co_dino_5scale_r50_1x_coco-7481f903.pth").write_bytes(b"")
    cached = [line for line in zoo_table(tmp_path).splitlines() if line.endswith(" yes |")]
    assert len(cached) == 1 and "`co_dino_5scale_r50_1x_coco`" in cached[0]


def test_coco_categories(shared_data):
    assert len(COCO_CATEGORIES) == 80 and COCO_CATEGORIES[0] == (1, "person") and COCO_CATEGORIES[-1] == (90, "toothbrush")
    ann = shared_data / "coco_eval_fakebbox100" / "instances_val2014_100.json"
    if not ann.exists(): pytest.skip(f"{ann} not found")
    cats = sorted((c["id"], c["name"]) for c in json.loads(ann.read_text())["categories"])
    assert tuple(cats) == COCO_CATEGORIES
    m = entry_classes(ZOO["co_dino_5scale_r50_1x_coco"])
    assert m.cat_ids == [i for i, _ in cats] and m.names == [n for _, n in cats]


def test_unknown_name_suggests_and_lists():
    with pytest.raises(ValueError, match="did you mean 'co_dino_5scale_r50_1x_coco'") as e: zoo_entry("co_dino_5scale_r50_1x_cocoo")
    assert "co_deformable_detr_swin_large_900q_3x_coco" in str(e.value)
    with pytest.raises(ValueError, match="known names: co_deformable_detr_r50_1x_coco"): from_pretrained("nothing_like_it")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CODETR_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CODETR_CACHE")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints" / "codetr" == tmp_path / "th" / "hub" / "checkpoints" / "codetr"


def test_public_surface():
    assert codetr.from_pretrained is from_pretrained


# ---------------------------------------------------------------- download, cache, conversion

def test_from_pretrained_downloads_converts_and_loads(release, entry):
    model = from_pretrained("tiny_release")
    assert entry["calls"] == [release["path"].as_uri()]
    cached = entry["cache"] / release["path"].name
    assert cached.read_bytes() == release["path"].read_bytes()
    assert hash_record(cached).read_text() == f"{release['sha']}  {cached.name}\n"  # recorded: the table has no hash
    assert not any(p.name.startswith(".") for p in entry["cache"].iterdir())  # no temporary left
    assert not model.training and model.cfg.name == TINY
    image = torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(1))
    ours, theirs = _outputs(model, image), _outputs(release["model"], image)
    assert len(theirs["scores"]) > 0
    for k in ("boxes", "scores", "labels"): torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    for key, value in model.state_dict().items(): torch.testing.assert_close(value, release["model"].state_dict()[key])
    from_pretrained("tiny_release")  # the second call: the cache, no download
    assert len(entry["calls"]) == 1


def test_table_hash_is_checked_on_download(release, entry, monkeypatch):
    good = replace(entry["entry"], sources=(replace(entry["entry"].sources[0], sha256_prefix=release["sha"][:8]),))
    monkeypatch.setitem(ZOO, "tiny_release", good)
    assert checkpoint_path("tiny_release").is_file()
    bad = replace(good, sources=(replace(good.sources[0], file_name="other.pth", sha256_prefix="00000000"),))
    monkeypatch.setitem(ZOO, "tiny_release", bad)
    with pytest.raises(ChecksumError, match="nothing was written") as e: checkpoint_path("tiny_release")
    assert release["path"].as_uri() in str(e.value) and release["sha"] in str(e.value)
    assert not (entry["cache"] / "other.pth").exists()
    assert sorted(p.name for p in entry["cache"].iterdir()) == [release["path"].name, release["path"].name + ".sha256"]


def test_a_corrupted_cached_file_is_refused(release, entry):
    path = checkpoint_path("tiny_release")
    data = bytearray(path.read_bytes()); data[len(data) // 2] ^= 0xFF; path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=re.escape(str(path))) as e: from_pretrained("tiny_release")
    assert release["sha"] in str(e.value) and "delete it" in str(e.value)
    path.unlink(); hash_record(path).unlink()
    from_pretrained("tiny_release")  # deleted: downloaded again
    assert len(entry["calls"]) == 2


def test_class_count_is_checked(release, entry, monkeypatch):
    with pytest.raises(ValueError, match=r"class-count mismatch.*has 6 classes.*but 80 are expected") as e:
        from_pretrained("tiny_release", num_classes=80)
    assert release["path"].name in str(e.value)
    monkeypatch.setitem(ZOO, "tiny_release", replace(entry["entry"], num_classes=3))
    with pytest.raises(ValueError, match=r"has 6 classes .* but 3 are expected"): from_pretrained("tiny_release")


def test_a_prefilled_cache_needs_no_network(release, entry, monkeypatch):
    "A manual (Drive) source: the file copied into the cache under the table's name loads with no download."
    manual = replace(entry["entry"], sources=(Source("gdrive", "https://drive.google.com/drive/folders/x", "tiny_release.pth",
                                                     manual=True),))
    monkeypatch.setitem(ZOO, "tiny_release", manual)
    with pytest.raises(FileNotFoundError) as e: from_pretrained("tiny_release")
    msg = str(e.value)
    assert "https://drive.google.com/drive/folders/x" in msg and str(entry["cache"] / "tiny_release.pth") in msg
    assert "--preset co_deformable_detr_tiny" in msg and entry["calls"] == []
    entry["cache"].mkdir(); (entry["cache"] / "tiny_release.pth").write_bytes(release["path"].read_bytes())
    model = from_pretrained("tiny_release")
    assert entry["calls"] == [] and hash_record(entry["cache"] / "tiny_release.pth").is_file()
    image = torch.rand(3, 64, 64)
    torch.testing.assert_close(_outputs(model, image)["boxes"], _outputs(release["model"], image)["boxes"])


def test_no_network_names_every_url_and_cache_path(monkeypatch, tmp_path):
    def offline(url, dst, **kw): raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(zoo, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e: checkpoint_path("co_dino_5scale_r50_1x_coco", cache=tmp_path)
    msg = str(e.value)
    url = "https://download.openmmlab.com/mmdetection/v3.0/codetr/co_dino_5scale_r50_1x_coco-7481f903.pth"
    assert f"{url}: <urlopen error" in msg and "name resolution" in msg
    assert str(tmp_path / "co_dino_5scale_r50_1x_coco-7481f903.pth") in msg  # where to put the download
    assert str(tmp_path / "co_dino_5scale_r50_1x_coco.pth") in msg and "drive.google.com" in msg  # or the Drive file
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_url_and_download_false(release, entry, monkeypatch, tmp_path):
    gone = replace(entry["entry"], sources=(Source("file", (tmp_path / "gone.pth").as_uri(), "gone.pth"),))
    monkeypatch.setitem(ZOO, "tiny_release", gone)
    with pytest.raises(FileNotFoundError, match="could not download") as e: checkpoint_path("tiny_release")
    assert str(entry["cache"] / "gone.pth") in str(e.value)
    monkeypatch.setitem(ZOO, "tiny_release", entry["entry"])
    with pytest.raises(FileNotFoundError, match="not in the cache"): from_pretrained("tiny_release", download=False)
    assert entry["calls"] == [(tmp_path / "gone.pth").as_uri()]


# ---------------------------------------------------------------- command lines

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("zoo_synth") / "s", n_train=0, n_val=3, min_size=64, max_size=96, seed=3)


def test_cli_predict_pretrained(release, entry, synth, tmp_path):
    out = tmp_path / "pred"
    summary = predict_main(["--pretrained", "tiny_release", str(synth.val_images), "--out", str(out), "--device", "cpu",
                            "--score-thr", "0.0", "--ann", str(synth.val_json)])
    assert summary["images"] == 3 and summary["detections"] > 0
    assert len(json.loads((out / "detections.json").read_text())) == summary["detections"]
    assert len(list((out / "annotated").iterdir())) == 3
    again = predict_main(["--pretrained", "tiny_release", *map(str, sorted(synth.val_images.iterdir())[:2]), "--out",
                          str(tmp_path / "two"), "--no-draw"])  # every positional argument is an input
    assert again["images"] == 2 and len(entry["calls"]) == 1


def test_cli_predict_points_a_zoo_name_at_pretrained(synth, tmp_path, capsys):
    with pytest.raises(SystemExit): predict_main(["co_dino_5scale_r50_1x_coco", str(synth.val_images), "--out", str(tmp_path)])
    assert "use --pretrained co_dino_5scale_r50_1x_coco" in capsys.readouterr().err


def test_cli_evaluate_pretrained(release, entry, synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_main(["--pretrained", "tiny_release", "--images", str(synth.val_images), "--ann", str(synth.val_json),
                             "--device", "cpu", "--cfg-options", "aug.test_scale=64", "aug.test_max_size=96"])
    assert 0 <= metrics["AP"] <= 1
    assert json.loads((tmp_path / "work_dirs" / "pretrained" / "tiny_release" / "metrics.json").read_text())["AP"] == metrics["AP"]
    with pytest.raises(ValueError, match="not 'co_dino_tiny'"):
        evaluate_main(["co_dino_tiny", "--pretrained", "tiny_release", "--images", str(synth.val_images), "--ann",
                       str(synth.val_json), "--device", "cpu"])


def test_cli_evaluate_checks_the_class_count_against_the_data(entry, synth, monkeypatch, tmp_path):
    ann = json.loads(synth.val_json.read_text())
    ann["categories"] = ann["categories"][:5]
    ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] in {c["id"] for c in ann["categories"]}]
    (tmp_path / "five.json").write_text(json.dumps(ann))
    with pytest.raises(ValueError, match=r"has 6 classes .* but 5 are expected"):
        evaluate_main(["--pretrained", "tiny_release", "--images", str(synth.val_images), "--ann", str(tmp_path / "five.json"),
                       "--device", "cpu", "--work-dir", str(tmp_path / "w")])


def test_zoo_cli(release, entry, capsys):
    assert zoo.main(["list"]) is None
    out = capsys.readouterr().out
    assert f"cache: {entry['cache']}" in out and "`co_dino_5scale_vit_large_coco`" in out and "`tiny_release`" in out
    path = zoo.main(["download", "tiny_release"])
    assert path == entry["cache"] / release["path"].name and capsys.readouterr().out.strip() == str(path)
    zoo.main(["list"])
    assert any(line.startswith("| `tiny_release`") and line.endswith(" yes |") for line in capsys.readouterr().out.splitlines())


def test_zoo_cli_runs_as_a_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "codetr.engine.zoo", "list"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CODETR_CACHE=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n| `co_") == len(ZOO)
