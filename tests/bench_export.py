"""Deployment check and speed table: Co-Deformable-DETR R50 exported to ONNX, against PyTorch, in one run.

    python tests/bench_export.py [--threads 2] [--repeats 3] [--size 800 1333] [--batch 4] [--skip-speed] [--compare]

1. Builds Co-Deformable-DETR R50 with the official weights rebuilt from the parity reference (`../shared/parity`,
   `fill.py`; a freshly initialised model when the reference is absent) and exports it to ONNX (traced at 448x576,
   a size none of the checks below uses).
2. Equality: onnxruntime's detections against PyTorch's on the official parity input and on real photos
   (`../shared/data/raccoon`, two of them, at their own sizes), matched by label and IoU; prints the worst score and
   box differences (the goal: 1e-4 in score, 1e-2 px).
3. Speed at `--size` (default 800x1333), batch 1: PyTorch eager with the `grid_sample` reference attention,
   PyTorch with the gather CPU path (codetr's default on a CPU), onnxruntime; then images/s at `--batch`. The rows
   take turns (a warm-up round, then `--repeats` rounds; `--repeats - 1` at `--batch`), all in this process with
   the same thread count, and each number is the median (at batch 1 the minimum beside it: on a shared machine the
   least disturbed run). With a GPU, the same for CUDA with the CuPy kernel.
   `--compare` exports one more graph whose attention core is a zero and times it at batch 1 in the same rounds,
   with PyTorch running the model with the same zero core ("no attention (bound)"): the time both spend outside
   the attention, so the speed-up over the gather path that even a free attention could give onnxruntime.
"""
import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
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
    from parity_utils import load_reference
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


def no_attention(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    "A core that costs nearly nothing but still reads its inputs (so no projection is pruned): the bound rows."
    B, S, M, D = value.shape
    zero = (value.sum() + sampling_locations.sum() + attention_weights.sum()) * 0  # ()
    return zero.expand(B, sampling_locations.shape[1], M * D)  # (B, Q, M*D)


@contextmanager
def attention_core(core=None):
    "Inside, `core` stands in for `ms_deform_attn_reference` (the attention the exported graph computes); None: itself."
    import codetr.ops.msda as msda
    shipped = msda.ms_deform_attn_reference
    msda.ms_deform_attn_reference = core or shipped
    try: yield
    finally: msda.ms_deform_attn_reference = shipped


def export_variant(pred, out: Path, core=None) -> Path:
    "Export with `core` in place of `ms_deform_attn_reference` (None: the shipped graph); prints the time and size."
    from codetr.engine.export import export_model
    t0 = time.perf_counter()  # traced at 448x576: neither the parity input's size nor a photo's
    with attention_core(core): path = export_model(pred, out, "onnx", example_hw=(448, 576))
    print(f"exported {out.name} in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    return path


def interleaved(rows: dict, args: tuple, rounds: int) -> dict:
    "Seconds per call of every row: one warm-up round, then `rounds` rounds in which the rows take turns."
    times = {name: [] for name in rows}
    for r in range(rounds + 1):
        for name, fn in rows.items():
            t0 = time.perf_counter(); fn(*args); dt = time.perf_counter() - t0
            if r: times[name].append(dt)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--compare", action="store_true",
                    help="also time a graph and a model without attention (the time outside it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from codetr.engine.export import ExportedModel, ExportedPredictor, InferenceModel
    from codetr.engine.predict import Predictor, identity_class_mapping
    from codetr.data.coco import load_image
    from codetr.ops.msda import MSDeformAttn
    model, cfg, image = official_r50()
    pred = Predictor(model, cfg, identity_class_mapping(cfg.num_classes))
    out = Path(tempfile.mkdtemp())
    path = export_variant(pred, out / "export")
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

    extra = {}
    if args.compare:
        extra["onnxruntime, no attention (bound)"] = ExportedModel(
            export_variant(pred, out / "none", no_attention), threads=args.threads)
    h, w = args.size
    x1, s1 = torch.randn(1, 3, h, w), torch.tensor([[h, w]])
    xb, sb = torch.randn(args.batch, 3, h, w), torch.tensor([[h, w]] * args.batch)
    attn = [m for m in graph.model.modules() if isinstance(m, MSDeformAttn)]
    def eager(backend, core=None):
        def run(x, s):
            for m in attn: m.backend = backend
            with attention_core(core), torch.no_grad(): graph(x, s)
        return run
    rows = {"PyTorch eager, grid_sample attention": eager("reference"),
            "PyTorch eager, gather CPU attention": eager("cpu"),
            "onnxruntime (CPU)": lambda x, s: onnx_model(x, s)}
    if args.compare: rows["PyTorch eager, no attention (bound)"] = eager("reference", no_attention)
    rows.update({name: (lambda m: lambda x, s: m(x, s))(m) for name, m in extra.items()})
    if torch.cuda.is_available():
        gpu = copy.deepcopy(graph).cuda()
        gpu_attn = [m for m in gpu.modules() if isinstance(m, MSDeformAttn)]
        def cuda_run(x, s):
            for m in gpu_attn: m.backend = "cuda"
            with torch.no_grad(): gpu(x.cuda(), s.cuda())
            torch.cuda.synchronize()
        rows["PyTorch CUDA, CuPy kernel"] = cuda_run
    print(f"\nspeed at {h}x{w}, {args.threads} threads; rows take turns, the median (and min) of {args.repeats} rounds "
          f"after a warm-up round", flush=True)
    one = interleaved(rows, (x1, s1), args.repeats)
    med = {n: statistics.median(t) for n, t in one.items()}
    print(f"{'batch 1':48s} {'median (s)':>11s} {'min (s)':>8s}")
    for n in rows: print(f"{n:48s} {med[n]:11.2f} {min(one[n]):8.2f}", flush=True)
    for n in [n for n in rows if n.endswith("(bound)")]: del rows[n]  # their memory, before the batch
    extra.clear(); gc.collect()
    many = interleaved(rows, (xb, sb), max(1, args.repeats - 1))
    print(f"{f'batch {args.batch}':48s} {'img/s':>11s}")
    for n in rows: print(f"{n:48s} {args.batch / statistics.median(many[n]):11.2f}", flush=True)
    ort_s = med["onnxruntime (CPU)"]
    print(f"\nonnxruntime against PyTorch eager, grid_sample attention: {med['PyTorch eager, grid_sample attention'] / ort_s:.2f}x "
          f"faster (goal 1.5x); against codetr's gather path (its CPU default): {med['PyTorch eager, gather CPU attention'] / ort_s:.2f}x")
    if args.compare:
        gather_s, bound_ort, bound_eager = (med[k] for k in ("PyTorch eager, gather CPU attention",
                                                             "onnxruntime, no attention (bound)", "PyTorch eager, no attention (bound)"))
        print(f"attention: onnxruntime {ort_s - bound_ort:.2f} s, PyTorch gather path {gather_s - bound_eager:.2f} s; "
              f"everything else: onnxruntime {bound_ort:.2f} s, PyTorch {bound_eager:.2f} s ({bound_eager / bound_ort:.2f}x); "
              f"with free attention onnxruntime would be {gather_s / bound_ort:.2f}x faster than the gather path")


if __name__ == "__main__":
    main()
