"""codetr.transformer.position against naive loop oracles written from spec 1.4, hand-computed values and properties."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from codetr.transformer.position import (SinePositionalEncoding, encoder_reference_points, gen_encoder_output_proposals,
                             make_pad_masks, pad_mask_from_sizes, proposal_pos_embed, sine_embed_dino, valid_ratios)


# --- oracles (plain Python loops, float64 where the formula is arithmetic) ----------------------------------

def nearest_src(i, n_in, n_out):
    "PyTorch's 'nearest' source index for a given output size: floor(i * (n_in / n_out)), the scale in float32."
    return min(int(np.floor(np.float32(i) * (np.float32(n_in) / np.float32(n_out)))), n_in - 1)


def naive_level_mask(mask, h_out, w_out):
    B, H, W = mask.shape
    out = torch.zeros(B, h_out, w_out, dtype=torch.bool)
    for b in range(B):
        for i in range(h_out):
            for j in range(w_out):
                out[b, i, j] = mask[b, nearest_src(i, H, h_out), nearest_src(j, W, w_out)]
    return out


def naive_valid_ratios(mask):
    B, H, W = mask.shape
    return torch.tensor([[sum(not mask[b, 0, j] for j in range(W)) / W, sum(not mask[b, i, 0] for i in range(H)) / H]
                         for b in range(B)])


def sin_cos(angle, k):
    return math.sin(angle) if k % 2 == 0 else math.cos(angle)


def naive_sine(mask, F, T, normalize, offset, scale=2 * math.pi, eps=1e-6):
    B, H, W = mask.shape
    out = torch.zeros(B, 2 * F, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                y = sum(not mask[b, r, j] for r in range(i + 1))
                x = sum(not mask[b, i, c] for c in range(j + 1))
                if normalize:
                    y_last = sum(not mask[b, r, j] for r in range(H))
                    x_last = sum(not mask[b, i, c] for c in range(W))
                    y = (y + offset) / (y_last + eps) * scale
                    x = (x + offset) / (x_last + eps) * scale
                for k in range(F):
                    freq = T ** (2 * (k // 2) / F)
                    out[b, k, i, j] = sin_cos(y / freq, k)
                    out[b, F + k, i, j] = sin_cos(x / freq, k)
    return out


def naive_box_embed(values, F, T):
    "values: list of already-scaled angles-to-be (one per coordinate); blocks in the given order."
    return [sin_cos(v / T ** (2 * (k // 2) / F), k) for v in values for k in range(F)]


def naive_reference_points(shapes, ratios):
    B, L = ratios.shape[:2]
    out = []
    for b in range(B):
        pts = []
        for l, (H, W) in enumerate(shapes):
            for i in range(H):
                for j in range(W):
                    x = (j + 0.5) / (ratios[b, l, 0].item() * W)
                    y = (i + 0.5) / (ratios[b, l, 1].item() * H)
                    pts.append([[x * ratios[b, m, 0].item(), y * ratios[b, m, 1].item()] for m in range(L)])
        out.append(pts)
    return torch.tensor(out, dtype=torch.float64)


def naive_proposals(memory, pad, shapes):
    B, S, C = memory.shape
    props = torch.zeros(B, S, 4, dtype=torch.float64)
    mem = memory.clone()
    for b in range(B):
        s = 0
        for l, (H, W) in enumerate(shapes):
            lvl = pad[b, s:s + H * W].view(H, W)
            vh = sum(not lvl[i, 0] for i in range(H))
            vw = sum(not lvl[0, j] for j in range(W))
            for i in range(H):
                for j in range(W):
                    box = [(j + 0.5) / vw, (i + 0.5) / vh, 0.05 * 2 ** l, 0.05 * 2 ** l]
                    ok = not lvl[i, j] and all(0.01 < v < 0.99 for v in box)
                    props[b, s] = torch.tensor([math.log(v / (1 - v)) if ok else math.inf for v in box])
                    if not ok: mem[b, s] = 0
                    s += 1
    return mem, props


def random_batch(sizes, padded):
    return pad_mask_from_sizes(sizes, padded)


def level_shapes(H, W, strides=(8, 16, 32, 64)):
    return [(math.ceil(H / s), math.ceil(W / s)) for s in strides]


# --- masks and valid ratios --------------------------------------------------------------------------------

def test_pad_mask_from_sizes_hand():
    m = pad_mask_from_sizes([(2, 3), (1, 1)], (2, 4))
    assert m.tolist() == [[[False, False, False, True], [False, False, False, True]],
                          [[False, True, True, True], [True, True, True, True]]]
    with pytest.raises(ValueError, match="image 1"):
        pad_mask_from_sizes([(2, 3), (0, 1)], (2, 4))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 48), st.integers(1, 48), st.data())
def test_make_pad_masks_matches_nearest_oracle(H, W, data):
    sizes = [(data.draw(st.integers(1, H)), data.draw(st.integers(1, W))) for _ in range(2)]
    shapes = [(data.draw(st.integers(1, 2 * H)), data.draw(st.integers(1, 2 * W))) for _ in range(2)] + level_shapes(H, W)
    mask = pad_mask_from_sizes(sizes, (H, W))
    for got, (h, w) in zip(make_pad_masks(mask, shapes), shapes):
        assert got.dtype == torch.bool
        assert torch.equal(got, naive_level_mask(mask, h, w))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 40), st.integers(0, 40))
def test_valid_block_size_when_padding_is_a_stride_multiple(hs, ws, dh, dw):
    "With a padded size that is a multiple of the stride, level masks keep ceil(h / s) x ceil(w / s) valid cells."
    s = 8
    H, W = hs * s, ws * s
    h, w = max(1, H - dh), max(1, W - dw)
    m = make_pad_masks(pad_mask_from_sizes([(h, w)], (H, W)), [(hs, ws)])[0][0]
    want = torch.ones(hs, ws, dtype=torch.bool)
    want[:math.ceil(h / s), :math.ceil(w / s)] = False
    assert torch.equal(m, want)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_valid_ratios_matches_oracle(H, W, data):
    sizes = [(data.draw(st.integers(1, H)), data.draw(st.integers(1, W))) for _ in range(3)]
    mask = pad_mask_from_sizes(sizes, (H, W))
    got = valid_ratios(mask)
    assert got.shape == (3, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, naive_valid_ratios(mask).float())
    torch.testing.assert_close(got, torch.tensor([[w / W, h / H] for h, w in sizes]))


def test_make_pad_masks_rejects_bad_shape():
    with pytest.raises(ValueError, match="pad_mask"):
        make_pad_masks(torch.zeros(4, 4, dtype=torch.bool), [(2, 2)])


# --- sine encoding of the grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("F, T, normalize, offset", [(8, 10000., True, -0.5), (8, 20., True, 0.), (6, 10000., False, 0.),
                                                      (4, 100., True, 0.25)])
def test_sine_matches_oracle_on_padded_batch(F, T, normalize, offset):
    mask = pad_mask_from_sizes([(7, 9), (4, 5), (7, 1)], (7, 9))
    got = SinePositionalEncoding(F, T, normalize=normalize, offset=offset)(mask)
    assert got.shape == (3, 2 * F, 7, 9) and got.dtype == torch.float32
    want = naive_sine(mask, F, T, normalize, offset)
    # A column (row) with no valid cell has y_last = 0, so y = offset / eps * scale: with offset != 0 an angle of
    # millions of radians whose sine float32 cannot resolve. Those cells are padding (never read); compare the rest.
    readable = ((~mask).any(1, keepdim=True) & (~mask).any(2, keepdim=True))[:, None] | (offset == 0) | (not normalize)
    torch.testing.assert_close(got.double()[readable.expand_as(got)], want[readable.expand_as(got)], atol=2e-5, rtol=0)
    assert torch.isfinite(got).all()


def test_sine_matches_oracle_on_irregular_mask():
    "The formula is defined for any mask (cumsum per column / row); check it beyond top-left rectangles."
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 6, 7, generator=g) < 0.3
    got = SinePositionalEncoding(4, 10000., offset=-0.5)(mask)
    torch.testing.assert_close(got.double(), naive_sine(mask, 4, 10000., True, -0.5), atol=2e-5, rtol=0)


def test_sine_hand_values_2x3():
    enc = SinePositionalEncoding(num_feats=4, temperature=10000.)(torch.zeros(1, 2, 3, dtype=torch.bool))[0]
    ys = [math.pi, 2 * math.pi]  # counts 1, 2 of 2 rows, times 2 pi
    xs = [2 * math.pi / 3, 4 * math.pi / 3, 2 * math.pi]
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            want = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                    math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
            torch.testing.assert_close(enc[:, i, j], torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=0)


def test_sine_codef_offset_puts_rows_at_cell_centres():
    enc = SinePositionalEncoding(num_feats=2, offset=-0.5)(torch.zeros(1, 4, 1, dtype=torch.bool))[0]
    angles = torch.tensor([(i + 0.5) / 4 * 2 * math.pi for i in range(4)])
    torch.testing.assert_close(enc[0, :, 0], angles.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(enc[1, :, 0], angles.cos(), atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 15), st.integers(0, 15),
       st.sampled_from([(10000., -0.5), (20., 0.)]))
def test_sine_padding_invariance(h, w, ph, pw, cfg):
    "The valid block of a padded image is encoded exactly as the same image without padding."
    T, offset = cfg
    pe = SinePositionalEncoding(16, T, offset=offset)
    padded = pe(pad_mask_from_sizes([(h, w)], (h + ph, w + pw)))
    alone = pe(torch.zeros(1, h, w, dtype=torch.bool))
    assert torch.equal(padded[..., :h, :w], alone)


def test_sine_unnormalised_valid_block_is_also_invariant():
    "Without normalisation the valid block is still invariant (raw counts); only the padded cells differ."
    pe = SinePositionalEncoding(8, normalize=False)
    padded = pe(pad_mask_from_sizes([(3, 4)], (6, 6)))
    assert torch.equal(padded[..., :3, :4], pe(torch.zeros(1, 3, 4, dtype=torch.bool)))


def test_sine_batched_equals_one_by_one():
    mask = pad_mask_from_sizes([(10, 12), (6, 12), (10, 3)], (10, 12))
    pe = SinePositionalEncoding(32, offset=-0.5)
    torch.testing.assert_close(pe(mask), torch.cat([pe(m[None]) for m in mask]))


def test_sine_rejects_odd_num_feats():
    with pytest.raises(ValueError, match="num_feats"):
        SinePositionalEncoding(num_feats=5)


# --- encoder reference points ------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, padded", [([(64, 96), (30, 40)], (64, 96)), ([(40, 64), (28, 36), (9, 64)], (40, 64))])
def test_reference_points_match_oracle(sizes, padded):
    shapes = level_shapes(*padded)
    ratios = torch.stack([valid_ratios(m) for m in make_pad_masks(pad_mask_from_sizes(sizes, padded), shapes)], 1)
    got = encoder_reference_points(shapes, ratios)
    assert got.shape == (len(sizes), sum(h * w for h, w in shapes), len(shapes), 2)
    torch.testing.assert_close(got.double(), naive_reference_points(shapes, ratios), atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder_reference_points(torch.tensor(shapes), ratios), got)


def test_reference_points_unpadded_are_cell_centres_on_every_level():
    shapes = [(4, 6), (2, 3)]
    got = encoder_reference_points(shapes, torch.ones(1, 2, 2))
    assert torch.equal(got[:, :, 0], got[:, :, 1])
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([1 / 12, 1 / 8]))
    torch.testing.assert_close(got[0, 24 + 5, 0], torch.tensor([2.5 / 3, 1.5 / 2]))  # level 1, row 1, column 2


# --- sine embedding of boxes -------------------------------------------------------------------------------

@pytest.mark.parametrize("F, T", [(128, 10000.), (16, 20.)])
def test_proposal_pos_embed_matches_oracle(F, T):
    g = torch.Generator().manual_seed(1)
    boxes = torch.randn(2, 5, 4, generator=g) * 3
    got = proposal_pos_embed(boxes, F, T)
    assert got.shape == (2, 5, 4 * F)
    want = torch.tensor([[naive_box_embed([torch.sigmoid(v).item() * 2 * math.pi for v in box], F, T) for box in row]
                         for row in boxes.double()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 4])
def test_sine_embed_dino_matches_oracle_with_y_first(n):
    g = torch.Generator().manual_seed(2)
    boxes = torch.rand(3, 7, n, generator=g)
    got = sine_embed_dino(boxes)
    assert got.shape == (3, 7, n * 128)
    order = [1, 0] if n == 2 else [1, 0, 2, 3]
    want = torch.tensor([[naive_box_embed([box[o].item() * 2 * math.pi for o in order], 128, 10000.) for box in row]
                         for row in boxes.double()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_box_embeddings_hand_values_and_relation():
    emb = proposal_pos_embed(torch.zeros(4))  # the box (0.5, 0.5, 0.5, 0.5): every first angle is pi
    torch.testing.assert_close(emb[0::128], torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[1::128], -torch.ones(4), atol=1e-6, rtol=0)
    boxes = torch.rand(10, 4) * 0.9 + 0.05
    dino, codef = sine_embed_dino(boxes), proposal_pos_embed(torch.logit(boxes.double()).float())
    torch.testing.assert_close(dino, torch.cat([codef[:, 128:256], codef[:, :128], codef[:, 256:]], -1), atol=1e-5, rtol=0)


def test_box_embeddings_reject_bad_shapes():
    with pytest.raises(ValueError, match="boxes_unact"):
        proposal_pos_embed(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="boxes"):
        sine_embed_dino(torch.zeros(3, 3))


# --- two-stage proposals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, padded", [([(64, 96), (30, 40)], (64, 96)), ([(40, 64), (28, 36)], (40, 64)),
                                           ([(500, 700)], (512, 704))])
def test_encoder_proposals_match_oracle(sizes, padded):
    shapes = level_shapes(*padded)
    pad = torch.cat([m.flatten(1) for m in make_pad_masks(pad_mask_from_sizes(sizes, padded), shapes)], 1)
    memory = torch.randn(len(sizes), pad.shape[1], 3)
    out_mem, props = gen_encoder_output_proposals(memory, pad, shapes)
    want_mem, want_props = naive_proposals(memory, pad, shapes)
    assert props.shape == (len(sizes), pad.shape[1], 4) and props.dtype == torch.float32
    torch.testing.assert_close(out_mem, want_mem)
    torch.testing.assert_close(props.double(), want_props, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(props).any()


def test_encoder_proposals_full_size_counts():
    shapes = [(100, 152), (50, 76), (25, 38), (13, 19)]
    pad = torch.cat([m.flatten(1) for m in make_pad_masks(pad_mask_from_sizes([(800, 1216)], (800, 1216)), shapes)], 1)
    out_mem, props = gen_encoder_output_proposals(torch.ones(1, pad.shape[1], 2), pad, shapes)
    valid = torch.isfinite(props).all(-1)[0].split([h * w for h, w in shapes])
    # level 0: rows 1..98 and columns 2..149 have centres inside (0.01, 0.99); level 1: rows/cols 1..48 / 1..74
    assert [int(v.sum()) for v in valid] == [98 * 148, 48 * 74, 25 * 38, 13 * 19]
    assert torch.equal(out_mem[0].sum(-1) != 0, torch.isfinite(props[0]).all(-1))
    torch.testing.assert_close(props[0, 152 * 50 + 76].sigmoid(), torch.tensor([76.5 / 152, 50.5 / 100, 0.05, 0.05]))


def test_encoder_proposals_large_levels_all_invalid():
    "From level 4 on, w = h = 0.05 * 16 = 0.8 is valid, level 5 (1.6) never is."
    shapes = [(2, 2)] * 6
    pad = torch.zeros(1, 24, dtype=torch.bool)
    _, props = gen_encoder_output_proposals(torch.randn(1, 24, 2), pad, shapes)
    valid = torch.isfinite(props).all(-1)[0].view(6, 4).all(-1)
    assert valid.tolist() == [True, True, True, True, True, False]


def test_encoder_proposals_reject_wrong_token_count():
    with pytest.raises(ValueError, match="spatial_shapes"):
        gen_encoder_output_proposals(torch.zeros(1, 10, 2), torch.zeros(1, 10, dtype=torch.bool), [(3, 3)])


@pytest.mark.cuda
def test_cuda_matches_cpu():
    mask = pad_mask_from_sizes([(64, 96), (30, 40)], (64, 96))
    shapes = level_shapes(64, 96)
    levels = make_pad_masks(mask, shapes)
    levels_cuda = make_pad_masks(mask.cuda(), shapes)
    for a, b in zip(levels, levels_cuda): assert torch.equal(a, b.cpu())
    pe = SinePositionalEncoding(128, offset=-0.5)
    torch.testing.assert_close(pe(mask.cuda()).cpu(), pe(mask), atol=1e-5, rtol=0)
    ratios = torch.stack([valid_ratios(m) for m in levels], 1)
    torch.testing.assert_close(encoder_reference_points(shapes, ratios.cuda()).cpu(), encoder_reference_points(shapes, ratios))
    pad = torch.cat([m.flatten(1) for m in levels], 1)
    memory = torch.randn(2, pad.shape[1], 8)
    mem_cpu, props_cpu = gen_encoder_output_proposals(memory, pad, shapes)
    mem_gpu, props_gpu = gen_encoder_output_proposals(memory.cuda(), pad.cuda(), torch.tensor(shapes).cuda())
    torch.testing.assert_close(mem_gpu.cpu(), mem_cpu)
    torch.testing.assert_close(props_gpu.cpu(), props_cpu)
    boxes = torch.randn(3, 4)
    torch.testing.assert_close(proposal_pos_embed(boxes.cuda()).cpu(), proposal_pos_embed(boxes), atol=1e-5, rtol=0)
    torch.testing.assert_close(sine_embed_dino(boxes.sigmoid().cuda()).cpu(), sine_embed_dino(boxes.sigmoid()), atol=1e-5, rtol=0)
