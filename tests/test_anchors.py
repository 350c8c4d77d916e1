"""Anchor generator and DeltaXYWH box coder against hand-computed values, a naive loop, torchvision, and round trips."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator

from codetr.ops.anchors import (CO_DEF_STRIDES, CO_DINO_STRIDES, AnchorGenerator, DeltaXYWHBBoxCoder, anchor_inside_flags,
                            atss_anchor_generator, delta_xywh_decode, delta_xywh_encode, roi_box_coder,
                            rpn_anchor_generator, rpn_box_coder)


# ---------------------------------------------------------------- oracles written independently of the module
def naive_anchors(stride, ratios, scales, h, w, base_size=None):
    "Anchors of one level by explicit loops, in float64: y rows, x columns, ratio, scale."
    base = stride if base_size is None else base_size
    out = []
    for y in range(h):
        for x in range(w):
            for r in ratios:
                for s in scales:
                    aw, ah = base * s / math.sqrt(r), base * s * math.sqrt(r)
                    cx, cy = x * stride, y * stride
                    out.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


def naive_encode(p, g, means, stds):
    out = []
    for (px1, py1, px2, py2), (gx1, gy1, gx2, gy2) in zip(p.tolist(), g.tolist()):
        pw, ph, gw, gh = px2 - px1, py2 - py1, gx2 - gx1, gy2 - gy1
        d = [((gx1 + gx2) / 2 - (px1 + px2) / 2) / pw, ((gy1 + gy2) / 2 - (py1 + py2) / 2) / ph,
             math.log(gw / pw), math.log(gh / ph)]
        out.append([(v - m) / s for v, m, s in zip(d, means, stds)])
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


def random_boxes(n, g, scale=400.0, min_size=1.0):
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=torch.float64) * scale / 2 + min_size], 1)


# ---------------------------------------------------------------- anchor generator
def test_presets_match_spec():
    rpn, atss = rpn_anchor_generator(), atss_anchor_generator()
    assert rpn.strides == (8, 16, 32, 64, 128) == CO_DEF_STRIDES
    assert rpn.ratios == (0.5, 1.0, 2.0) and rpn.octave_base_scale == 4 and rpn.scales_per_octave == 3
    assert atss.ratios == (1.0,) and atss.octave_base_scale == 8 and atss.scales_per_octave == 1
    assert rpn.num_base_priors == [9] * 5 and atss.num_base_priors == [1] * 5
    assert rpn_anchor_generator(CO_DINO_STRIDES).num_base_priors == [9] * 6
    assert rpn.center_offset == 0 == atss.center_offset
    torch.testing.assert_close(rpn.scale_values, torch.tensor([4.0, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)]))


def test_hand_computed_base_anchors():
    rpn = rpn_anchor_generator()
    b = rpn.base_anchors(0).double()
    # ratio 0.5 (wide), scale 4 at stride 8: 32*sqrt(2) wide, 32/sqrt(2) high, centred at 0
    torch.testing.assert_close(b[0], torch.tensor([-16 * 2 ** 0.5, -8 * 2 ** 0.5, 16 * 2 ** 0.5, 8 * 2 ** 0.5],
                                                  dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(b[3], torch.tensor([-16.0, -16, 16, 16], dtype=torch.float64))
    # ratio 2 (tall), scale 4*2^(1/3)
    s = 8 * 4 * 2 ** (1 / 3)
    torch.testing.assert_close(b[7], torch.tensor([-s / 2 ** 0.5 / 2, -s * 2 ** 0.5 / 2, s / 2 ** 0.5 / 2,
                                                   s * 2 ** 0.5 / 2], dtype=torch.float64), rtol=0, atol=1e-5)
    atss = atss_anchor_generator(CO_DINO_STRIDES)
    for lvl, stride in enumerate(CO_DINO_STRIDES):
        assert atss.base_anchors(lvl).tolist() == [[-4.0 * stride, -4.0 * stride, 4.0 * stride, 4.0 * stride]]


@pytest.mark.parametrize("gen", [rpn_anchor_generator(), atss_anchor_generator(),
                                 rpn_anchor_generator(CO_DINO_STRIDES),
                                 AnchorGenerator((4, 10), ratios=(0.25, 1.0, 3.0), scales=(1.0, 1.5)),
                                 AnchorGenerator((16,), ratios=(1.0, 2.0), scales=(2.0,), base_sizes=(12,))],
                         ids=["rpn", "atss", "rpn-dino", "explicit-scales", "base-sizes"])
def test_grid_priors_match_naive_loop(gen):
    sizes = [(3 + i % 2, 5 - i % 3) for i in range(gen.num_levels)]
    anchors = gen.grid_priors(sizes)
    assert len(anchors) == gen.num_levels
    for lvl, (h, w) in enumerate(sizes):
        base = None if gen.base_sizes is None else gen.base_sizes[lvl]
        ref = naive_anchors(gen.strides[lvl], gen.ratios, gen.scale_values.double().tolist(), h, w, base)
        assert anchors[lvl].shape == (h * w * gen.num_base_priors[lvl], 4) and anchors[lvl].dtype == torch.float32
        torch.testing.assert_close(anchors[lvl].double(), ref, rtol=0, atol=1e-4)


def test_grid_priors_match_torchvision_ordering():
    "torchvision rounds its base anchors; otherwise the layout (row-major, all anchors per location) is the same."
    gen = rpn_anchor_generator()
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)]
    tv = TvAnchorGenerator(sizes=tuple(tuple((s * gen.scale_values).tolist()) for s in gen.strides),
                           aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    tv.cell_anchors = [tv.generate_anchors(list(s * gen.scale_values), [0.5, 1.0, 2.0]) for s in gen.strides]
    tv_anchors = tv.grid_anchors([list(s) for s in sizes], [[torch.tensor(s), torch.tensor(s)] for s in gen.strides])
    for ours, theirs in zip(gen.grid_priors(sizes), tv_anchors):
        torch.testing.assert_close(ours.round(), theirs.float())


def test_atss_grid_equals_torchvision_exactly():
    gen = atss_anchor_generator()
    sizes = [(6, 9), (3, 5), (2, 3), (1, 2), (1, 1)]
    tv = TvAnchorGenerator(sizes=tuple((8.0 * s,) for s in gen.strides), aspect_ratios=((1.0,),) * 5)
    tv_anchors = tv.grid_anchors([list(s) for s in sizes], [[torch.tensor(s), torch.tensor(s)] for s in gen.strides])
    for ours, theirs in zip(gen.grid_priors(sizes), tv_anchors):
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)


def test_grid_priors_order_location_major():
    gen = rpn_anchor_generator()
    h, w = 3, 4
    a = gen.grid_priors([(h, w)] * 5)[1].reshape(h, w, 9, 4)  # stride 16
    for y in range(h):
        for x in range(w):
            torch.testing.assert_close(a[y, x], gen.base_anchors(1) + torch.tensor([16.0 * x, 16 * y] * 2))


def test_grid_priors_dtype_device_and_empty_level():
    gen = atss_anchor_generator()
    out = gen.grid_priors([(2, 2), (0, 3), (1, 1), (1, 1), (1, 1)], device="cpu", dtype=torch.float64)
    assert out[0].dtype == torch.float64 and out[1].shape == (0, 4)


def test_one_location_per_level():
    out = rpn_anchor_generator().grid_priors([(1, 1)] * 5)
    for lvl, a in enumerate(out):
        torch.testing.assert_close(a, rpn_anchor_generator().base_anchors(lvl))


@pytest.mark.parametrize("kwargs,match", [
    (dict(strides=(8,), ratios=(1.0,)), "scales"),
    (dict(strides=(8,), ratios=(1.0,), octave_base_scale=4), "scales_per_octave"),
    (dict(strides=(8,), ratios=(1.0,), scales=(1.0,), octave_base_scale=4, scales_per_octave=2), "either"),
    (dict(strides=(8, 16), ratios=(1.0,), scales=(1.0,), base_sizes=(8,)), "base_sizes"),
    (dict(strides=(), ratios=(1.0,), scales=(1.0,)), "strides"),
    (dict(strides=(8,), ratios=(1.0,), scales=(1.0,), center_offset=1.5), "center_offset"),
])
def test_bad_config_names_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorGenerator(**kwargs)


def test_bad_featmap_sizes():
    with pytest.raises(ValueError, match="featmap_sizes"):
        rpn_anchor_generator().grid_priors([(2, 2)] * 3)
    with pytest.raises(ValueError, match="featmap_sizes"):
        atss_anchor_generator().valid_flags([(2, 2, 2)] * 5, (16, 16))


def test_center_offset():
    gen = AnchorGenerator((8,), ratios=(1.0,), scales=(1.0,), center_offset=0.5)
    a = gen.grid_priors([(1, 2)])[0]
    torch.testing.assert_close((a[:, :2] + a[:, 2:]) / 2, torch.tensor([[4.0, 4.0], [12.0, 4.0]]))


# ---------------------------------------------------------------- valid flags
def naive_valid(stride, h, w, a, pad_h, pad_w):
    out = []
    for y in range(h):
        for x in range(w):
            out += [y < math.ceil(pad_h / stride) and x < math.ceil(pad_w / stride)] * a
    return torch.tensor(out, dtype=torch.bool)


@pytest.mark.parametrize("pad_hw", [(64, 96), (60, 90), (8, 8), (1, 1), (1000, 1000)])
@pytest.mark.parametrize("gen", [rpn_anchor_generator(), atss_anchor_generator()], ids=["rpn", "atss"])
def test_valid_flags_match_naive(gen, pad_hw):
    sizes = [(math.ceil(64 / s), math.ceil(96 / s)) for s in gen.strides]  # the batch-padded 64 x 96 image
    flags = gen.valid_flags(sizes, pad_hw)
    for lvl, (h, w) in enumerate(sizes):
        assert flags[lvl].dtype == torch.bool
        assert torch.equal(flags[lvl], naive_valid(gen.strides[lvl], h, w, gen.num_base_priors[lvl], *pad_hw))


def test_anchor_inside_flags():
    anchors = torch.tensor([[-5.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 20, 10], [2, 2, 4, 4]])
    valid = torch.tensor([True, True, True, False])
    assert anchor_inside_flags(anchors, valid, (10, 20)).tolist() == [True, True, True, False]
    assert anchor_inside_flags(anchors, valid, (10, 20), allowed_border=0).tolist() == [False, False, False, False]
    assert anchor_inside_flags(anchors, valid, (10, 20), allowed_border=1).tolist() == [False, True, True, False]
    assert anchor_inside_flags(anchors, valid, (10, 20), allowed_border=5).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="anchors_xyxy"):
        anchor_inside_flags(anchors, valid[:2], (10, 20))


# ---------------------------------------------------------------- box coder
STDS = [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)]


@pytest.mark.parametrize("stds", STDS)
@pytest.mark.parametrize("means", [(0.0, 0.0, 0.0, 0.0), (0.1, -0.2, 0.05, 0.0)])
def test_encode_matches_naive(means, stds):
    g = torch.Generator().manual_seed(1)
    p, t = random_boxes(64, g), random_boxes(64, g)
    torch.testing.assert_close(delta_xywh_encode(p, t, means, stds), naive_encode(p, t, means, stds))


def test_hand_computed_encode_decode():
    p, t = torch.tensor([[10.0, 10, 30, 50]]), torch.tensor([[0.0, 20, 40, 40]])
    # p: centre (20, 30), 20 x 40; t: centre (20, 30), 40 x 20
    d = delta_xywh_encode(p, t)
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, math.log(2), math.log(0.5)]]))
    torch.testing.assert_close(delta_xywh_decode(p, d), t)
    # a shift by half the proposal size: dx = 0.5, dy = -0.25
    torch.testing.assert_close(delta_xywh_decode(p, torch.tensor([[0.5, -0.25, 0.0, 0.0]])),
                               torch.tensor([[20.0, 0, 40, 40]]))


@pytest.mark.parametrize("stds", STDS)
def test_decode_matches_torchvision(stds):
    g = torch.Generator().manual_seed(2)
    p = random_boxes(100, g).float()
    deltas = (torch.rand(100, 8, generator=g) * 2 - 1) * 0.8  # |dw| * std well inside the clamp
    tv = BoxCoder(weights=tuple(1 / s for s in stds))
    torch.testing.assert_close(delta_xywh_decode(p, deltas, stds=stds), tv.decode_single(deltas, p),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("stds", STDS)
def test_encode_matches_torchvision(stds):
    g = torch.Generator().manual_seed(3)
    p, t = random_boxes(100, g).float(), random_boxes(100, g).float()
    tv = BoxCoder(weights=tuple(1 / s for s in stds))
    torch.testing.assert_close(delta_xywh_encode(p, t, stds=stds), tv.encode_single(t, p), rtol=1e-4, atol=1e-4)


def test_decode_clamps_both_directions():
    p = torch.tensor([[0.0, 0, 16, 32]])
    max_ratio = abs(math.log(16 / 1000))
    out = delta_xywh_decode(p, torch.tensor([[0.0, 0, 50, -50]]))
    wh = out[0, 2:] - out[0, :2]
    torch.testing.assert_close(wh, torch.tensor([16 * math.exp(max_ratio), 32 * math.exp(-max_ratio)]))
    torch.testing.assert_close(wh, torch.tensor([1000.0, 0.512]))
    # a custom clip
    out = delta_xywh_decode(p, torch.tensor([[0.0, 0, 5, 5]]), wh_ratio_clip=0.5)
    torch.testing.assert_close(out[0, 2:] - out[0, :2], torch.tensor([32.0, 64.0]))


def test_decode_clip_to_image():
    p = torch.tensor([[0.0, 0, 10, 10], [90, 40, 110, 60]])
    out = delta_xywh_decode(p, torch.tensor([[-1.0, -1, 0, 0], [0.0, 0, 0, 0]]), max_hw=(50, 100))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0, 0, 0], [90, 40, 100, 50]]))


def test_class_specific_and_batched_decode():
    g = torch.Generator().manual_seed(4)
    p = random_boxes(12, g).float().reshape(3, 4, 4)
    deltas = torch.randn(3, 4, 4 * 5, generator=g) * 0.3
    out = delta_xywh_decode(p, deltas, stds=(0.1, 0.1, 0.2, 0.2))
    assert out.shape == (3, 4, 20)
    for k in range(5):
        ref = delta_xywh_decode(p.reshape(-1, 4), deltas[..., 4 * k:4 * k + 4].reshape(-1, 4), stds=(0.1, 0.1, 0.2, 0.2))
        torch.testing.assert_close(out[..., 4 * k:4 * k + 4].reshape(-1, 4), ref)


def test_empty_inputs():
    e = torch.zeros(0, 4)
    assert delta_xywh_encode(e, e).shape == (0, 4)
    assert delta_xywh_decode(e, e).shape == (0, 4)
    assert delta_xywh_decode(e, torch.zeros(0, 8)).shape == (0, 8)


def test_zero_size_behaviour_matches_official():
    "Like mmdet: a zero-width ground-truth box gives dw = -inf; a zero-size proposal decodes to a point."
    d = delta_xywh_encode(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 0, 5, 10]]))
    assert d[0, 2] == -math.inf and torch.isfinite(d[0, [0, 1, 3]]).all()
    out = delta_xywh_decode(torch.tensor([[5.0, 5, 5, 5]]), torch.tensor([[1.0, 1, 1, 1]]))
    torch.testing.assert_close(out, torch.tensor([[5.0, 5, 5, 5]]))


def test_bad_shapes_name_arguments():
    with pytest.raises(ValueError, match="proposals_xyxy"):
        delta_xywh_encode(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="deltas"):
        delta_xywh_decode(torch.zeros(3, 4), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="deltas"):
        delta_xywh_decode(torch.zeros(3, 4), torch.zeros(2, 4))


def test_gradients_flow_through_decode():
    p = torch.tensor([[0.0, 0, 10, 20], [5, 5, 50, 30]])
    d = torch.randn(2, 4, generator=torch.Generator().manual_seed(5)).requires_grad_()
    roi_box_coder().decode(p, d, max_hw=(40, 40)).sum().backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0


def test_coder_presets():
    assert rpn_box_coder() == DeltaXYWHBBoxCoder((0.0,) * 4, (1.0,) * 4, 16 / 1000)
    assert roi_box_coder().stds == (0.1, 0.1, 0.2, 0.2) and roi_box_coder().means == (0.0,) * 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(0.5, 300), st.floats(0.5, 300)),
                min_size=1, max_size=8),
       st.lists(st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(0.5, 300), st.floats(0.5, 300)),
                min_size=8, max_size=8),
       st.sampled_from(STDS))
def test_round_trip_property(props, gts, stds):
    n = len(props)
    p = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in props], dtype=torch.float64)
    t = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in gts[:n]], dtype=torch.float64)
    coder = DeltaXYWHBBoxCoder(stds=stds, wh_ratio_clip=1e-6)  # ratios up to 600 exceed the default clamp
    torch.testing.assert_close(coder.decode(p, coder.encode(p, t)), t, rtol=1e-9, atol=1e-7)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    gen = rpn_anchor_generator()
    sizes = [(5, 7), (3, 4), (2, 2), (1, 1), (1, 1)]
    for cpu, gpu in zip(gen.grid_priors(sizes), gen.grid_priors(sizes, device="cuda")):
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu)
    for cpu, gpu in zip(gen.valid_flags(sizes, (30, 40)), gen.valid_flags(sizes, (30, 40), device="cuda")):
        assert torch.equal(gpu.cpu(), cpu)
    g = torch.Generator().manual_seed(6)
    p, t = random_boxes(20, g).float(), random_boxes(20, g).float()
    coder = roi_box_coder()
    d = coder.encode(p.cuda(), t.cuda())
    torch.testing.assert_close(d.cpu(), coder.encode(p, t))
    torch.testing.assert_close(coder.decode(p.cuda(), d, max_hw=(300, 300)).cpu(), coder.decode(p, d.cpu(), (300, 300)))
