"""Swin Transformer V1 backbone: features equal torchvision's Swin-T/S/B (random weights converted to ours) where both
backbones compute the same function, the official padding, official key names, parameter counts, activation
checkpointing, weight loading in every layout and the download paths (intercepted: this machine is offline), whole
detector checkpoints in both official namings (mmdetection 3.x and Sense-X), and a command-line run of the tiny preset."""
import json
import math
import re
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from codetr.backbones.resnet import WeightsDownloadError
from codetr.backbones.swin import (SWIN_RELEASE_URL, SwinBackbone, SwinConfig, merge_permutation, relative_position_index,
                                   swin_state_dict)
from codetr.core.config import config_from_dict, config_to_dict
from codetr.engine.checkpoint import from_official_state_dict, load_official, to_official_state_dict
from codetr.models.detector import build_model
from codetr.models.swin import PRESETS, co_deformable_detr_swin_tiny_1x_coco

TV = {"tiny": torchvision.models.swin_t, "small": torchvision.models.swin_s, "base": torchvision.models.swin_b}


def reference_net(variant: str, seed: int = 0):
    "A torchvision Swin with random weights (biases and norms randomised too, so every weight matters)."
    torch.manual_seed(seed)
    net = TV[variant]().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1: p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))  # norms
    return net


def torchvision_stages(net, images):
    "torchvision's four stage outputs (B, H, W, C), before its merging layers."
    outs, x = [], images
    for layer in net.features:
        x = layer(x)
        outs.append(x)
    return outs[1::2]


def ours_like(net, variant, out_indices=(0, 1, 2, 3), seed=1):
    bb = SwinBackbone(variant, out_indices=out_indices, weights=net.state_dict()).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for i in out_indices:
            norm = getattr(bb, f"norm{i}")
            norm.weight.normal_(1, 0.1); norm.bias.normal_(0, 0.1)
    return bb


def assert_features_equal(bb, net, images, tv_images=None, stages=(0, 1, 2, 3)):
    with torch.no_grad():
        ours = bb(images)
        theirs = torchvision_stages(net, images if tv_images is None else tv_images)
    for i in stages:
        norm = getattr(bb, f"norm{i}")
        want = F.layer_norm(theirs[i], theirs[i].shape[-1:], norm.weight, norm.bias).permute(0, 3, 1, 2)
        assert ours[i].shape == want.shape, (i, ours[i].shape, want.shape)
        torch.testing.assert_close(ours[i], want, atol=2e-4, rtol=1e-4, msg=lambda m: f"stage {i}: {m}")


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
@pytest.mark.parametrize("size", [(256, 320), (260, 292)], ids=["multiple_of_32", "multiple_of_4_only"])
def test_features_equal_torchvision(variant, size):
    "Sides that are multiples of 4 (of 32 or not): both pad windows and odd merges at the bottom/right the same way."
    net = reference_net(variant)
    assert_features_equal(ours_like(net, variant), net, torch.randn(1, 3, *size))


def test_input_not_multiple_of_4_is_padded_like_the_official_patch_embed():
    "Official `PatchEmbed(padding='corner')`: zeros at the bottom/right up to a multiple of 4 (torchvision crops instead)."
    net = reference_net("tiny", seed=3)
    bb = ours_like(net, "tiny")
    x = torch.randn(2, 3, 257, 290)
    padded = F.pad(x, (0, 2, 0, 3))  # (2, 3, 260, 292)
    assert_features_equal(bb, net, x, tv_images=padded)
    with torch.no_grad(): torch.testing.assert_close(bb(x), bb(padded), atol=0, rtol=0)
    assert [tuple(f.shape[-2:]) for f in bb(x)] == [(65, 73), (33, 37), (17, 19), (9, 10)]


def test_one_window_maps_are_shifted_as_officially():
    """224 x 224: the last stage (7 x 7) fits in one window. torchvision then skips the shift; the official backbone (and
    ours) still shifts with the mask, so only that stage differs."""
    net = reference_net("tiny", seed=4)
    bb = ours_like(net, "tiny")
    x = torch.randn(1, 3, 224, 224)
    assert_features_equal(bb, net, x, stages=(0, 1, 2))
    with pytest.raises(AssertionError):
        assert_features_equal(bb, net, x, stages=(3,))
    bb.stages[3].blocks[1].attn.shift = 0  # without the shift it is torchvision's function again
    assert_features_equal(bb, net, x, stages=(3,))


