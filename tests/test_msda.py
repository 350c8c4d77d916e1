"""Multi-scale deformable attention: the grid_sample reference against a brute-force oracle, the gather (CPU) path
against the reference, dispatch and input checks, and the MSDeformAttn module (spec 1.4 and 6)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from codetr.ops.cuda import cuda_available
from codetr.ops.msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_gather, ms_deform_attn_reference


def make_inputs(B=2, Q=5, M=2, D=3, P=2, hw=((4, 6), (3, 2), (1, 1)), dtype=torch.float64, spill=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    value = torch.randn(B, int(shapes.prod(1).sum()), M, D, generator=g, dtype=dtype)
    locs = torch.rand(B, Q, M, len(hw), P, 2, generator=g, dtype=dtype) * (1 + 2 * spill) - spill
    weights = torch.rand(B, Q, M, len(hw), P, generator=g, dtype=dtype)
    return value, shapes, starts, locs, weights


def brute_force(value, shapes, starts, locs, weights):
    "Spec 6.2 written as loops over numpy arrays: pixel = loc*size - 0.5, bilinear, zero outside."
    v, loc, w = value.numpy(), locs.numpy(), weights.numpy()
    B, S, M, D = v.shape
    _, Q, _, L, P, _ = loc.shape
    out = np.zeros((B, Q, M, D))
    for b, q, m, l, p in np.ndindex(B, Q, M, L, P):
        H, W = (int(s) for s in shapes[l])
        x, y = loc[b, q, m, l, p, 0] * W - 0.5, loc[b, q, m, l, p, 1] * H - 0.5
        if not (-1 < x < W and -1 < y < H): continue
        x0, y0 = math.floor(x), math.floor(y)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < H and 0 <= xx < W:
                k = (1 - abs(x - xx)) * (1 - abs(y - yy))
                out[b, q, m] += w[b, q, m, l, p] * k * v[b, int(starts[l]) + yy * W + xx, m]
    return torch.from_numpy(out.reshape(B, Q, M * D))


def value_and_grads(fn, value, shapes, starts, locs, weights, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locs, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, grad_out))


# ---------------------------------------------------------------- the reference is the spec
@pytest.mark.parametrize("hw", [((4, 6), (3, 2), (1, 1)), ((1, 1),), ((2, 5),)])
def test_reference_matches_brute_force(hw):
    inputs = make_inputs(B=2, Q=4, M=2, D=3, P=2, hw=hw)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), brute_force(*inputs), rtol=0, atol=1e-12)


def test_reference_hand_values():
    value = torch.arange(1.0, 5.0).view(1, 4, 1, 1)  # one 2x2 level: [[1, 2], [3, 4]]
    locs = torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.75, 0.75], [0.5, 0.25], [-0.25, 0.25], [1.2, 0.5]]).view(1, 6, 1, 1, 1, 2)
    out = ms_deform_attn_reference(value, torch.tensor([[2, 2]]), torch.tensor([0]), locs, torch.ones(1, 6, 1, 1, 1))
    # centre = mean; pixel centres; halfway along the top row; x = -1 pixel; x = 1.9 pixels -> 0.1 of column 1
    torch.testing.assert_close(out.flatten(), torch.tensor([2.5, 1.0, 4.0, 1.5, 0.0, 0.1 * 3]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the gather path against the reference
@pytest.mark.parametrize("D", [1, 30, 32, 71])
@pytest.mark.parametrize("hw", [((4, 6), (3, 2), (1, 1)), ((1, 1),), ((7, 3), (2, 2))])
def test_gather_float64_values_and_grads(D, hw):
    inputs = make_inputs(B=2, Q=6, M=2, D=D, P=3, hw=hw, seed=D)
    grad_out = torch.randn(2, 6, 2 * D, dtype=torch.float64)
    ours = value_and_grads(ms_deform_attn_gather, *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *inputs, grad_out)
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-12
    for name, a, b in zip(("out", "value", "locations", "weights"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,Q", [(1, 1), (3, 8), (2, 33)])
def test_gather_float32(B, Q):
    inputs = make_inputs(B=B, Q=Q, M=4, D=8, P=4, dtype=torch.float32, seed=B * Q)
    grad_out = torch.randn(B, Q, 32)
    ours = value_and_grads(ms_deform_attn_gather, *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *[t.double() if t.is_floating_point() else t for t in inputs],
                          grad_out.double())
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("Q,hw", [(3, ((3, 4), (1, 2))), (1, ((3, 4), (1, 2))),
                                  (3, ((4, 3), (2, 2), (2, 1), (1, 1), (1, 2)))])
def test_gather_gradcheck(Q, hw):
    "gradcheck with sorted gathers (Q=3: entries outnumber the table rows) and with one scatter (Q=1), 2 and 5 levels."
    value, shapes, starts, locs, weights = make_inputs(B=1, Q=Q, M=2, D=2, P=2, hw=hw)
    leaves = [t.requires_grad_() for t in (value, locs, weights)]
    fn = lambda v, l, w: ms_deform_attn_gather(v, shapes, starts, l, w)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), Q=st.integers(1, 9), M=st.integers(1, 3), D=st.integers(1, 9), P=st.integers(1, 3),
       hw=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_gather_equals_reference_property(B, Q, M, D, P, hw, seed):
    inputs = make_inputs(B, Q, M, D, P, tuple(hw), seed=seed, spill=0.5)
    torch.testing.assert_close(ms_deform_attn_gather(*inputs), ms_deform_attn_reference(*inputs), rtol=0, atol=1e-12)



@pytest.mark.parametrize("chunk", [1, 37, 1 << 20])
@pytest.mark.parametrize("Q,hw", [(6, ((4, 6), (3, 2), (1, 1))), (1, ((20, 30), (9, 7)))])
def test_gather_chunks_and_scatter_layouts_agree_with_reference(monkeypatch, chunk, Q, hw):
    "Any chunk size (down to one bag per chunk), and both ways to the value gradient (sorted gathers when entries"
    " outnumber the table rows, then one scatter), give the reference's values and gradients."
    import codetr.ops.msda as msda
    monkeypatch.setattr(msda, "_CHUNK", chunk)
    inputs = make_inputs(B=2, Q=Q, M=2, D=5, P=3, hw=hw, seed=chunk)
    grad_out = torch.randn(2, Q, 10, dtype=torch.float64)
    ours = value_and_grads(ms_deform_attn_gather, *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *inputs, grad_out)
    for name, a, b in zip(("out", "value", "locations", "weights"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("Q", [1, 40])
def test_splat_corners_equals_index_add(Q):
    "The sorted gathers of the value gradient equal a plain scatter of every corner into the padded table."
    from codetr.ops.msda import _chunk_geometry, _pad_levels, _padded_grid, _splat_corners, _unpad_levels
    value, shapes, starts, locs, weights = make_inputs(B=2, Q=Q, M=3, D=4, P=2, hw=((4, 6), (3, 2), (1, 1)), spill=0.5)
    (B, S, M, D), (L, P), hw = value.shape, locs.shape[3:5], [tuple(s) for s in shapes.tolist()]
    grid = _padded_grid(hw, B, Q, M, P, value.dtype, value.device)
    rows, corner_w = _chunk_geometry(grid, locs.reshape(-1, L * P, 2), weights.reshape(-1, L * P), 0, B * Q * M)[:2]
    grad_out = torch.randn(B * Q * M, D, dtype=torch.float64)
    R = _pad_levels(value, hw).shape[1] * B * M
    table = torch.zeros(R, D, dtype=torch.float64).index_add_(
        0, rows.flatten(), (corner_w.flatten(1)[..., None] * grad_out[:, None]).view(-1, D))
    expected = _unpad_levels(torch.empty_like(value), table, hw)
    keys, cw = rows[:, 0, 0].contiguous(), corner_w.flatten(1, 2).transpose(0, 1).contiguous()  # (N, LP), (4, N, LP)
    torch.testing.assert_close(_splat_corners(grad_out, keys, cw, hw, value.shape, R), expected, rtol=0, atol=1e-13)


def test_batched_equals_one_by_one():
    value, shapes, starts, locs, weights = make_inputs(B=3, Q=7)
    batched = ms_deform_attn_gather(value, shapes, starts, locs, weights)
    for b in range(3):
        one = ms_deform_attn_gather(value[b:b + 1], shapes, starts, locs[b:b + 1], weights[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], one, rtol=0, atol=1e-14)


def test_gather_bfloat16_close_to_float32():
    inputs = make_inputs(B=2, Q=10, M=2, D=16, P=4, dtype=torch.float32)
    half = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    out = ms_deform_attn_gather(*half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ms_deform_attn_gather(*inputs), rtol=0.05, atol=0.05)


def test_empty_queries():
    value, shapes, starts, locs, weights = make_inputs(Q=0)
    for backend in ("cpu", "reference"):
        assert ms_deform_attn(value, shapes, starts, locs, weights, backend=backend).shape == (2, 0, 6)


# ---------------------------------------------------------------- dispatch and checks
def test_dispatch():
    inputs = make_inputs()
    auto = ms_deform_attn(*inputs)
    torch.testing.assert_close(auto, ms_deform_attn(*inputs, backend="cpu"), rtol=0, atol=0)
    torch.testing.assert_close(auto, ms_deform_attn(*inputs, backend="reference"), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="backend"): ms_deform_attn(*inputs, backend="triton")
    if not cuda_available():
        with pytest.raises(ValueError, match="CUDA tensors"): ms_deform_attn(*inputs, backend="cuda")


@pytest.mark.parametrize("which,bad,match", [
    (0, torch.zeros(2, 31, 2), "value must be"),
    (1, torch.tensor([4, 6]), "spatial_shapes must be"),
    (2, torch.tensor([0, 24]), "level_start_index must be"),
    (3, torch.zeros(2, 5, 2, 3, 2), "sampling_locations must be"),
    (4, torch.zeros(2, 5, 2, 3, 3, dtype=torch.float64), "attention_weights must be"),
    (1, torch.tensor([[4.0, 6.0], [3.0, 2.0], [1.0, 1.0]]), "spatial_shapes must be int64"),
    (4, torch.zeros(2, 5, 2, 3, 2, dtype=torch.float32), "attention_weights must share"),
    (1, torch.tensor([[4, 6], [3, 2], [2, 1]]), "S=31"),
])
def test_bad_inputs_are_named(which, bad, match):
    inputs = list(make_inputs())
    inputs[which] = bad
    with pytest.raises((ValueError, TypeError), match=match): ms_deform_attn(*inputs)


# ---------------------------------------------------------------- the module
def test_module_official_init():
    M, L, P = 8, 4, 4
    attn = MSDeformAttn(256, M, L, P)
    bias = attn.sampling_offsets.bias.view(M, L, P, 2)
    for h in range(M):
        d = np.array([math.cos(2 * math.pi * h / M), math.sin(2 * math.pi * h / M)])
        d /= np.abs(d).max()
        for k in range(P):
            expected = torch.tensor(d * (k + 1), dtype=torch.float32).expand(L, 2)
            torch.testing.assert_close(bias[h, :, k], expected, rtol=1e-6, atol=1e-6)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    for proj in (attn.value_proj, attn.output_proj):
        assert proj.bias.abs().sum() == 0
        bound = math.sqrt(6 / (256 + 256))
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3


def test_module_checks_embed_dims():
    with pytest.raises(ValueError, match="divisible"): MSDeformAttn(embed_dims=100, num_heads=8)


def small_setup(C=16, M=4, L=2, P=3, B=2, Q=5, dropout=0.0):
    hw = ((5, 7), (3, 4))[:L]
    shapes = torch.tensor(hw)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    attn = MSDeformAttn(C, M, L, P, dropout=dropout)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    return attn, torch.randn(B, Q, C), torch.randn(B, S, C), shapes, starts


def test_module_sampling_locations_2d_and_4d():
    attn, query, memory, shapes, starts = small_setup()
    B, Q, _ = query.shape
    offsets = attn.sampling_offsets(query).view(B, Q, 4, 2, 3, 2)
    ref2 = torch.rand(B, Q, 2, 2)
    loc2 = attn._sampling_locations(query, ref2, shapes)
    for l, (h, w) in enumerate(shapes.tolist()):
        expected = ref2[:, :, None, l, None, :] + offsets[:, :, :, l] / torch.tensor([w, h])
        torch.testing.assert_close(loc2[:, :, :, l], expected)
    ref4 = torch.rand(B, Q, 2, 4)
    loc4 = attn._sampling_locations(query, ref4, shapes)
    expected = ref4[:, :, None, :, None, :2] + offsets / 3 * ref4[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(loc4, expected)


def test_module_weights_are_softmax_over_levels_and_points():
    attn, query, *_ = small_setup()
    w = attn._attention_weights(query)
    assert w.shape == (2, 5, 4, 2, 3)
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(2, 5, 4))


def test_module_matches_manual_composition():
    attn, query, memory, shapes, starts = small_setup()
    pos = torch.randn_like(query)
    ref = torch.rand(2, 5, 2, 2)
    out = attn(query, ref, memory, shapes, starts, query_pos=pos)
    q = query + pos
    v = attn.value_proj(memory).view(2, -1, 4, 4)
    core = ms_deform_attn_reference(v, shapes, starts, attn._sampling_locations(q, ref, shapes), attn._attention_weights(q))
    torch.testing.assert_close(out, attn.output_proj(core) + query, rtol=1e-5, atol=1e-6)


def test_module_padding_is_ignored_and_backends_agree():
    attn, query, memory, shapes, starts = small_setup()
    pad = torch.zeros(2, memory.shape[1], dtype=torch.bool)
    pad[0, -4:] = True
    changed = memory.clone()
    changed[0, -4:] = 1e3
    ref = torch.rand(2, 5, 2, 4)
    out = attn(query, ref, memory, shapes, starts, pad_mask=pad)
    torch.testing.assert_close(attn(query, ref, changed, shapes, starts, pad_mask=pad), out)
    attn.backend = "reference"
    torch.testing.assert_close(attn(query, ref, memory, shapes, starts, pad_mask=pad), out, rtol=1e-5, atol=1e-6)



def test_module_gradients_match_the_reference_backend():
    "The module's in-place steps (offset scaling, residual) leave autograd's gradients those of the reference path."
    grads = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        attn, query, memory, shapes, starts = small_setup()
        attn.double().backend = backend
        query, memory = query.double().requires_grad_(), memory.double().requires_grad_()
        pos = torch.randn_like(query)
        for ref in (torch.rand(2, 5, 2, 2, dtype=torch.float64), torch.rand(2, 5, 2, 4, dtype=torch.float64)):
            out = attn(query, ref, memory, shapes, starts, query_pos=pos)
            leaves = [query, memory, *attn.parameters()]
            grads.setdefault(backend, []).append((out.detach(), *torch.autograd.grad(out.square().sum(), leaves)))
    for ours, ref in zip(grads["cpu"], grads["reference"]):
        for a, b in zip(ours, ref): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("queries", ["encoder", 2])
def test_module_five_levels_with_padding_gradients_match_reference(queries):
    "Co-DINO's five levels with one image padded right and below: the reference path's values and gradients, for an"
    " encoder (Q = S, sorted gathers) and a two-query decoder (one scatter)."
    torch.manual_seed(0)
    hw = ((16, 12), (8, 6), (4, 3), (2, 2), (1, 1))
    shapes = torch.tensor(hw)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    pad = torch.zeros(2, int(shapes.prod(1).sum()), dtype=torch.bool)  # (B, S) True = padding
    for (h, w), start in zip(hw, starts.tolist()):
        level = torch.ones(h, w, dtype=torch.bool)
        level[:max(1, h * 3 // 4), :max(1, w // 2)] = False  # image 1 fills the top-left of the padded canvas
        pad[1, start:start + h * w] = level.flatten()
    attn = MSDeformAttn(32, 4, 5, 4, dropout=0.0).double()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    memory = torch.randn(2, pad.shape[1], 32, dtype=torch.float64, requires_grad=True)
    query = memory if queries == "encoder" else torch.randn(2, queries, 32, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(2, query.shape[1], 5, 2, dtype=torch.float64) * torch.tensor([[1.0, 1.0], [0.5, 0.75]]).view(2, 1, 1, 2)
    results = []
    for backend in ("cpu", "reference"):
        attn.backend = backend
        out = attn(query, ref, memory, shapes, starts, pad_mask=pad)
        leaves = [memory] + ([] if queries == "encoder" else [query]) + list(attn.parameters())
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), leaves)))
    for a, b in zip(*results): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_module_all_false_pad_mask_equals_no_mask():
    torch.manual_seed(0)
    attn, query, memory, shapes, starts = small_setup()
    ref = torch.rand(2, 5, 2, 2)
    no_pad = torch.zeros(2, memory.shape[1], dtype=torch.bool)
    torch.testing.assert_close(attn(query, ref, memory, shapes, starts, pad_mask=no_pad), attn(query, ref, memory, shapes, starts),
                               rtol=0, atol=0)


def test_module_identity_dropout_and_gradients():
    attn, query, memory, shapes, starts = small_setup(dropout=0.5)
    ref = torch.rand(2, 5, 2, 2)
    identity = torch.randn_like(query)
    with torch.no_grad(): attn.output_proj.weight.zero_()
    attn.eval()
    torch.testing.assert_close(attn(query, ref, memory, shapes, starts, identity=identity), identity)
    attn.train()
    with torch.no_grad(): attn.output_proj.weight.normal_()
    a, b = (attn(query, ref, memory, shapes, starts) for _ in range(2))
    assert not torch.allclose(a, b)  # dropout is active in training
    a.sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_rejects_bad_reference_points():
    attn, query, memory, shapes, starts = small_setup()
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(2, 5, 2, 3), memory, shapes, starts)


# ---------------------------------------------------------------- the kernel loader (no compiler needed)
def test_kernel_sources_are_found_and_shipped(monkeypatch, tmp_path):
    from codetr.ops.cuda import kernel_dir, kernel_names
    folder = kernel_dir()
    assert (folder / "ms_deform_attn.cu").is_file() and (folder / "cpu_shim.h").is_file()
    assert kernel_names("ms_deform_attn") == ["ms_deform_attn_forward", "ms_deform_attn_backward_value",
                                              "ms_deform_attn_backward_sampling"]
    setup = (folder.parent / "setup.py").read_text()
    assert '"codetr.kernels": ["*.cu", "*.h"]' in setup and 'copytree("kernels"' in setup  # the wheel carries them
    (tmp_path / "cpu_shim.h").write_text("")
    monkeypatch.setenv("CODETR_KERNEL_DIR", str(tmp_path))
    assert kernel_dir() == tmp_path


def test_cuda_available_never_raises():
    from codetr.ops.cuda import cuda_available, cuda_unavailable_reason
    assert isinstance(cuda_available(), bool)
    assert (cuda_unavailable_reason() == "ok") == cuda_available()
