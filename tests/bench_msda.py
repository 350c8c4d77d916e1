"""Benchmark of multi-scale deformable attention: our paths against the grid_sample reference, in one run.

CPU: the gather path (backend="cpu") vs the reference (and vs transformers' MultiScaleDeformableAttention when
that package is installed) at encoder-like shapes, B=2, Q=S, M=8, D=32, P=4, chosen with --shapes:
  encoder       levels 64x64, 32x32, 16x16, 8x8 (4 levels, Co-Deformable-DETR's strides 8 to 64 at 512x512)
  co_dino_512   levels 64x64, 32x32, 16x16, 8x8, 4x4 (Co-DINO's 5 levels, strides 8 to 128, at 512x512)
  co_dino_1024  levels 128x128, 64x64, 32x32, 16x16, 8x8 (the same at 1024x1024: about 4x the work)
Prints forward and forward+backward times (the median of --repeats rounds in which the backends take turns), their
ratios, and the peak memory each needs (tensor memory allocated during one forward+backward, from the profiler).

GPU (when the CUDA path is usable): the CuPy kernels vs the reference at the Co-Deformable-DETR encoder shape
(B=2, levels 100x152, 50x76, 25x38, 13x19), with CUDA-event timings, peak allocated memory, and the time against a
bandwidth bound: the bytes the op must read and write, at the bandwidth of a large device-to-device copy.

Usage: python tests/bench_msda.py [--repeats 5] [--threads N] [--shapes encoder co_dino_512] [--skip-cpu] [--skip-gpu]
"""
import argparse
import functools
import importlib.util
import statistics
import time

import torch

from codetr.ops.cuda import cuda_available, cuda_unavailable_reason
from codetr.ops.msda import ms_deform_attn

CPU_LEVELS = ((64, 64), (32, 32), (16, 16), (8, 8))
CPU_SHAPES = {"encoder": CPU_LEVELS, "co_dino_512": CPU_LEVELS + ((4, 4),),
              "co_dino_1024": ((128, 128), (64, 64), (32, 32), (16, 16), (8, 8))}
GPU_LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))


def make_inputs(levels, B=2, M=8, D=32, P=4, dtype=torch.float32, device="cpu", seed=0):
    "Encoder-like inputs with Q = S; locations uniform in [0, 1], weights softmax-normalised."
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    L = len(levels)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    locs = torch.rand(B, S, M, L, P, 2, generator=g, dtype=dtype)
    weights = torch.randn(B, S, M, L * P, generator=g, dtype=dtype).softmax(-1).view(B, S, M, L, P)
    return [t.to(device) for t in (value, shapes, starts, locs, weights)]


@functools.lru_cache(maxsize=None)
def transformers_fn():
    "transformers' MultiScaleDeformableAttention as a function of our arguments, or None when not installed."
    if importlib.util.find_spec("transformers") is None: return None
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
    except ImportError:
        return None
    layer = MultiScaleDeformableAttention()
    def fn(value, shapes, starts, locs, weights):
        return layer(value, shapes, [tuple(s) for s in shapes.tolist()], starts, locs, weights, 64)
    try:  # the signature has changed between releases
        fn(*make_inputs(((2, 2),), B=1, M=1, D=1, P=1))
    except Exception as e:
        print(f"  transformers' MultiScaleDeformableAttention has an unexpected signature ({e}): skipped")
        return None
    return fn


def run_once(backend, inputs, backward):
    value, shapes, starts, locs, weights = inputs
    if backend == "transformers":
        fn = transformers_fn()
    else:
        fn = lambda *a: ms_deform_attn(*a, backend=backend)
    if not backward:
        with torch.no_grad(): return fn(value, shapes, starts, locs, weights)
    leaves = [t.detach().requires_grad_() for t in (value, locs, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))
    return out


def time_cpu(backends, inputs, backward, repeats):
    "Median time per backend; the backends take turns in every round, so a busy machine slows them alike."
    times = {b: [] for b in backends}
    for b in backends: run_once(b, inputs, backward)  # warm-up
    for _ in range(repeats):
        for b in backends:
            t0 = time.perf_counter()
            run_once(b, inputs, backward)
            times[b].append(time.perf_counter() - t0)
    return {b: statistics.median(t) for b, t in times.items()}