def test_relative_position_index_is_the_official_one():
    "The official (mmdet) construction: a double-step sequence plus its transpose, flipped along the columns."
    for w in (2, 7, 12):
        seq = (torch.arange(0, (2 * w - 1) * w, 2 * w - 1)[:, None] + torch.arange(w)[None]).reshape(1, -1)
        assert torch.equal(relative_position_index(w), (seq + seq.T).flip(1))
    net = torchvision.models.swin_t()
    assert torch.equal(relative_position_index(7), net.features[1][0].attn.relative_position_index.view(49, 49))


def test_merge_permutation_reorders_torchvision_channels():
    x = torch.randn(2, 6, 4, 5)  # (B, H, W, C)
    ours = x.view(2, 3, 2, 2, 2, 5).permute(0, 1, 3, 5, 2, 4).flatten(3)  # (c, dy, dx)
    theirs = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert torch.equal(theirs[..., merge_permutation(5)], ours)


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_parameter_counts_equal_torchvision_without_head(variant):
    "With only C5 returned, our single norm3 is torchvision's final norm: the counts equal torchvision's minus its head."
    with torch.device("meta"):
        net, bb = TV[variant](), SwinBackbone(variant, out_indices=(3,))
    head = sum(p.numel() for p in net.head.parameters())
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for p in net.parameters()) - head


def test_swin_large_parameter_count_equals_official():
    with torch.device("meta"): bb = SwinConfig("large", 12, (0, 1, 2, 3), weights=None).build()
    assert sum(p.numel() for p in bb.parameters()) == 195_201_204  # mmdetection 3.3 Co-DINO Swin-L backbone


def test_official_key_round_trip():
    "ours -> official (mmdet names) -> ours is the identity, and the official names are mmdet's."
    cfg = co_deformable_detr_swin_tiny_1x_coco().without_pretrained()
    with torch.device("meta"): sd = build_model(cfg).state_dict()
    official = to_official_state_dict(sd, cfg)
    assert list(from_official_state_dict(official, cfg)) == list(sd)
    bb = sorted(k for k in official if k.startswith("backbone."))
    assert "backbone.patch_embed.projection.weight" in bb and "backbone.norm3.bias" in bb and "backbone.norm0.weight" not in bb
    assert "backbone.stages.1.blocks.1.attn.w_msa.relative_position_bias_table" in bb
    assert {"backbone.stages.2.blocks.5.ffn.layers.0.0.weight", "backbone.stages.2.blocks.5.ffn.layers.1.bias",
            "backbone.stages.2.downsample.reduction.weight", "backbone.stages.2.downsample.norm.weight"} <= set(bb)
    assert not [k for k in bb if re.search(r"\.mlp\.|\.attn\.(qkv|proj)\.|patch_embed\.proj\.", k)]  # none of ours left


def test_mmdet_layout_file_loads_through_weights(tmp_path):
    "A detector checkpoint's `backbone.*` in official names loads through `weights` like our own state_dict."
    cfg = co_deformable_detr_swin_tiny_1x_coco().without_pretrained()
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"state_dict": to_official_state_dict(model.state_dict(), cfg)}, tmp_path / "detector.pth")
    bb = SwinBackbone("tiny", weights=tmp_path / "detector.pth")
    for k, v in model.backbone.state_dict().items(): assert torch.equal(bb.state_dict()[k], v), k


