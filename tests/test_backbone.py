"""codetr.backbones.resnet: ResNet trunk and ChannelMapper neck against torchvision, the official key list (spec 8.2/8.3),
hand-computed parameter counts, freezing rules and weight loading."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from codetr.backbones.necks import ChannelMapper, ChannelMapperConfig, ConvGN
from codetr.backbones.resnet import RESNET_NAMES, ResNetBackbone, ResNetConfig, WeightsDownloadError, imagenet_state_dict

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def official_backbone_keys(name):
    "The backbone key list of spec 8.2, written out from the ResNet block structure (no torchvision involved)."
    convs = ("conv1", "conv2", "conv3") if name in ("resnet50", "resnet101") else ("conv1", "conv2")
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in BN_KEYS]
    for stage, n_blocks in enumerate(BLOCKS[name], start=1):
        for b in range(n_blocks):
            pre = f"layer{stage}.{b}"
            for i, conv in enumerate(convs, start=1):
                keys += [f"{pre}.{conv}.weight"] + [f"{pre}.bn{i}.{k}" for k in BN_KEYS]
            if b == 0 and (stage > 1 or len(convs) == 3):
                keys += [f"{pre}.downsample.0.weight"] + [f"{pre}.downsample.1.{k}" for k in BN_KEYS]
    return keys


def official_neck_shapes(in_channels, out=256):
    "neck.* keys and shapes of spec 8.2 (Co-Def) / 8.3 (Co-DINO), without the `neck.` prefix."
    shapes = {}
    for i, c in enumerate(in_channels):
        shapes[f"convs.{i}.conv.weight"] = (out, c, 1, 1)
        shapes[f"convs.{i}.gn.weight"] = shapes[f"convs.{i}.gn.bias"] = (out,)
    shapes["extra_convs.0.conv.weight"] = (out, in_channels[-1], 3, 3)
    shapes["extra_convs.0.gn.weight"] = shapes["extra_convs.0.gn.bias"] = (out,)
    return shapes


def tv_features(net, x, return_nodes):
    return list(create_feature_extractor(net, return_nodes={n: n for n in return_nodes})(x).values())


# --- key names and parameter counts -------------------------------------------------------------------------

@pytest.mark.parametrize("name", RESNET_NAMES)
def test_keys_are_torchvision_keys_without_fc(name):
    with torch.device("meta"):
        ours = ResNetBackbone(name).state_dict()
        tv = {k: v for k, v in getattr(torchvision.models, name)().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(tv)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tv.items()}
    assert sorted(ours) == sorted(official_backbone_keys(name))


def test_r50_neck_keys_and_shapes_match_spec():
    neck = ChannelMapper([512, 1024, 2048], 256, num_outs=4)
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == official_neck_shapes([512, 1024, 2048])
    dino = ChannelMapper([256, 512, 1024, 2048], 256, num_outs=5)
    assert {k: tuple(v.shape) for k, v in dino.state_dict().items()} == official_neck_shapes([256, 512, 1024, 2048])


def test_r50_parameter_counts_match_official_shapes():
    tv = torchvision.models.resnet50()
    expected_backbone = n_params(tv) - tv.fc.weight.numel() - tv.fc.bias.numel()
    expected_neck = sum(math.prod(s) for s in official_neck_shapes([512, 1024, 2048]).values())
    backbone, neck = ResNetBackbone("resnet50"), ChannelMapper([512, 1024, 2048], 256, num_outs=4)
    assert n_params(backbone) == expected_backbone == 23_508_032
    assert n_params(neck) == expected_neck == 5_638_144
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    frozen_convs = tv.conv1.weight.numel() + sum(m.weight.numel() for m in tv.layer1.modules() if isinstance(m, nn.Conv2d))
    assert expected_backbone - trainable == frozen_convs + bn_affine == 275_520


# --- forward -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, out_indices", [("resnet18", (1, 2, 3)), ("resnet18", (0, 1, 2, 3)), ("resnet18", (3,)),
                                                ("resnet18", (0, 2)), ("resnet50", (1, 2, 3)), ("resnet50", (0, 1, 2, 3))])
def test_features_equal_torchvision_intermediate_layers(name, out_indices):
    torch.manual_seed(0)
    ours = ResNetBackbone(name, out_indices=out_indices).eval()
    tv = getattr(torchvision.models, name)().eval()
    tv.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        feats = ours(x)
        want = tv_features(tv, x, [f"layer{i + 1}" for i in out_indices])
    assert len(feats) == len(out_indices)
    for f, w, c, s in zip(feats, want, ours.out_channels, ours.strides):
        torch.testing.assert_close(f, w)
        assert f.shape == (2, c, math.ceil(45 / s), math.ceil(70 / s))


@pytest.mark.parametrize("name", RESNET_NAMES)
def test_full_size_shapes_on_meta(name):
    with torch.device("meta"):
        bb = ResNetBackbone(name, out_indices=(0, 1, 2, 3))
        neck = ChannelMapper(bb.out_channels[1:], 256, num_outs=4)
        feats = bb(torch.empty(1, 3, 800, 1216))
        levels = neck(feats[1:])
    assert [tuple(f.shape[-2:]) for f in feats] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert [f.shape[1] for f in feats] == bb.out_channels
    assert [tuple(f.shape) for f in levels] == [(1, 256, 100, 152), (1, 256, 50, 76), (1, 256, 25, 38), (1, 256, 13, 19)]


# --- freezing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
@pytest.mark.parametrize("norm_eval", [True, False])
def test_freezing_rules(frozen_stages, norm_eval):
    bb = ResNetBackbone("resnet18", out_indices=(0, 1, 2, 3), frozen_stages=frozen_stages, norm_eval=norm_eval).train()
    stages = [(bb.conv1, bb.bn1)] + [(getattr(bb, f"layer{i}"),) for i in range(1, 5)]
    for s, mods in enumerate(stages):  # s = 0 stem, s = i layer{i}
        frozen = s <= frozen_stages if s > 0 else frozen_stages >= 0
        for m in mods:
            for sub in m.modules():
                is_bn = isinstance(sub, nn.BatchNorm2d)
                for p in sub.parameters(recurse=False):
                    assert p.requires_grad == (not frozen and not (is_bn and norm_eval))
                if is_bn: assert sub.training == (not frozen and not norm_eval)
                elif isinstance(sub, nn.Conv2d): assert sub.training == (not frozen)
    bb.eval()
    assert not any(m.training for m in bb.modules())


def test_frozen_bn_keeps_statistics_and_gradients_stop():
    bb = ResNetBackbone("resnet18", out_indices=(1, 2, 3)).train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    sum(f.square().mean() for f in bb(x)).backward()
    for k, v in bb.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, p in bb.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert bb.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # frozen layers still pass gradients to their input


def test_norm_eval_false_trains_bn_outside_frozen_stages():
    bb = ResNetBackbone("resnet18", frozen_stages=1, norm_eval=False).train()
    mean2, mean1 = bb.layer2[0].bn1.running_mean.clone(), bb.layer1[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bb.layer2[0].bn1.running_mean, mean2)
    assert torch.equal(bb.layer1[0].bn1.running_mean, mean1)


def test_train_mode_survives_parent_train_call():
    parent = nn.Sequential(ResNetBackbone("resnet18")).train()
    assert not any(m.training for m in parent[0].modules() if isinstance(m, nn.BatchNorm2d))
    assert parent[0].layer3.training


# --- weights -----------------------------------------------------------------------------------------------

def reference_net(name="resnet18", seed=1, bn_stats=True):
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and bn_stats:
                m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def assert_same_weights(bb, net):
    ref = net.state_dict()
    for k, v in bb.state_dict().items():
        if not k.endswith("num_batches_tracked"): torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)


WRAPPERS = {
    "bare": lambda sd: sd,
    "state_dict": lambda sd: {"meta": {"epoch": 12}, "state_dict": sd},
    "model": lambda sd: {"model": sd, "epoch": 3},
    "module": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "detector": lambda sd: {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                                           "neck.convs.0.conv.weight": torch.zeros(256, 128, 1, 1)}},
    "ddp_detector": lambda sd: {f"module.backbone.{k}": v for k, v in sd.items()},
    "no_num_batches_tracked": lambda sd: {k: v for k, v in sd.items() if "num_batches_tracked" not in k},
    "no_fc": lambda sd: {k: v for k, v in sd.items() if not k.startswith("fc.")},
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_load_local_file_layouts(wrapper, tmp_path):
    net = reference_net()
    path = tmp_path / "w.pth"
    torch.save(WRAPPERS[wrapper](net.state_dict()), path)
    bb = ResNetBackbone("resnet18", out_indices=(1, 2, 3), weights=path if wrapper != "bare" else str(path))
    assert_same_weights(bb, net)
    assert not bb.layer1[0].conv1.weight.requires_grad  # freezing still applies after loading
    if wrapper == "bare":
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            for f, w in zip(bb.eval()(x), tv_features(net, x, ["layer2", "layer3", "layer4"])):
                torch.testing.assert_close(f, w)


def test_load_mapping_directly():
    net = reference_net(seed=3)
    assert_same_weights(ResNetBackbone("resnet18", weights=net.state_dict()), net)


def test_load_errors_name_the_file_and_keys(tmp_path):
    sd = reference_net().state_dict()
    path = tmp_path / "r18_weights.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"r18_weights\.pth.*missing keys \[layer1\.0\.conv3\.weight"):
        ResNetBackbone("resnet50", weights=path)
    torch.save({**sd, "layer5.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"r18_weights\.pth.*1 unexpected keys \[layer5\.0\.conv1\.weight\]"):
        ResNetBackbone("resnet18", weights=path)
    torch.save({**sd, "layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"r18_weights\.pth.*wrong shapes \[layer2\.0\.conv1\.weight \(128, 64, 1, 1\) != \(128, 64, 3, 3\)"):
        ResNetBackbone("resnet18", weights=path)
    with pytest.raises(FileNotFoundError, match="missing_file.pth"):
        ResNetBackbone("resnet18", weights=tmp_path / "missing_file.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        ResNetBackbone("resnet18", weights=tmp_path / "garbage.pth")
    with pytest.raises(TypeError, match="weights"):
        ResNetBackbone("resnet18", weights=3)


def test_imagenet_weights_use_torchvision_v1_url(monkeypatch):
    "The download itself is impossible here: intercept torchvision's loader and check what it was asked for."
    net = reference_net("resnet50", seed=5)
    v1_like = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}  # the V1 file has none
    calls = []
    def fake_load(url, *args, **kwargs):
        calls.append(url)
        return dict(v1_like)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_load)
    bb = ResNetBackbone("resnet50", weights="imagenet")
    assert calls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url]
    assert_same_weights(bb, net)
    imagenet_state_dict("resnet18")
    assert calls[-1] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    with pytest.raises(ValueError, match="name"):
        imagenet_state_dict("resnet152")


def test_offline_imagenet_download_says_how_to_proceed(monkeypatch, tmp_path):
    "Without network the preset's ImageNet initialisation fails with the config field to change, not a raw URLError."
    import urllib.error
    from codetr.models.co_deformable_detr import co_deformable_detr_r50_1x_coco
    from codetr.models.detector import build_model
    def offline(url, *args, **kwargs): raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsDownloadError) as err:
        with torch.device("meta"): build_model(co_deformable_detr_r50_1x_coco())
    msg = str(err.value)
    file = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    assert "backbone.weights=none" in msg and f"backbone.weights=/path/to/{file}" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and "Temporary failure" in msg
    assert ResNetConfig(depth=18, weights=None).build().strides == [8, 16, 32]  # the way out works


def test_configs_build_the_modules():
    bb = ResNetConfig(depth=18, out_indices=(0, 1, 2, 3), weights=None).build()
    neck = ChannelMapperConfig(num_outs=5, out_channels=64, num_groups=8).build(bb.out_channels, bb.strides)
    maps = neck(bb(torch.randn(1, 3, 64, 96)))
    assert neck.strides == [4, 8, 16, 32, 64]
    assert [tuple(m.shape[-2:]) for m in maps] == [(64 // s, -(-96 // s)) for s in neck.strides]
    with pytest.raises(ValueError, match="out_indices"): ResNetConfig(out_indices=(3, 1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="resnet152"), "name"), (dict(out_indices=(2, 1)), "out_indices"), (dict(out_indices=()), "out_indices"),
    (dict(out_indices=(1, 4)), "out_indices"), (dict(frozen_stages=5), "frozen_stages"), (dict(frozen_stages=-2), "frozen_stages")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNetBackbone(**{"name": "resnet18", **kwargs})


# --- neck --------------------------------------------------------------------------------------------------

def test_neck_matches_functional_oracle():
    torch.manual_seed(0)
    neck = ChannelMapper([8, 16, 32], 64, num_outs=5, num_groups=8)
    with torch.no_grad():
        for p in neck.parameters(): p.normal_()
    feats = [torch.randn(2, 8, 20, 24), torch.randn(2, 16, 10, 12), torch.randn(2, 32, 5, 6)]
    outs = neck(feats)
    sd = neck.state_dict()
    want = [F.group_norm(F.conv2d(f, sd[f"convs.{i}.conv.weight"]), 8, sd[f"convs.{i}.gn.weight"], sd[f"convs.{i}.gn.bias"])
            for i, f in enumerate(feats)]
    x = feats[-1]
    for i in range(2):
        x = F.group_norm(F.conv2d(x, sd[f"extra_convs.{i}.conv.weight"], stride=2, padding=1), 8,
                         sd[f"extra_convs.{i}.gn.weight"], sd[f"extra_convs.{i}.gn.bias"])
        want.append(x)
    assert len(outs) == 5
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w)
    assert [tuple(o.shape[-2:]) for o in outs] == [(20, 24), (10, 12), (5, 6), (3, 3), (2, 2)]
    assert sd["extra_convs.1.conv.weight"].shape == (64, 64, 3, 3)  # the second extra level reads the previous output


def test_neck_init_is_xavier_uniform_without_bias():
    torch.manual_seed(0)
    neck = ChannelMapper([512, 1024, 2048], 256, num_outs=4)
    for m in neck.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
            fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
            torch.testing.assert_close(m.weight.std().item(), bound / math.sqrt(3), rtol=0.02, atol=0)
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 32 and torch.equal(m.weight, torch.ones(256)) and torch.equal(m.bias, torch.zeros(256))


def test_neck_without_extra_levels_and_errors():
    neck = ChannelMapper([64, 128], 32, num_groups=4)
    assert len(neck.extra_convs) == 0
    assert len(neck([torch.randn(1, 64, 8, 8), torch.randn(1, 128, 4, 4)])) == 2
    with pytest.raises(ValueError, match="expected 2"):
        neck([torch.randn(1, 64, 8, 8)])
    with pytest.raises(ValueError, match="num_outs"):
        ChannelMapper([64, 128], 32, num_outs=1)


def test_convgn_relu_and_names():
    m = ConvGN(4, 8, 3, stride=2, num_groups=2, relu=True)
    assert list(m.state_dict()) == ["conv.weight", "gn.weight", "gn.bias"]
    y = m(torch.randn(1, 4, 9, 9))
    assert y.shape == (1, 8, 5, 5) and (y >= 0).all()


def test_gradients_reach_backbone_through_neck():
    bb = ResNetBackbone("resnet18").train()
    neck = ChannelMapper(bb.out_channels, 32, num_outs=4, num_groups=8)
    sum(o.mean() for o in neck(bb(torch.randn(2, 3, 64, 64)))).backward()
    assert bb.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert bb.layer2[0].downsample[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in neck.parameters())


@pytest.mark.cuda
def test_cuda_forward_matches_cpu():
    torch.manual_seed(0)
    bb = ResNetBackbone("resnet50").eval()
    neck = ChannelMapper(bb.out_channels, 256, num_outs=4)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        cpu = neck(bb(x))
        gpu = neck.cuda()(bb.cuda()(x.cuda()))
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=1e-3)
