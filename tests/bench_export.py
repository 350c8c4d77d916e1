"""Deployment check and speed table: Co-Deformable-DETR R50 exported to ONNX, against PyTorch, in one run.

    python tests/bench_export.py [--threads 2] [--repeats 3] [--size 800 1333] [--batch 4] [--skip-speed]

1. Builds Co-Deformable-DETR R50 with the official weights rebuilt from the parity reference (`../shared/parity`,
   `fill.py`; a freshly initialised model when the reference is absent) and exports it to ONNX (traced at 448x576,
   a size none of the checks below uses).
2. Equality: onnxruntime's detections against PyTorch's on the official parity input and on real photos
   (`../shared/data/raccoon`, two of them, at their own sizes), matched by label and IoU; prints the worst score and
   box differences (the goal: 1e-4 in score, 1e-2 px).
3. Speed at `--size` (default 800x1333), batch 1: PyTorch eager with the `grid_sample` reference attention (what the
   exported graph computes), PyTorch with the gather CPU path (codetr's default on a CPU), onnxruntime; then images/s
   at `--batch`. Each number is the median of `--repeats` runs after a warm-up, all in this process with the same
   thread count. With a GPU, the same for CUDA with the CuPy kernel.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("CODETR_SHARED", HERE.parents[1] / "shared"))


def official_r50():
    "Co-Deformable-DETR R50 with the parity reference's weights (or fresh), and the fixed input when available."
    from codetr.engine.checkpoint import load_official
    from codetr.models.co_deformable_detr import co_deformable_detr_r50_1x_coco
    from codetr.models.detector import build_model
    cfg = co_deformable_detr_r50_1x_coco().without_pretrained()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ref = SHARED / "parity" / "co_deformable_detr_r50"
    if not ref.exists():
        print(f"{ref} not found: a freshly initialised model (equality still holds, the scores are less spread)")
        return model, cfg, None
    sys.path.insert(0, str(HERE))
    from test_parity import load_reference
    r = load_reference("co_deformable_detr_r50")
    load_official(model, r["state_dict"], cfg, strict=True)
    return model, cfg, r["image"]


def worst(got: dict, want: dict) -> tuple[float, float]:
    "Worst score and box differences of matched detections (label equal, IoU > 0.99, optimal on score)."
    from scipy.optimize import linear_sum_assignment
    from codetr.ops.box_ops import box_iou
    iou = box_iou(want["boxes"].double(), got["boxes"].double())
    gap = (want["scores"][:, None].double() - got["scores"][None].double()).abs()
    cost = torch.where((iou > 0.99) & (want["labels"][:, None] == got["labels"][None]), gap, torch.full_like(gap, 1e6))
    rows, cols = linear_sum_assignment(cost.numpy())
    if (cost[rows, cols] >= 1e6).any(): return float("inf"), float("inf")
    return float(gap[rows, cols].max()), float((got["boxes"][cols] - want["boxes"][rows]).abs().max())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from codetr.engine.export import ExportedModel, ExportedPredictor, InferenceModel, export_model
    from codetr.engine.predict import Predictor, identity_class_mapping
    from codetr.data.coco import load_image
    from codetr.ops.msda import MSDeformAttn
    model, cfg, image = official_r50()
    pred = Predictor(model, cfg, identity_class_mapping(cfg.num_classes))
    out = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    path = export_model(pred, out, "onnx", example_hw=(448, 576))  # neither the parity input nor a photo size
    print(f"exported to {path} in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    onnx_model, onnx_pred = ExportedModel(path, threads=args.threads), ExportedPredictor(path, threads=args.threads)

    print("\nequality (onnxruntime against PyTorch; goal: score 1e-4, boxes 1e-2 px)")
    graph = InferenceModel(model, 100)
    if image is not None:
        sizes = torch.tensor([list(image.shape[-2:])])
        with torch.no_grad(): want = graph(image, sizes)
        got = onnx_model(image, sizes)
        as_det = lambda t: {"boxes": t[0][0], "scores": t[1][0], "labels": t[2][0]}
        s, b = worst(as_det(got), as_det(want))
        print(f"  parity input 512x512: score {s:.2g}, box {b:.2g} px")
    photos = sorted((SHARED / "data" / "raccoon" / "images").glob("*"))[:2]
    for p in photos:
        im = load_image(p)
        s, b = worst(onnx_pred([im])[0], pred([im])[0])
        print(f"  {p.name} ({im.width}x{im.height}, resized to {tuple(pred.prepare(im)[0].shape[-2:])}): score {s:.2g}, box {b:.2g} px")
    if args.skip_speed: return

    h, w = args.size
    x1, s1 = torch.randn(1, 3, h, w), torch.tensor([[h, w]])
    xb, sb = torch.randn(args.batch, 3, h, w), torch.tensor([[h, w]] * args.batch)
    attn = [m for m in graph.model.modules() if isinstance(m, MSDeformAttn)]
    def eager(backend, x, s):
        for m in attn: m.backend = backend
        with torch.no_grad(): graph(x, s)
    rows = [("PyTorch eager, grid_sample attention", lambda x, s: eager("reference", x, s)),
            ("PyTorch eager, gather CPU attention", lambda x, s: eager("cpu", x, s)),
            ("onnxruntime (CPU)", lambda x, s: onnx_model(x, s))]
    if torch.cuda.is_available():
        gpu = graph.cuda()
        def cuda_run(x, s):
            for m in attn: m.backend = "cuda"
            with torch.no_grad(): gpu(x.cuda(), s.cuda())
            torch.cuda.synchronize()
        rows.append(("PyTorch CUDA, CuPy kernel", cuda_run))
    print(f"\nspeed at {h}x{w}, {args.threads} threads, median of {args.repeats}")
    print(f"{'':40s} {'batch 1 (s)':>12s} {f'batch {args.batch} (img/s)':>16s}")
    results = {}
    for name, fn in rows:
        one = timed(lambda: fn(x1, s1), args.repeats)
        many = timed(lambda: fn(xb, sb), max(1, args.repeats - 1))
        results[name] = one
        print(f"{name:40s} {one:12.2f} {args.batch / many:16.2f}", flush=True)
    base = results["PyTorch eager, grid_sample attention"]
    print(f"\nonnxruntime against PyTorch eager (grid_sample): {base / results['onnxruntime (CPU)']:.2f}x faster (goal 1.5x); "
          f"against the gather path: {results['PyTorch eager, gather CPU attention'] / results['onnxruntime (CPU)']:.2f}x")


if __name__ == "__main__":
    main()