def original_layout(net) -> dict:
    "torchvision's weights in the original Swin release layout (`layers.*`, `mlp.fc1`, `attn_mask` buffers, a head)."
    out = {}
    for k, v in net.state_dict().items():
        parts = k.split(".")
        if parts[0] != "features": out[k] = v; continue
        i, rest = int(parts[1]), ".".join(parts[2:])
        if i == 0: out[{"0": "patch_embed.proj.", "2": "patch_embed.norm."}[parts[2]] + parts[3]] = v
        elif i % 2: out[f"layers.{i // 2}.blocks.{rest}".replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")] = v
        else: out[f"layers.{i // 2 - 1}.downsample.{rest}"] = v
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    return {"model": out}


def test_imagenet_and_release_downloads(monkeypatch):
    "Both downloads go through the real code path up to the network call, which is intercepted; both layouts load alike."
    net = reference_net("tiny", seed=5)
    calls = []
    def fake_tv(url, *args, **kwargs): calls.append(url); return net.state_dict()
    def fake_hub(url, *args, **kwargs): calls.append(url); return original_layout(net)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_tv)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    a = SwinBackbone("tiny", weights="imagenet")
    b = SwinBackbone("tiny", weights="swin_tiny_patch4_window7_224")
    assert calls == [torchvision.models.Swin_T_Weights.IMAGENET1K_V1.url, SWIN_RELEASE_URL.format("swin_tiny_patch4_window7_224")]
    assert calls[-1] == "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth"
    for k, v in a.state_dict().items(): assert torch.equal(b.state_dict()[k], v), k
    x = torch.randn(1, 3, 256, 256)
    assert_features_equal(ours_like(net, "tiny"), net, x)


def test_offline_preset_names_the_failed_download(monkeypatch, tmp_path):
    "A preset whose pretrained backbone cannot be downloaded says which file from where, and the ways out."
    def offline(url, *args, **kwargs): raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name, file in [("co_dino_5scale_swin_large_lsj_1x_coco", "swin_large_patch4_window12_384_22k.pth"),
                       ("co_deformable_detr_swin_base_1x_coco", "swin_base_patch4_window12_384_22k.pth")]:
        with pytest.raises(WeightsDownloadError) as err:
            with torch.device("meta"): build_model(PRESETS[name]())
        msg = str(err.value)
        assert SWIN_RELEASE_URL.format(file[:-4]) in msg and f"backbone.weights=/path/to/{file}" in msg
        assert "backbone.weights=none" in msg and str(tmp_path / "hub" / "checkpoints") in msg and "Temporary failure" in msg
    with pytest.raises(WeightsDownloadError, match="Swin_T|swin_t-"):
        SwinBackbone("tiny", weights="imagenet")


def test_weight_errors_name_the_file_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_file.pth"):
        SwinBackbone("tiny", weights=tmp_path / "missing_file.pth")
    with pytest.raises(ValueError, match="neither 'imagenet'"):
        SwinBackbone("tiny", weights="swin_huge")
    with pytest.raises(ValueError, match="window 12, not tiny with window 7"):
        SwinBackbone("tiny", weights="swin_large_patch4_window12_384_22k")
    with pytest.raises(ValueError, match="tiny/small/base with window 7"):
        SwinBackbone("base", window_size=12, weights="imagenet")
    torch.save(torchvision.models.swin_t().state_dict(), tmp_path / "swin_t.pth")
    with pytest.raises(ValueError, match="swin_t.pth.*missing keys"):
        SwinBackbone("small", weights=tmp_path / "swin_t.pth")
    with pytest.raises(ValueError, match="swin_t.pth.*other shapes"):
        SwinBackbone("tiny", window_size=12, weights=tmp_path / "swin_t.pth")
    with pytest.raises(TypeError, match="weights"):
        SwinBackbone("tiny", weights=3)


def test_with_cp_gradients_equal():
    "Activation checkpointing recomputes the same forward (stochastic depth included: the RNG state is replayed)."
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        bb = SwinBackbone("tiny", out_indices=(0, 1, 2, 3), drop_path_rate=0.3, with_cp=with_cp).train()
        x = torch.randn(2, 3, 96, 80, requires_grad=True)
        sum(f.square().mean() for f in bb(x)).backward()
        grads.append({n: p.grad.clone() for n, p in bb.named_parameters()} | {"input": x.grad.clone()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]: torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_frozen_stages_and_train_mode():
    bb = SwinBackbone("tiny", out_indices=(0, 1, 2, 3), frozen_stages=2).train()
    frozen = [n for n, p in bb.named_parameters() if not p.requires_grad]
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("stages") else "") for n in frozen} == \
        {"patch_embed", "stages.0", "stages.1", "norm0", "norm1"}
    assert not bb.stages[1].training and bb.stages[2].training and not bb.norm0.training
    assert all(p.requires_grad for p in bb.stages[2].parameters())


