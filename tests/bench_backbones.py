"""Cost of the Swin and ViT backbone families on a CPU: evaluation and training forward+backward time and peak memory
at 512x512, batch 1, beside the official figures where the parity references have them.

    python tests/bench_backbones.py [--variants swin_l vit_l swin_t] [--repeats 3] [--threads 2] [--size 512]
                                    [--no-cp] [--skip-train] [--device cpu|cuda]

Variants (presets built without pretrained weights, seed 0):
- `swin_l`: Co-DINO 5-scale Swin-L (`co_dino_5scale_swin_large_lsj_1x_coco`, mmdetection 3.x post-processing),
  beside `co_dino_5scale_swin_l/timing.json` (mmdetection 3.3; fairscale not installed there, so its encoder
  `with_cp=6` was inactive: compare its training time with `--no-cp`).
- `vit_l`: Co-DINO 5-scale ViT-L (`co_dino_5scale_vit_large_coco`), beside `co_dino_5scale_vit_l/timing.json`
  (Sense-X, mmdet 2.x).
- `swin_t`: Co-Deformable-DETR Swin-T (`co_deformable_detr_swin_tiny_1x_coco`), the small one (no official figure).

Each variant runs in its own process, so that its peak memory (CPU: growth of the maximum RSS over the RSS after the
model is built; GPU: peak allocated) is its own; each time is the median of `--repeats` steps after one warm-up step.
Eval: the N(0, 1) image through the whole model in evaluation mode (backbone, neck, transformer, post-processing, as
the official predict mode). Train: the summed losses of one step with 20 random boxes, then the backward. `--no-cp`
turns every activation checkpoint off (backbone `with_cp`, encoder `with_cp`).

The official figures were measured on a machine like this one, not in this run (the same size, batch and thread
count, median of 3); such machines drift by 20-50% between runs, so read the ratios to them as estimates.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REFS = Path(os.environ.get("CODETR_SHARED_PARITY", Path(__file__).resolve().parents[2] / "shared" / "parity"))
VARIANTS = {  # name: (preset, official reference folder or None, label)
    "swin_l": ("co_dino_5scale_swin_large_lsj_1x_coco", "co_dino_5scale_swin_l", "Co-DINO Swin-L"),
    "vit_l": ("co_dino_5scale_vit_large_coco", "co_dino_5scale_vit_l", "Co-DINO ViT-L"),
    "swin_t": ("co_deformable_detr_swin_tiny_1x_coco", None, "Co-Deformable-DETR Swin-T"),
}
WORKER = "--worker"


def official_timing(ref: str | None) -> dict | None:
    "The official (eval, train) medians in seconds and its code's versions, where the reference has a timing.json."
    f = REFS / ref / "timing.json" if ref else None
    if f is None or not f.exists(): return None
    t = json.loads(f.read_text())
    return dict(eval=t["eval_forward_median_s"], train=t["train_fwd_bwd_median_s"], threads=t["torch_threads"],
                versions=f"mmdet {t['versions']['mmdet'].split()[0]}, torch {t['versions']['torch'].split('+')[0]}")


def build_config(name: str, no_cp: bool):
    "The variant's preset without pretrained weights (and without activation checkpoints under `no_cp`)."
    from codetr.models.presets import PRESETS
    cfg = PRESETS[VARIANTS[name][0]]().without_pretrained()
    if name == "swin_l": cfg = replace(cfg, query_head=replace(cfg.query_head, postprocess="mmdet3"))
    if no_cp:
        q = cfg.query_head
        cfg = replace(cfg, backbone=replace(cfg.backbone, with_cp=False),
                      query_head=replace(q, transformer=replace(q.transformer, with_cp=0)))
    return cfg


def inputs(size: int, device: str):
    "The N(0, 1) image (1, 3, size, size) and 20 random boxes of 80 classes."
    import torch
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=g)
    xy = torch.rand(20, 2, generator=g) * size * 0.7
    wh = torch.rand(20, 2, generator=g) * size * 0.3 + 16
    targets = [{"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(0, 80, (20,), generator=g).to(device),
                "img_size": (size, size)}]
    return image.to(device), targets


def timed(step, repeats: int, device: str) -> list[float]:
    "Seconds of `repeats` calls of `step` after one warm-up call."
    import torch
    times = []
    for i in range(repeats + 1):
        if device == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda": torch.cuda.synchronize()
        if i: times.append(time.perf_counter() - t0)
    return times


def peak_mib(device: str, rss0: int) -> float:
    import torch
    if device == "cuda": return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # ru_maxrss is in KiB on Linux


def run_variant(name: str, size: int, repeats: int, threads: int, device: str, no_cp: bool, skip_train: bool) -> dict:
    "Eval and train times and peak memory of one variant (run in a worker process)."
    import torch
    from codetr.models.detector import build_model, total_loss
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(build_config(name, no_cp)).to(device)
    image, targets = inputs(size, device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda": torch.cuda.reset_peak_memory_stats()
    model.eval()
    with torch.no_grad(): ev = timed(lambda: model(image), repeats, device)
    out = {"variant": name, "eval": statistics.median(ev), "eval_peak_mib": peak_mib(device, rss0),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if skip_train: return out
    if device == "cuda": torch.cuda.reset_peak_memory_stats()
    model.train()
    def train_step():
        model.zero_grad(set_to_none=True)
        total_loss(model(image, targets)).backward()
    tr = timed(train_step, repeats, device)
    return out | {"train": statistics.median(tr), "train_peak_mib": peak_mib(device, rss0)}


def print_table(rows: dict[str, dict], args):
    fmt = lambda v, spec="7.2f": format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))
    print(f"\n{args.size}x{args.size}, batch 1, {args.threads} threads, {args.device}, median of {args.repeats}"
          f"{', no activation checkpoints' if args.no_cp else ''}; memory: peak growth in MiB "
          f"({'max RSS' if args.device == 'cpu' else 'max allocated'})")
    print(f"{'':44s}{'eval s':>8s}{'train s':>8s}{'eval MiB':>10s}{'train MiB':>10s}{'params':>9s}")
    for name, r in rows.items():
        preset, ref, label = VARIANTS[name]
        print(f"codetr {label}".ljust(44) + f"{fmt(r['eval'])} {fmt(r.get('train'))}{fmt(r['eval_peak_mib'], '10.0f')}"
              f"{fmt(r.get('train_peak_mib'), '10.0f')}{r['params_m']:8.1f}M")
        o = official_timing(ref)
        if o is None: continue
        print(f"  official ({o['versions']})".ljust(44) + f"{fmt(o['eval'])} {fmt(o['train'])}")
        ratios = [f"eval {r['eval'] / o['eval']:.2f}x"] + ([f"train {r['train'] / o['train']:.2f}x"] if "train" in r else [])
        print(f"  codetr / official: {', '.join(ratios)}" + ("" if o["threads"] == args.threads and args.size == 512
                                                             else " (official: 2 threads, 512x512; not comparable)"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-cp", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument(WORKER, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.size, args.repeats, args.threads, args.device, args.no_cp,
                                     args.skip_train)))
        return
    rows = {}
    for name in args.variants:
        cmd = [sys.executable, __file__, WORKER, name, "--size", str(args.size), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--device", args.device] + ["--no-cp"] * args.no_cp + ["--skip-train"] * args.skip_train
        print(f"running {name} ({VARIANTS[name][0]}) ...", flush=True)
        rows[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print_table(rows, args)


if __name__ == "__main__":
    main()
