"""The ViT backbone, the simple feature pyramid, the ConvFC RoI head and the ViT presets, part by part against
oracles written out directly: RoPE as complex rotations, window attention as an explicit loop over windows, SwiGLU
as its formula; plus activation checkpointing, official key names, the official parameter count and a command-line
run of the tiny preset."""
import math

import pytest
import torch
import torch.nn.functional as F

from codetr.backbones.sfp import SFP, SFPConfig
from codetr.backbones.vit import (Attention, Block, SwiGLU, ViT, ViTConfig, WindowRope, abs_pos_embed, apply_rope,
                                  rope_angles, window_partition, window_unpartition)
from codetr.core.config import config_to_dict
from codetr.engine.checkpoint import from_official_state_dict, load_official, to_official_state_dict
from codetr.heads.roi import RoIHead, Shared2FCBBoxHead, rcnn_loss
from codetr.models.config import config_from_stored
from codetr.models.detector import build_model, parameter_counts
from codetr.models.vit import PRESETS, co_dino_5scale_vit_large_coco, co_dino_vit_tiny_synthetic


def small_vit(**kw) -> ViT:
    args = dict(embed_dim=32, depth=4, num_heads=2, patch_size=8, pretrain_img_size=32, drop_path_rate=0.0,
                window_size=3, window_block_indexes=(0, 1, 2))
    torch.manual_seed(0)
    return ViT(**(args | kw))


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    "Random biases and norm weights (the official init sets them to 0 and 1, which would hide their effect)."
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.ndim == 1: p.add_(0.1 * torch.randn_like(p))
    return module


# ---------------------------------------------------------------- RoPE

