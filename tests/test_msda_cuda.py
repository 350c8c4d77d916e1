"""The CuPy kernels on a GPU against the reference: float32/float64 parity, gradcheck in float64, bf16 against fp32,
stream semantics. Skipped where the CUDA path is not usable."""
import pytest
import torch

from codetr.ops.cuda import cuda_available, cuda_unavailable_reason, load_kernels
from codetr.ops.msda import MSDeformAttn, ms_deform_attn, ms_deform_attn_kernel, ms_deform_attn_reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason=f"CUDA path not usable: {cuda_unavailable_reason()}")]


def make_inputs(B=2, Q=37, M=8, D=32, P=4, hw=((20, 30), (10, 15), (5, 8), (1, 1)), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    value = torch.randn(B, int(shapes.prod(1).sum()), M, D, generator=g, dtype=dtype)
    locs = torch.rand(B, Q, M, len(hw), P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, len(hw), P, generator=g, dtype=dtype)
    return [t.cuda() for t in (value, shapes, starts, locs, weights)]


def value_and_grads(fn, value, shapes, starts, locs, weights, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (value, locs, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("D", [1, 30, 32, 71])
def test_float64_parity(D):
    inputs = make_inputs(D=D, M=3)
    grad_out = torch.randn(2, 37, 3 * D, dtype=torch.float64, device="cuda")
    ours = value_and_grads(ms_deform_attn_kernel, *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *inputs, grad_out)
    assert (ours[0] - ref[0]).abs().max().item() <= 1e-12
    for a, b in zip(ours, ref): torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_float32_parity():
    inputs = make_inputs(dtype=torch.float32)
    grad_out = torch.randn(2, 37, 256, device="cuda")
    ours = value_and_grads(ms_deform_attn_kernel, *inputs, grad_out)
    ref = value_and_grads(ms_deform_attn_reference, *[t.double() if t.is_floating_point() else t for t in inputs],
                          grad_out.double())
    for a, b in zip(ours, ref): torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    value, shapes, starts, locs, weights = make_inputs(B=1, Q=3, M=2, D=3, P=2, hw=((4, 5), (2, 3)))
    leaves = [t.requires_grad_() for t in (value, locs, weights)]
    fn = lambda v, l, w: ms_deform_attn_kernel(v, shapes, starts, l, w)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_types_close_to_float32(half):
    inputs = make_inputs(dtype=torch.float32)
    out = ms_deform_attn(*[t.to(half) if t.is_floating_point() else t for t in inputs])
    assert out.dtype == half
    torch.testing.assert_close(out.float(), ms_deform_attn_kernel(*inputs), rtol=0.05, atol=0.05)


def test_auto_backend_uses_the_kernel_and_agrees_with_gather():
    inputs = make_inputs(dtype=torch.float64)
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn(*inputs, backend="cpu"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ms_deform_attn(*inputs, backend="cuda"), ms_deform_attn_kernel(*inputs), rtol=0, atol=0)


def test_runs_on_a_side_stream():
    inputs = make_inputs(dtype=torch.float32)
    expected = ms_deform_attn_kernel(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ms_deform_attn_kernel(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_compiles_once_per_device_and_dtype():
    a = load_kernels("ms_deform_attn", torch.device("cuda", 0), torch.float32)
    assert load_kernels("ms_deform_attn", torch.device("cuda", 0), torch.float32) is a
    assert load_kernels("ms_deform_attn", torch.device("cuda", 0), torch.float64) is not a


def test_wrong_device_is_rejected():
    value, shapes, starts, locs, weights = make_inputs()
    with pytest.raises(ValueError, match="sampling_locations is on"):
        ms_deform_attn(value, shapes, starts, locs.cpu(), weights)


def test_module_on_gpu_matches_reference_backend():
    attn = MSDeformAttn(64, 4, 2, 2, dropout=0.0).cuda().double()
    hw = torch.tensor([[6, 8], [3, 4]], device="cuda")
    starts = torch.tensor([0, 48], device="cuda")
    query, memory = torch.randn(2, 9, 64, device="cuda").double(), torch.randn(2, 60, 64, device="cuda").double()
    ref = torch.rand(2, 9, 2, 4, device="cuda").double()
    out = attn(query, ref, memory, hw, starts)
    attn.backend = "reference"
    torch.testing.assert_close(out, attn(query, ref, memory, hw, starts), rtol=1e-10, atol=1e-10)
