"""Cost of the collaborative branches: forward+backward time and peak memory of Co-Deformable-DETR vs the
Deformable-DETR baseline (the same model without auxiliary heads and positive queries).

    python tests/bench_model.py [--size 800 1216] [--repeats 2] [--device cpu|cuda] [--preset r50|tiny]

Each variant runs in its own process so its peak memory (CPU: max RSS; GPU: max allocated) is its own. Prints one
line per variant and the Co-DETR / baseline ratios. The goal for the R50 preset is a ratio of at most 1.5.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

WORKER = "--worker"


def run_variant(name: str, size, repeats: int, device: str, preset: str) -> dict:
    import torch
    from codetr.models.co_deformable_detr import co_deformable_detr_r50_1x_coco, co_deformable_detr_tiny, deformable_detr_r50_1x_coco, deformable_detr_tiny
    from codetr.models.detector import build_model, total_loss
    makers = {("r50", "co"): co_deformable_detr_r50_1x_coco, ("r50", "base"): deformable_detr_r50_1x_coco,
              ("tiny", "co"): co_deformable_detr_tiny, ("tiny", "base"): deformable_detr_tiny}
    cfg = makers[preset, name](80)
    cfg = cfg.without_pretrained()
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    h, w = size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, h, w, generator=g).to(device)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(20, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
    targets = [{"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(0, 80, (20,), generator=g).to(device),
                "img_size": (h, w)}]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda": torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 1):          # the first run warms up (allocator, kernel compilation)
        if device == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        total_loss(model(images, targets)).backward()
        if device == "cuda": torch.cuda.synchronize()
        if i: times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024 + 0.0)
    return {"variant": name, "seconds": min(times), "peak_mib": peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=("r50", "tiny"), default="r50")
    ap.add_argument(WORKER, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.size, args.repeats, args.device, args.preset)))
        return
    rows = {}
    for name in ("base", "co"):
        cmd = [sys.executable, __file__, WORKER, name, "--size", *map(str, args.size), "--repeats", str(args.repeats),
               "--device", args.device, "--preset", args.preset]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
        r = rows[name]
        print(f"{args.preset} {name:4s} {args.size[0]}x{args.size[1]} batch 1 on {args.device}: forward+backward "
              f"{r['seconds']:.2f} s, peak memory {r['peak_mib']:.0f} MiB (CPU: growth of max RSS), {r['params_m']:.1f}M params")
    co, base = rows["co"], rows["base"]
    print(f"Co-DETR / baseline: time x{co['seconds'] / base['seconds']:.2f}, memory x{co['peak_mib'] / max(base['peak_mib'], 1e-9):.2f} "
          f"(goal: at most x1.5)")


if __name__ == "__main__":
    main()
