"""Benchmark of the RoI head's RoIAlign on the CPU: `roi_align_fast` (taps + embedding bags) against torchvision.

Both run `roi_extract` as the RoI head does (each RoI pooled from the level its size selects, 7x7, aligned, adaptive
sampling, 256 channels), forward and backward to the pyramid, taking turns (A B A B ...), and the script prints the
median time of each and their ratio, then the same for the forward alone (with the pyramid requiring a gradient;
without one, in inference, `roi_align_fast` is torchvision's).
Shapes, chosen with --shapes:
  profile  one 512x512 image (maps 64x64 to 8x8) and 512 RoIs of the sizes an untrained RPN proposes (16 to 130 px,
           nearly all on the stride-8 map): the shape of `tests/profile_step.py --preset co_deformable_detr_r50_1x_coco`
  coco     two 800x1216 images (maps 100x152 to 13x19) and 512 RoIs each, sizes log-uniform from 16 to 800 px
           (every level used): a COCO training batch
With --step PRESET it also times whole training steps of that preset (512x512, one image, as tests/profile_step.py
builds them: forward, summed losses, backward), `roi_align_fast` and torchvision's `roi_align` taking turns.
The machine may be shared: compare the ratio, not the times.

Usage: python tests/bench_roi_align.py [--repeats 11] [--threads 2] [--shapes profile coco] [--step PRESET]
"""
import argparse
import math
import statistics
import time

import torch
from torchvision.ops import roi_align

import codetr.heads.roi as roi_module
from codetr.heads.roi import roi_extract, roi_levels

STRIDES = (8, 16, 32, 64)
SHAPES = {"profile": dict(batch=1, hw=(512, 512), sides=(16, 130)),
          "coco": dict(batch=2, hw=(800, 1216), sides=(16, 800))}


def make_inputs(batch, hw, sides, rois_per_image=512, channels=256, seed=0):
    "The pyramid (per level (B, 256, H/s, W/s)) and (B*512, 5) RoIs with log-uniform sides, aspect ratios 1:3 to 3:1."
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, channels, math.ceil(hw[0] / s), math.ceil(hw[1] / s), generator=g) for s in STRIDES]
    n = batch * rois_per_image
    lo, hi = math.log(sides[0]), math.log(sides[1])
    side = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g))  # (n,)
    aspect = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(3))  # (n,) w / h
    wh = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], 1).minimum(torch.tensor([hw[1], hw[0]]))  # (n, 2)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([hw[1], hw[0]]) - wh)  # (n, 2) inside the image
    img = torch.arange(batch).repeat_interleave(rois_per_image)[:, None].float()  # (n, 1)
    return feats, torch.cat([img, xy, xy + wh], 1)


def step(feats, rois, grad=None):
    "Forward of `roi_extract` with the pyramid requiring a gradient, and the backward to it when `grad` is given."
    leaves = [f.detach().requires_grad_() for f in feats]
    out = roi_extract(leaves, rois, STRIDES)  # (R, C, 7, 7)
    if grad is not None: out.backward(grad)
    return out, [f.grad for f in leaves]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name, repeats):
    feats, rois = make_inputs(**SHAPES[name])
    levels = roi_levels(rois[:, 1:]).bincount(minlength=4).tolist()
    grad = torch.randn(len(rois), feats[0].shape[1], 7, 7, generator=torch.Generator().manual_seed(1))
    fast_path = roi_module.roi_align_fast
    paths = {"torchvision": lambda *a: roi_align(*a), "taps": fast_path}
    outs = {}
    for k, fn in paths.items():  # warm-up, and the two agree
        roi_module.roi_align_fast = fn
        outs[k] = step(feats, rois, grad)
    roi_module.roi_align_fast = fast_path
    err = max((a - b).abs().max().item() for a, b in zip([outs["taps"][0]] + outs["taps"][1],
                                                         [outs["torchvision"][0]] + outs["torchvision"][1]))
    times = {(k, what): [] for k in paths for what in ("fwd", "fwd+bwd")}
    try:
        for _ in range(repeats):
            for k, fn in paths.items():
                roi_module.roi_align_fast = fn
                times[k, "fwd"].append(timed(lambda: step(feats, rois)))
                times[k, "fwd+bwd"].append(timed(lambda: step(feats, rois, grad)))
    finally:
        roi_module.roi_align_fast = fast_path
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{name}: batch {SHAPES[name]['batch']}, {len(rois)} RoIs, per level {levels}, max |diff| {err:.2e}")
    for what in ("fwd+bwd", "fwd"):
        tv, taps = med["torchvision", what], med["taps", what]
        print(f"  {what:8s} torchvision {tv:8.1f} ms   taps {taps:8.1f} ms   ratio {tv / taps:.1f}x")


def bench_step(preset, repeats):
    "Median training-step times of `preset` with each RoIAlign, alternating."
    import profile_step  # tests/ is on the path when this file runs as a script
    model, images, targets = profile_step.build(preset, (512, 512), 1)
    fast_path = roi_module.roi_align_fast
    paths = {"torchvision": lambda *a: roi_align(*a), "taps": fast_path}
    times = {k: [] for k in paths}
    try:
        for i in range(repeats + 1):  # the first round warms up
            for k, fn in paths.items():
                roi_module.roi_align_fast = fn
                t = timed(lambda: profile_step.train_step(model, images, targets))
                if i: times[k].append(t)
    finally:
        roi_module.roi_align_fast = fast_path
    tv, taps = (statistics.median(times[k]) for k in paths)
    print(f"{preset} training step, 512x512, batch 1: torchvision {tv:.2f} s   taps {taps:.2f} s   ratio {tv / taps:.3f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--step", help="also time training steps of this preset, e.g. co_deformable_detr_r50_1x_coco")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} alternating rounds")
    for name in args.shapes: bench(name, args.repeats)
    if args.step: bench_step(args.step, args.repeats)


if __name__ == "__main__":
    main()