def test_config_builds_serialises_and_rejects_bad_arguments():
    cfg = SwinConfig("base", 12, (0, 1, 2, 3), 0.4, with_cp=True, weights=None)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with torch.device("meta"): bb = cfg.build()
    assert (bb.out_channels, bb.strides, bb.stages[0].with_cp) == ([128, 256, 512, 1024], [4, 8, 16, 32], True)
    for kwargs, match in [({"variant": "huge"}, "variant"), ({"out_indices": (2, 1)}, "out_indices"),
                          ({"window_size": 1}, "window_size"), ({"drop_path_rate": 1.0}, "drop_path_rate"),
                          ({"frozen_stages": 5}, "frozen_stages")]:
        with pytest.raises(ValueError, match=match): replace(SwinConfig(weights=None), **kwargs)


def test_swin_state_dict_drops_heads_and_buffers():
    net = torchvision.models.swin_t()
    sd = swin_state_dict(original_layout(net))
    assert not [k for k in sd if k.startswith(("head", "norm.")) or k.endswith(("attn_mask", "relative_position_index"))]
    assert sd.keys() == swin_state_dict(net.state_dict()).keys()


def test_bfloat16_forward():
    "The shift mask follows the activations' dtype (a bfloat16 model runs without autocast)."
    torch.manual_seed(0)
    bb = SwinBackbone("tiny", out_indices=(2, 3)).eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad(): want, got = bb(x), bb.to(torch.bfloat16)(x.bfloat16())
    for w, g in zip(want, got):
        assert g.dtype == torch.bfloat16 and (g.float() - w).abs().mean() < 0.05


def test_command_line_overrides():
    from codetr.core.config import override, parse_cfg_options
    cfg = override(co_deformable_detr_swin_tiny_1x_coco(), **parse_cfg_options(
        ["backbone.weights=none", "backbone.with_cp=true", "backbone.drop_path_rate=0.1"]))
    assert (cfg.backbone.weights, cfg.backbone.with_cp, cfg.backbone.drop_path_rate) == (None, True, 0.1)


SENSEX_BACKBONE_KEY = re.compile(  # every backbone entry of Sense-X's `SwinTransformerV1` (the original Swin code)
    r"^backbone\.(patch_embed\.(proj|norm)\.(weight|bias)|norm\d\.(weight|bias)|layers\.\d\.(downsample\.(reduction\.weight|"
    r"norm\.(weight|bias))|blocks\.\d+\.(attn\.relative_position_(bias_table|index)|(norm1|norm2|attn\.qkv|attn\.proj|"
    r"mlp\.fc1|mlp\.fc2)\.(weight|bias))))$")


def sensex_from_mmdet(state: dict) -> dict:
    """A state dict in mmdetection 3.x names -> Sense-X names, written apart from codetr's converter: the original Swin
    names, the merged channels from mmdet's `nn.Unfold` order (c, dy, dx) into the original concatenation of
    x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], i.e. (dx, dy, c); Co-DINO's label embedding."""
    out = {}
    for k, v in state.items():
        k = k.replace("query_head.dn_generator.label_embedding.", "query_head.label_embedding.")
        if k.startswith("backbone."):
            k = (k.replace("backbone.stages.", "backbone.layers.").replace(".attn.w_msa.", ".attn.")
                 .replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
                 .replace("patch_embed.projection.", "patch_embed.proj."))
            if ".downsample." in k:
                u = v.unflatten(-1, (v.shape[-1] // 4, 2, 2))  # (..., C, dy, dx)
                v = u.movedim((-3, -2, -1), (-1, -2, -3)).flatten(-3)  # (..., dx, dy, C) flattened
        out[k] = v
    return out


def sensex_merge(x, norm_w, norm_b, reduction_w):
    "The original Swin `PatchMerging` on an even-sided (B, H, W, C) map, with its own weights."
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # (B, H/2, W/2, 4C)
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_w, norm_b), reduction_w)  # (B, H/2, W/2, 2C)


