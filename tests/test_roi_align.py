"""codetr.ops.roi_align: RoIAlign's CPU training path against torchvision's `roi_align` (values and gradients)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchvision.ops import roi_align

from codetr.ops.roi_align import roi_align_fast, roi_align_taps


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_rois(n, hw, batch, scale, g, dtype):
    "Boxes of every kind on a (h, w) map: inside, partly or wholly outside, tiny, huge, inverted, on pixel edges."
    h, w = hw
    ctr = (torch.rand(n, 2, generator=g, dtype=dtype) * 1.8 - 0.4) * torch.tensor([w, h], dtype=dtype)
    wh = torch.rand(n, 2, generator=g, dtype=dtype) ** 2 * torch.tensor([w, h], dtype=dtype) * 1.5 + 0.05
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)  # (n, 4) on the map
    boxes[: n // 8, 2:] = boxes[: n // 8, :2] - wh[: n // 8]  # inverted
    boxes[n // 8: n // 4] = boxes[n // 8: n // 4].round()  # integer corners: samples on pixel boundaries
    boxes[n // 4] = torch.tensor([-9., -8., -2.5, -1.5])  # wholly outside
    boxes[n // 4 + 1] = torch.tensor([-1., -1., w + 1., h + 1.])  # the whole map and a pixel around it
    return torch.cat([torch.randint(0, batch, (n, 1), generator=g).to(dtype), boxes / scale], 1)  # (n, 5) image xyxy


def assert_roi_align_matches(feat, rois, *args):
    "Values and map gradients of `roi_align_fast` equal torchvision's up to round-off in sums of many terms."
    a, b = feat.detach().clone().requires_grad_(), feat.detach().clone().requires_grad_()
    ours, theirs = roi_align_fast(a, rois, *args), roi_align(b, rois, *args)
    grad = torch.randn_like(theirs)
    (ours * grad).sum().backward(); (theirs * grad).sum().backward()
    eps = 1e-5 if feat.dtype == torch.float32 else 1e-12  # about 100 ulps
    mag = feat.detach().abs().requires_grad_()  # the sums of the terms' sizes bound the round-off
    out_mag = roi_align(mag, rois, *args)  # (R, C, P, P)
    grad_mag = torch.autograd.grad(out_mag, mag, grad.abs())[0]  # (B, C, H, W)
    assert ((ours - theirs).abs() <= eps * (out_mag + 1e-3)).all(), (ours - theirs).abs().max()
    assert ((a.grad - b.grad).abs() <= eps * (grad_mag + 1e-3)).all(), (a.grad - b.grad).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("hw,output_size", [((1, 1), 7), ((5, 7), 2), ((16, 13), 7), ((40, 33), 1), ((24, 24), 7)])
def test_roi_align_fast_matches_torchvision(dtype, sampling_ratio, aligned, hw, output_size):
    g = gen(hash((sampling_ratio, aligned, hw)) % 1000)
    feat = torch.randn(2, 3, *hw, generator=g, dtype=dtype)
    rois = random_rois(48, hw, 2, 0.25, g, dtype)
    assert_roi_align_matches(feat, rois, output_size, 0.25, sampling_ratio, aligned)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([0, 2]), st.integers(0, 10**6))
def test_roi_align_fast_matches_torchvision_random_maps(h, w, sampling_ratio, seed):
    g = gen(seed)
    feat = torch.randn(3, 4, h, w, generator=g)
    assert_roi_align_matches(feat, random_rois(24, (h, w), 3, 1 / 8, g, torch.float32), 7, 1 / 8, sampling_ratio, True)


def test_roi_align_fast_real_shape():
    "The RoI head's shape: 512 RoIs of proposal sizes on a 64x64 stride-8 map of 256 channels."
    g = gen(3)
    feat = torch.randn(1, 256, 64, 64, generator=g)
    xy = torch.rand(512, 2, generator=g) * 400
    rois = torch.cat([torch.zeros(512, 1), xy, xy + 16 + torch.rand(512, 2, generator=g) * 200], 1)  # (512, 5)
    assert_roi_align_matches(feat, rois, 7, 1 / 8, 0, True)


def test_roi_align_fast_falls_back_to_torchvision():
    g = gen(4)
    feat = torch.randn(2, 3, 9, 11, generator=g, requires_grad=True)
    rois = random_rois(16, (9, 11), 2, 0.5, g, torch.float32)
    with torch.no_grad():  # inference: torchvision's own output
        assert torch.equal(roi_align_fast(feat, rois, 7, 0.5), roi_align(feat, rois, 7, 0.5, 0, True))
    assert torch.equal(roi_align_fast(feat.detach(), rois, 7, 0.5), roi_align(feat.detach(), rois, 7, 0.5, 0, True))
    assert roi_align_fast(feat, rois[:0], 7, 0.5).shape == (0, 3, 7, 7)
    half = feat.detach().half().requires_grad_()  # other dtypes: torchvision's
    assert torch.equal(roi_align_fast(half, rois.half(), 7, 0.5), roi_align(half, rois.half(), 7, 0.5, 0, True))
    # A long and a tall RoI pad every window to both lengths: past 2**23 padded taps the call is torchvision's.
    long_tall = torch.tensor([[0., 0., 0., 600., 1.], [0., 0., 0., 1., 600.]]).repeat(12, 1)  # (24, 5)
    assert roi_align_taps(torch.Size((1, 1, 600, 600)), long_tall, 7, 1.0, 0, True) is None
    big = torch.randn(1, 1, 600, 600, generator=g)
    assert_roi_align_matches(big, long_tall, 7, 1.0, 0, True)


def test_roi_align_taps_are_bin_averages():
    "Each bin's taps sum to 1 where all its samples fall on the map, and are grouped bin after bin."
    g = gen(5)
    rois = torch.cat([torch.zeros(20, 1), torch.rand(20, 2, generator=g) * 40 + 8,
                      torch.rand(20, 2, generator=g) * 40 + 56], 1)  # (20, 5) inside a 16x16 stride-8 map
    rows, w, bins = roi_align_taps(torch.Size((1, 4, 16, 16)), rois.double(), 7, 1 / 8, 0, True)
    assert (np.diff(bins) >= 0).all() and (w > 0).all() and rows.min() >= 0 and rows.max() < 256
    np.testing.assert_allclose(np.bincount(bins, w, minlength=20 * 49), 1.0, atol=1e-12)