@pytest.mark.parametrize("hw", [(4, 4), (3, 7), (1, 5)])
def test_rope_is_a_complex_rotation_by_row_then_column_angles(hw):
    h, w = hw
    D = 16  # head width: 4 pairs rotate with the row, 4 with the column
    x = torch.randn(2, 3, h * w, D, dtype=torch.float64)
    angles = rope_angles(h, w, D // 2).double()
    got = apply_rope(x, angles.cos(), angles.sin())
    pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).double()  # (S, 2)
    freqs = 1.0 / 10000 ** (torch.arange(0, D // 2, 2).double() / (D // 2))  # (D / 4,)
    theta = torch.cat([(pos[:, :1] * 16 / h) * freqs, (pos[:, 1:] * 16 / w) * freqs], -1)  # (S, D / 2)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())  # (2, 3, S, D / 2)
    want = torch.view_as_real(z * torch.exp(1j * theta)).flatten(-2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the table is float32


def test_rope_preserves_norms_and_makes_scores_relative():
    "Rotations keep each pair's length; q.k depends on the offset only (a 1-D grid: one row)."
    angles = rope_angles(1, 12, 8).double()
    cos, sin = angles.cos(), angles.sin()
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rq, rk = apply_rope(q.expand(12, 16), cos, sin), apply_rope(k.expand(12, 16), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(12))
    scores = rq @ rk.T  # (12, 12)
    torch.testing.assert_close(torch.diagonal(scores, 2)[:-1], torch.diagonal(scores, 2)[1:], atol=1e-5, rtol=0)  # float32 angles


def test_window_table_is_the_official_layout():
    "The shared table: (window^2, head width), row angles then column angles, each angle twice in a row."
    rope = WindowRope(24, 32)
    assert rope.freqs_cos.shape == rope.freqs_sin.shape == (576, 64)
    angles = torch.atan2(rope.freqs_sin, rope.freqs_cos)
    torch.testing.assert_close(angles[:, 0::2], angles[:, 1::2])  # pairs share an angle
    first = 16 / 24 * torch.tensor(1.0)  # row 1, frequency 1 (token 24 = row 1, column 0)
    torch.testing.assert_close(angles[24, 0], first)
    torch.testing.assert_close(angles[1, 32], first)  # token 1 = row 0, column 1
    assert float(angles[24, 32]) == 0.0


# ---------------------------------------------------------------- attention, windows, blocks

def explicit_window_attention(attn: Attention, x: torch.Tensor, size: int) -> torch.Tensor:
    "Attention within each window, written as a loop: zero tokens fill the windows past the grid, then are dropped."
    B, H, W, C = x.shape
    M, D = attn.num_heads, C // attn.num_heads
    out = torch.zeros_like(x)
    cos, sin = attn.rope.freqs_cos.double(), attn.rope.freqs_sin.double()
    for b in range(B):
        for i0 in range(0, H, size):
            for j0 in range(0, W, size):
                tokens = x.new_zeros(size, size, C)
                real = x[b, i0:i0 + size, j0:j0 + size]
                tokens[:real.shape[0], :real.shape[1]] = real
                t = tokens.reshape(size * size, C)
                q = (t @ attn.q_proj.weight.T + attn.q_bias).view(-1, M, D).transpose(0, 1)
                k = (t @ attn.k_proj.weight.T).view(-1, M, D).transpose(0, 1)
                v = (t @ attn.v_proj.weight.T + attn.v_bias).view(-1, M, D).transpose(0, 1)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v  # (M, S, D)
                y = attn.proj(a.transpose(0, 1).reshape(size, size, C))
                out[b, i0:i0 + size, j0:j0 + size] = y[:real.shape[0], :real.shape[1]]
    return out


@pytest.mark.parametrize("hw", [(6, 6), (7, 5), (2, 4)])
def test_window_block_equals_an_explicit_loop_over_padded_windows(hw):
    torch.manual_seed(0)
    blk = perturbed(Block(16, 2, window_size=3, rope=WindowRope(3, 4))).double().eval()
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    h = explicit_window_attention(blk.attn, blk.norm1(x), 3)
    want = x + h
    want = want + blk.mlp(blk.norm2(want))
    torch.testing.assert_close(blk(x), want)


def test_window_covering_the_grid_equals_global_attention():
    torch.manual_seed(0)
    win = perturbed(Block(32, 4, window_size=5, rope=WindowRope(5, 4))).eval()
    glb = Block(32, 4).eval()
    glb.load_state_dict({k: v for k, v in win.state_dict().items() if "rope" not in k})
    x = torch.randn(3, 5, 5, 32)
    torch.testing.assert_close(win(x), glb(x))
    vit_w, vit_g = small_vit(window_size=4), small_vit(window_block_indexes=())
    vit_g.load_state_dict({k: v for k, v in vit_w.state_dict().items() if "rope_win" not in k and "attn.rope" not in k},
                          strict=False)
    img = torch.randn(1, 3, 32, 32)  # 4 x 4 tokens: one window
    torch.testing.assert_close(vit_w.eval()(img)[0], vit_g.eval()(img)[0])


def test_padding_matters_when_the_window_exceeds_the_grid():
    "Padded tokens take part as keys (key 0, value v_bias), as officially: a 5x5 window on a 4x4 grid is not global."
    torch.manual_seed(0)
    win = perturbed(Block(32, 4, window_size=5, rope=WindowRope(5, 4))).eval()
    glb = Block(32, 4).eval()
    glb.load_state_dict({k: v for k, v in win.state_dict().items() if "rope" not in k})
    x = torch.randn(1, 4, 4, 32)
    assert (win(x) - glb(x)).abs().max() > 1e-3


def test_partition_round_trip_and_padding():
    x = torch.randn(2, 7, 10, 3)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3) and padded == (8, 12)
    assert torch.equal(window_unpartition(windows, padded, (7, 10)), x)
    assert windows[2, :, 2:].abs().sum() == 0 and windows[2, :, :2].abs().min() > 0  # window (0, 2): columns 8-11, 10-11 pad
    assert torch.equal(windows[0], x[0, :4, :4])


def test_swiglu_is_its_formula():
    torch.manual_seed(0)
    mlp = perturbed(SwiGLU(8, 21)).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    h = F.silu(x @ mlp.w1.weight.T + mlp.w1.bias) * (x @ mlp.w2.weight.T + mlp.w2.bias)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    want = (h * mlp.ffn_ln.weight + mlp.ffn_ln.bias) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), want)
    assert ViTConfig().build is not None and int(1024 * ViTConfig().mlp_ratio) == 2730


# ---------------------------------------------------------------- the backbone

