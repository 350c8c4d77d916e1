"""What each memory switch buys when training the big models on a CPU: peak memory and time of one training step
(forward, losses, backward, AdamW step) for Co-DINO R50, Swin-L and ViT-L, with each switch on and off.

    python tests/bench_memory.py [--models r50 swin_l vit_l] [--size 384] [--threads 2] [--repeats 1]

Switches (each alone, against `plain`: no activation checkpointing anywhere, everything trained, fp32):
- `checkpointing`: the backbone's blocks and every encoder layer recompute their activations in backward
  (`--grad-checkpoint backbone encoder`);
- `frozen backbone`: the backbone out of the optimiser, no gradients into it (`--freeze backbone`);
- `bf16`: bf16 autocast (`--amp bf16`).

Every configuration runs in its own process, built without pretrained weights (seed 0), one image of `--size`
pixels square with 20 random boxes. After one warm-up step (which allocates AdamW's state), the process's peak RSS
is reset (`/proc/self/clear_refs`), then the measured steps run: "resting" is the RSS before them (weights, gradients
of the last step, optimiser state), "peak" the highest RSS during them, "step" the extra memory a step needs on top
of resting. Times are medians of `--repeats` steps. CPU RSS includes the allocator's caching, so differences under
~100 MB are noise; on a GPU the same switches act on the allocator's peak.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

MODELS = {"r50": "co_dino_5scale_r50_1x_coco", "swin_l": "co_dino_5scale_swin_large_1x_coco",
          "vit_l": "co_dino_5scale_vit_large_coco"}
SWITCHES = ("plain", "checkpointing", "frozen backbone", "bf16")
WORKER = "--worker"


def rss_mb(field: str) -> float:
    "A memory field of /proc/self/status (VmRSS, VmHWM) in MB."
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    raise KeyError(field)


def config(model: str, switch: str):
    from codetr.models.presets import get_preset
    cfg = get_preset(MODELS[model]).without_pretrained()
    q = cfg.query_head
    cp = switch == "checkpointing"
    backbone = replace(cfg.backbone, with_cp=cp) if hasattr(cfg.backbone, "with_cp") else cfg.backbone
    cfg = replace(cfg, backbone=backbone, query_head=replace(q, transformer=replace(
        q.transformer, with_cp=q.transformer.num_encoder_layers if cp else 0)))
    if switch == "frozen backbone": cfg = replace(cfg, optim=replace(cfg.optim, frozen=("backbone",)))
    return replace(cfg, optim=replace(cfg.optim, ema_momentum=0.0))  # the weight average is not a memory switch


def worker(model: str, switch: str, size: int, repeats: int) -> dict:
    import torch
    from codetr.engine.run_state import autocast_for, build_optimizer, freeze
    from codetr.models.detector import build_model, total_loss
    torch.manual_seed(0)
    cfg = config(model, switch)
    net = build_model(cfg).train()
    freeze(net, cfg.optim.frozen)
    optimizer = build_optimizer(net, cfg.optim)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=g)
    xy = torch.rand(20, 2, generator=g) * size * 0.7
    targets = [{"boxes": torch.cat([xy, xy + torch.rand(20, 2, generator=g) * size * 0.3 + 16], 1),
                "labels": torch.randint(0, 80, (20,), generator=g), "img_size": (size, size)}]
    pad = torch.zeros(1, size, size, dtype=torch.bool)
    amp = "bf16" if switch == "bf16" else None

    def step():
        with autocast_for(torch.device("cpu"), amp):
            loss = total_loss(net(image, targets, pad_mask=pad))
        loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between real steps

    step()
    resting = rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f: f.write("5")  # reset the peak RSS
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    peak = rss_mb("VmHWM")
    params = sum(p.numel() for p in net.parameters())
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"resting_mb": resting, "peak_mb": peak, "step_mb": peak - resting, "seconds": statistics.median(times),
            "params": params, "trained": trained}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"one training step at {args.size}x{args.size}, batch 1, {args.threads} threads, CPU; memory as process RSS")
    print(f"| model | switch | trained params | resting GB | peak GB | step GB | step / plain | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        plain = None
        for switch in args.switches:
            proc = subprocess.run([sys.executable, __file__, WORKER, json.dumps([model, switch, args.size, args.repeats])],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                print(f"| {model} | {switch} | failed: {proc.stderr.strip().splitlines()[-1]} |"); continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            plain = r if switch == "plain" else plain
            ratio = f"{r['step_mb'] / plain['step_mb']:.2f}x" if plain and switch != "plain" else ""
            print(f"| {MODELS[model]} | {switch} | {r['trained'] / 1e6:.1f}M of {r['params'] / 1e6:.1f}M | "
                  f"{r['resting_mb'] / 1024:.2f} | {r['peak_mb'] / 1024:.2f} | {r['step_mb'] / 1024:.2f} | {ratio} | "
                  f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else: main()