def random_swin_detector(cfg, seed=0):
    "A model whose LayerNorms are random too (a permutation of unit weights would go unnoticed)."
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.ndim == 1: p.copy_(torch.randn_like(p))
    return model


def test_sensex_checkpoint_converts_both_ways():
    """ours -> Sense-X equals the independent conversion of ours -> mmdet 3.x; both round trips are exact; the Sense-X
    names are those of `SwinTransformerV1`; a Sense-X checkpoint (mmcv dict, `module.` prefix) loads strictly."""
    cfg = co_deformable_detr_swin_tiny_1x_coco().without_pretrained()
    model = random_swin_detector(cfg)
    sd = model.state_dict()
    mmdet, sensex = to_official_state_dict(sd, cfg, "mmdet3"), to_official_state_dict(sd, cfg, "sensex")
    want = sensex_from_mmdet(mmdet)
    assert list(sensex) == list(want)
    for k, v in want.items(): assert torch.equal(sensex[k], v), k
    assert not [k for k in sensex if k.startswith("backbone.") and not SENSEX_BACKBONE_KEY.match(k)]
    for official in (mmdet, sensex):
        back = from_official_state_dict(official, cfg)
        assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    fresh = build_model(cfg).eval()
    load_official(fresh, {"meta": {}, "state_dict": {"module." + k: v for k, v in sensex.items()}}, cfg, strict=True)
    img = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(model.features(img), fresh.features(img)): assert torch.equal(a, b)


def test_sensex_merge_weights_compute_the_original_merge():
    "Our merge with our weights equals the original Swin merge with the converted Sense-X weights."
    cfg = co_deformable_detr_swin_tiny_1x_coco().without_pretrained()
    model = random_swin_detector(cfg, seed=2)
    sensex = to_official_state_dict(model.state_dict(), cfg, "sensex")
    x = torch.randn(2, 8, 10, 96)  # (B, H, W, C) stage-0 tokens
    w = {k.removeprefix("backbone.layers.0.downsample."): v for k, v in sensex.items() if k.startswith("backbone.layers.0.downsample.")}
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.stages[0].downsample(x), sensex_merge(x, w["norm.weight"], w["norm.bias"],
                                                                                       w["reduction.weight"]))
    with pytest.raises(ValueError, match="flavour='mmdet2'"): to_official_state_dict(model.state_dict(), cfg, "mmdet2")


SMALL_CLI_AUG = ["aug.test_scale=64", "aug.test_max_size=96", "aug.scales=(48,64)", "aug.max_size=96",
                 "aug.crop_scales=(48,)", "aug.crop_range=(32,48)"]


def cli_train_and_evaluate(preset: str, work: Path, cfg_options=()) -> dict:
    "`codetr.engine.train.main` on 4 synthetic images (2 steps of 2) and 2 validation images; the metrics, checked."
    from codetr.data.synthetic import make_synthetic_coco
    from codetr.engine.train import main
    synth = make_synthetic_coco(work / "synthetic", n_train=4, n_val=2, min_size=64, max_size=96, seed=0)
    metrics = main([preset, "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--device", "cpu",
                    "--train-images", str(synth.train_images), "--train-ann", str(synth.train_json),
                    "--val-images", str(synth.val_images), "--val-ann", str(synth.val_json), "--work-dir", str(work / "run"),
                    "--cfg-options", *SMALL_CLI_AUG, *cfg_options])
    assert 0 <= metrics["AP"] <= 1
    stored = json.loads((work / "run" / "config.json").read_text())
    assert stored["name"] == preset and (work / "run" / "model.safetensors").exists()
    log = [r for r in map(json.loads, (work / "run" / "log.jsonl").read_text().splitlines()) if r["mode"] == "train"]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    return stored


def test_cli_trains_and_evaluates_the_tiny_swin_preset(tmp_path):
    "The tiny Swin preset trains one short epoch from the command line, then evaluates."
    stored = cli_train_and_evaluate("co_deformable_detr_swin_tiny_synthetic", tmp_path, ["query_head.num_queries=30"])
    assert stored["backbone"]["type"] == "SwinConfig" and stored["backbone"]["weights"] is None
