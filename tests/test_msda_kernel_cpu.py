"""The CUDA source kernels/ms_deform_attn.cu, compiled for the CPU through kernels/cpu_shim.h, against the reference;
plus a compile check of the same source for sm_80 and sm_90 (NVRTC or nvcc, no GPU needed)."""
import shutil

import numpy as np
import pytest
import torch

from codetr.ops.cuda import _nvcc, _nvrtc_usable, compile_check, load_kernels
from codetr.ops.msda import ms_deform_attn_gather, ms_deform_attn_kernel, ms_deform_attn_reference
from test_msda import make_inputs  # the same random inputs as the pure-PyTorch tests

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU build of the kernels needs g++")


def kernel_fn(dtype):
    kernels = load_kernels("ms_deform_attn", torch.device("cpu"), dtype)
    return lambda *a: ms_deform_attn_kernel(*a, kernels=kernels)


def value_and_grads(fn, value, shapes, starts, locs, weights, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locs, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, grad_out))


LEVELS = [((5, 7),), ((4, 6), (2, 3), (1, 1)), ((1, 1),), ((3, 1), (1, 4))]


@pytest.mark.parametrize("D", [1, 30, 32, 71])
@pytest.mark.parametrize("hw", LEVELS)
def test_forward_float64(D, hw):
    inputs = make_inputs(B=2, Q=5, M=2, D=D, P=3, hw=hw)
    ours, ref = kernel_fn(torch.float64)(*inputs), ms_deform_attn_reference(*inputs)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("B,Q,M,P", [(1, 1, 1, 1), (3, 7, 2, 2), (2, 16, 4, 4)])
def test_forward_float32(B, Q, M, P):
    inputs = make_inputs(B, Q, M, D=30, P=P, hw=LEVELS[1], dtype=torch.float32)
    ref = ms_deform_attn_reference(*[t.double() if t.is_floating_point() else t for t in inputs])
    torch.testing.assert_close(kernel_fn(torch.float32)(*inputs).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [1, 30, 32, 71])
@pytest.mark.parametrize("B,Q", [(1, 3), (3, 6)])
def test_backward_float64(D, B, Q):
    inputs = make_inputs(B, Q, M=3, D=D, P=2, hw=LEVELS[1], seed=D + B)
    grad_out = torch.randn(B, Q, 3 * D, dtype=torch.float64)
    ours = value_and_grads(kernel_fn(torch.float64), *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *inputs, grad_out)
    for name, a, b in zip(("out", "value", "locations", "weights"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_backward_float32():
    inputs = make_inputs(2, 9, M=2, D=32, P=4, hw=LEVELS[1], dtype=torch.float32)
    grad_out = torch.randn(2, 9, 64)
    ours = value_and_grads(kernel_fn(torch.float32), *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *[t.double() if t.is_floating_point() else t for t in inputs],
                          grad_out.double())
    for a, b in zip(ours, ref): torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_locations_far_outside_and_on_the_border():
    "Far-away points contribute nothing; points on the -1 / H border are dropped as in the official kernel."
    value, shapes, starts, locs, weights = make_inputs(1, 4, 1, 3, 2, hw=((4, 4),))
    locs[0, 0] = 5.0
    locs[0, 1] = -3.0
    locs[0, 2, 0, 0, :, 0] = -0.5 / 4  # pixel x = -1 exactly
    locs[0, 3, 0, 0, :, 1] = 4.5 / 4  # pixel y = H exactly
    grad_out = torch.randn(1, 4, 3, dtype=torch.float64)
    out, gv, gl, gw = value_and_grads(kernel_fn(torch.float64), value, shapes, starts, locs, weights, grad_out)
    assert out.abs().max() == 0 and gl.abs().max() == 0 and gw.abs().max() == 0 and gv.abs().max() == 0
    for a, b in zip((out, gv, gl, gw), value_and_grads(ms_deform_attn_gather, value, shapes, starts, locs, weights, grad_out)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grid_stride_loops_match_one_thread_per_element():
    "A grid far smaller than the work exercises the kernels' grid-stride loops."
    value, shapes, starts, locs, weights = make_inputs(2, 5, 2, 7, 2, hw=LEVELS[1])
    k = load_kernels("ms_deform_attn", torch.device("cpu"), torch.float64)
    sizes = [np.int32(v) for v in (2, value.shape[1], 2, 7, 5, 3, 2)]
    outs = []
    for grid, block in ((None, 256), (1, 3), (2, 32)):
        out = torch.empty(2, 5, 2, 7, dtype=torch.float64)
        k.launch("ms_deform_attn_forward", out.numel(), value, shapes, starts, locs, weights, out, *sizes,
                 block=block, grid=grid)
        outs.append(out)
    for out in outs[1:]: torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_non_contiguous_inputs_and_half_types():
    value, shapes, starts, locs, weights = make_inputs(2, 6, 2, 8, 2, hw=LEVELS[1], dtype=torch.float32)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    locs_t = locs.transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_t.is_contiguous() and not locs_t.is_contiguous()
    torch.testing.assert_close(kernel_fn(torch.float32)(value_t, shapes, starts, locs_t, weights),
                               ms_deform_attn_reference(value, shapes, starts, locs, weights), rtol=1e-5, atol=1e-5)
    kernels = load_kernels("ms_deform_attn", torch.device("cpu"), torch.float32)
    out = ms_deform_attn_kernel(*[t.bfloat16() if t.is_floating_point() else t for t in (value, shapes, starts, locs, weights)],
                                kernels=kernels)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ms_deform_attn_reference(value, shapes, starts, locs, weights), rtol=0.05, atol=0.05)


def test_kernel_arguments_are_checked():
    k = load_kernels("ms_deform_attn", torch.device("cpu"), torch.float64)
    with pytest.raises(TypeError, match="numpy scalar"):
        k.launch("ms_deform_attn_forward", 1, torch.zeros(1), 3)
    with pytest.raises(ValueError, match="contiguous"):
        k.launch("ms_deform_attn_forward", 1, torch.zeros(2, 2).t())
    with pytest.raises(TypeError, match="float32 and float64"):
        load_kernels("ms_deform_attn", torch.device("cpu"), torch.float16)
    with pytest.raises(TypeError, match="built for torch.float64"):
        ms_deform_attn_kernel(*make_inputs(1, 2, 1, 2, 1, ((2, 2),), dtype=torch.float32), kernels=k)
    with pytest.raises(ValueError, match="sampling_locations must be"):
        value, shapes, starts, locs, weights = make_inputs(1, 2, 1, 2, 1, ((2, 2),))
        ms_deform_attn_kernel(value, shapes, starts, locs[..., :1], weights, kernels=k)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiles_for_gpu_with_nvrtc(arch, dtype):
    if not _nvrtc_usable(): pytest.skip("NVRTC is not usable here (it comes with CuPy: pip install codetr[cuda])")
    assert compile_check("ms_deform_attn", arch, dtype, tool="nvrtc") > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles_for_gpu_with_nvcc(arch):
    if _nvcc() is None: pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, /usr/local/bin)")
    assert compile_check("ms_deform_attn", arch, torch.float64, tool="nvcc") > 0