def peak_cpu_memory(backend, inputs):
    "Peak MiB of tensor memory allocated during one forward+backward, from the profiler's allocation events."
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(backend, inputs, backward=True)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak / 2**20


def bench_cpu(name, repeats):
    levels = CPU_SHAPES[name]
    inputs = make_inputs(levels)
    S = inputs[0].shape[1]
    print(f"CPU {name} ({torch.get_num_threads()} threads), float32, B=2, levels {levels}, Q=S={S}, M=8, D=32, P=4; "
          f"median of {repeats}")
    backends = ["reference", "cpu"] + (["transformers"] if transformers_fn() is not None else [])
    if "transformers" not in backends: print("  transformers is not installed: skipping that comparison")
    fwd, fwd_bwd = time_cpu(backends, inputs, False, repeats), time_cpu(backends, inputs, True, repeats)
    rows = {b: (fwd[b], fwd_bwd[b], peak_cpu_memory(b, inputs)) for b in backends}
    ref = rows["reference"]
    print(f"  {'backend':<13}{'fwd s':>9}{'fwd+bwd s':>11}{'peak MiB':>10}{'fwd x':>8}{'fwd+bwd x':>11}{'mem x':>8}")
    for b, (f, fb, mem) in rows.items():
        print(f"  {b:<13}{f:9.3f}{fb:11.3f}{mem:10.0f}{ref[0] / f:8.2f}{ref[1] / fb:11.2f}{ref[2] / mem:8.2f}")
    print("  (x = reference / backend: speed-up, or memory saved)")


def cuda_time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def copy_bandwidth(n_bytes=1 << 30):
    x = torch.empty(n_bytes // 4, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), 10)
    return 2 * n_bytes / t  # read + write


def bench_gpu(repeats):
    inputs = make_inputs(GPU_LEVELS, device="cuda")
    value, _, _, locs, weights = inputs
    B, S, M, D = value.shape
    e = value.element_size()
    fwd_bytes = (value.numel() + locs.numel() + weights.numel() + B * S * M * D) * e
    bwd_bytes = (B * S * M * D + value.numel() + locs.numel() + weights.numel()  # read grad_out and the inputs
                 + 2 * value.numel() + locs.numel() + weights.numel()) * e  # zero + write grad_value, write the rest
    bw = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}, float32, B=2, levels {GPU_LEVELS}, Q=S={S}; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s; best of {repeats}")
    rows = {}
    for b in ("reference", "cpu", "cuda"):
        f = cuda_time(lambda: run_once(b, inputs, False), repeats)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fb = cuda_time(lambda: run_once(b, inputs, True), repeats)
        rows[b] = (f, fb, (torch.cuda.max_memory_allocated() - base) / 2**20)
    ref = rows["reference"]
    print(f"  {'backend':<11}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MiB':>10}{'fwd x':>8}{'fwd+bwd x':>11}")
    for b, (f, fb, mem) in rows.items():
        print(f"  {b:<11}{f * 1e3:9.2f}{fb * 1e3:12.2f}{mem:10.0f}{ref[0] / f:8.2f}{ref[1] / fb:11.2f}")
    f, fb, _ = rows["cuda"]
    fwd_bound, all_bound = fwd_bytes / bw, (fwd_bytes + bwd_bytes) / bw
    print(f"  bandwidth bound: fwd {fwd_bound * 1e3:.3f} ms ({fwd_bytes / 2**20:.0f} MiB), fwd+bwd {all_bound * 1e3:.3f} ms "
          f"({(fwd_bytes + bwd_bytes) / 2**20:.0f} MiB); cuda kernels at {f / fwd_bound:.1f}x and {fb / all_bound:.1f}x the bound")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="+", choices=sorted(CPU_SHAPES), default=["encoder", "co_dino_512"])
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        for name in args.shapes: bench_cpu(name, args.repeats)
    if args.skip_gpu: return
    if cuda_available(): bench_gpu(args.repeats)
    else: print(f"GPU part skipped: {cuda_unavailable_reason()}")


if __name__ == "__main__":
    main()