@pytest.mark.parametrize("hw", [(64, 64), (71, 50), (40, 88)])
def test_any_image_size(hw):
    "Sides that are not multiples of the patch lose their remainder (the official conv); windows pad the grid."
    vit = small_vit().eval()
    out = vit(torch.randn(1, 3, *hw))[0]
    assert out.shape == (1, 32, hw[0] // 8, hw[1] // 8)
    assert vit.out_channels == [32] and vit.strides == [8]
    img = torch.randn(1, 3, 71, 50)
    torch.testing.assert_close(vit(img)[0], vit(img[..., :64, :48])[0])


def test_position_embedding_is_resized_bicubically():
    vit = small_vit()
    pe = vit.pos_embed.detach()  # (1, 1 + 16, 32): a 4 x 4 grid and the class entry
    assert torch.equal(abs_pos_embed(pe, True, (4, 4)), pe[:, 1:].reshape(1, 4, 4, 32))
    want = F.interpolate(pe[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(5, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(abs_pos_embed(pe, True, (5, 7)), want.permute(0, 2, 3, 1))


def test_drop_path_schedule_and_training_noise():
    vit = small_vit(drop_path_rate=0.3)
    assert [round(b.drop_path, 6) for b in vit.blocks] == [0.0, 0.1, 0.2, 0.3]
    img = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.eval()(img)[0], vit(img)[0])
        assert not torch.equal(vit.train()(img)[0], vit.eval()(img)[0])


def test_activation_checkpointing_gives_the_same_values_and_gradients():
    "with_cp recomputes each block in the backward pass (stochastic depth included): same loss, same gradients."
    grads = []
    for with_cp in (False, True):
        vit = small_vit(drop_path_rate=0.4, with_cp=with_cp).train()
        torch.manual_seed(3)
        img = torch.randn(2, 3, 40, 40, requires_grad=True)
        loss = vit(img)[0].square().mean()
        loss.backward()
        grads.append([loss.detach(), img.grad] + [p.grad for p in vit.parameters()])
    for a, b in zip(*grads): torch.testing.assert_close(a, b)


def test_vit_config_errors():
    with pytest.raises(ValueError, match="num_heads"): ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="window_size"): ViTConfig(window_size=0)


# ---------------------------------------------------------------- the simple feature pyramid

@pytest.mark.parametrize("use_p2", [True, False])
@pytest.mark.parametrize("hw", [(8, 12), (7, 5)])
def test_sfp_levels_and_strides(use_p2, hw):
    sfp = SFPConfig(num_outs=4 + use_p2, out_channels=16, use_p2=use_p2).build([32], [16])
    outs = sfp([torch.randn(2, 32, *hw)])
    h, w = hw
    half = lambda n: (n - 1) // 2 + 1  # a stride-2 pool or conv with padding 1
    sizes = ([(4 * h, 4 * w)] if use_p2 else []) + [(2 * h, 2 * w), (h, w), (half(h), half(w)), (half(half(h)), half(half(w)))]
    assert [tuple(o.shape[-2:]) for o in outs] == sizes
    assert all(o.shape[:2] == (2, 16) for o in outs)
    assert sfp.strides == ([4] if use_p2 else []) + [8, 16, 32, 64]


def test_sfp_config_errors():
    with pytest.raises(ValueError, match="num_outs=5"): SFPConfig(num_outs=5, use_p2=False)
    with pytest.raises(ValueError, match="one backbone map"): SFPConfig().build([256, 512], [8, 16])
    with pytest.raises(ValueError, match="expected one map"): SFP(32, 16)([torch.randn(1, 16, 4, 4)])


# ---------------------------------------------------------------- the ConvFC RoI head

def test_convfc_head_class_agnostic_loss_and_predict():
    torch.manual_seed(0)
    head = RoIHead(3, 32, strides=(4, 8), box_stds=(0.05, 0.05, 0.1, 0.1), num_shared_convs=2, num_shared_fcs=1,
                   class_agnostic=True, fc_channels=32)
    assert isinstance(head.bbox_head, Shared2FCBBoxHead) and head.bbox_head.fc_reg.out_features == 4
    assert [k for k in head.state_dict() if "shared_convs.0" in k] == [
        "bbox_head.shared_convs.0.conv.weight", "bbox_head.shared_convs.0.gn.weight", "bbox_head.shared_convs.0.gn.bias"]
    rois = torch.tensor([[2.0, 3.0, 20.0, 30.0], [5.0, 5.0, 40.0, 25.0], [0.0, 0.0, 10.0, 10.0]])
    deltas = torch.randn(3, 4)
    losses = rcnn_loss(torch.randn(3, 4), deltas, rois, torch.tensor([2, 0, 3]), torch.tensor([[3.0, 3, 21, 31], [6, 4, 41, 24], [0, 0, 0, 0]]),
                       coder=head.box_coder)
    assert torch.isfinite(losses["loss_bbox0"])
    dets = head.predict([torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8)], [rois], [(64, 64)])[0]
    assert set(dets["labels"].tolist()) <= {0, 1, 2} and len(dets["boxes"]) > 0
    per_class = dets["boxes"][dets["labels"] == dets["labels"][0]]
    assert len(per_class) <= 3  # one agnostic box per proposal, scored for each class


# ---------------------------------------------------------------- presets, keys, training

def test_large_preset_has_the_official_parameter_count():
    with torch.device("meta"): model = build_model(co_dino_5scale_vit_large_coco())
    counts = parameter_counts(model)
    assert counts["total"] == 365_367_657
    assert (counts["backbone"], counts["neck"]) == (304_238_528, 23_995_904)
    assert sum(p.numel() for p in model.aux_heads[0].roi_head.parameters()) == 15_294_549
    assert set(PRESETS) == {"co_dino_5scale_vit_large_coco", "co_dino_vit_tiny_synthetic"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_survive_a_stored_config(preset):
    cfg = PRESETS[preset]()
    assert config_from_stored(config_to_dict(cfg)) == cfg


def test_official_key_round_trip():
    cfg = co_dino_vit_tiny_synthetic()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    official = to_official_state_dict(model.state_dict(), cfg, "sensex")
    for key in ("backbone.pos_embed", "backbone.rope_win.freqs_cos", "backbone.blocks.0.attn.rope.freqs_sin",
                "backbone.blocks.0.attn.q_bias", "backbone.blocks.3.mlp.ffn_ln.weight", "backbone.out_norm.bias",
                "neck.p2.12.weight", "neck.p6.1.weight", "roi_head.0.bbox_head.shared_convs.1.gn.weight",
                "roi_head.0.bbox_head.shared_fcs.0.weight"):
        assert key in official, key
    assert "backbone.blocks.3.attn.rope.freqs_cos" not in official  # global blocks build their table per call
    assert set(from_official_state_dict(official, cfg)) == set(model.state_dict())
    torch.manual_seed(1)
    fresh = build_model(cfg).eval()
    load_official(fresh, official, cfg, strict=True)
    img = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(model.features(img), fresh.features(img)): assert torch.equal(a, b)


def test_tiny_preset_predicts_on_images_of_any_size():
    "A batch of two images padded to 150 x 190 (not multiples of 16): detections in each image's own pixels."
    torch.manual_seed(0)
    model = build_model(co_dino_vit_tiny_synthetic(3)).eval()
    with torch.no_grad(): dets = model([torch.rand(3, 150, 170), torch.rand(3, 131, 190)])
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(150, 170), (131, 190)]):
        assert len(det["boxes"]) > 0 and (det["boxes"][:, 2] <= w + 1e-3).all() and (det["boxes"][:, 3] <= h + 1e-3).all()


def test_tiny_preset_trains_on_cpu():
    "A few steps on one image lower the loss; every part of the trunk gets gradients."
    cfg = co_dino_vit_tiny_synthetic(3)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    target = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 120.0], [60.0, 40.0, 150.0, 110.0]]),
              "labels": torch.tensor([1, 2]), "img_size": (160, 192)}
    img = torch.randn(1, 3, 160, 192)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    first = None
    for step in range(4):
        torch.manual_seed(0)  # the same denoising noise and samples every step: only the weights change
        losses = model(img, [target])
        loss = sum(v for k, v in losses.items() if "loss" in k)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first = loss.item()
            assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith(("backbone.", "neck.")))
        opt.step()
    assert loss.item() < first


def test_cli_trains_and_evaluates_the_tiny_vit_preset(tmp_path):
    "The tiny ViT preset trains one short epoch from the command line, then evaluates."
    from test_swin import cli_train_and_evaluate
    stored = cli_train_and_evaluate("co_dino_vit_tiny_synthetic", tmp_path,
                                    ["query_head.num_queries=30", "query_head.num_dn_queries=10", "query_head.test_top_k=30"])
    assert stored["backbone"]["type"] == "ViTConfig" and stored["neck"]["type"] == "SFPConfig"
