"""Cost of Co-DINO R50 on a CPU: evaluation and training forward+backward at 512x512, batch 1, beside the official
figures and the DINO baseline, in one run.

    python tests/bench_co_dino.py [--repeats 3] [--threads 2] [--size 512] [--skip-train] [--profile N]

Three models are timed with their steps interleaved (one step of each in turn, so that a machine's drift over the
run reaches all of them alike): Co-DINO as the preset builds it (the first 4 encoder layers checkpointed, `with_cp=4`,
as in the official config), the same Co-DINO with `with_cp=0`, and the DINO baseline (no auxiliary heads, no positive
queries, `with_cp=4`). Each number is the median of `--repeats` timed steps after one warm-up step.

The official figures come from the parity references' `timing.json` (same input size, batch and thread count, median
of 3): the Sense-X Co-DINO (mmdet 2.x, torch 2.14.1, fairscale installed, so its `with_cp=4` is active) and the
mmdetection 3.3 Co-DINO (torch 2.13, fairscale not installed, so no layer is checkpointed). They were measured on a
machine like this one but not in this run, and such machines drift by 20-30% from run to run: read the ratios to them
as estimates, and the Co-DINO / DINO ratio (same run) as a measurement.

Eval: the preprocessed N(0, 1) image through backbone, encoder, decoder and soft-NMS (the official predict mode).
Train: the summed losses of one step with 20 random boxes, then the backward.
`--profile N` prints the N most expensive operators of one more Co-DINO training step (torch.profiler).
"""
import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

REFS = Path(os.environ.get("CODETR_SHARED_PARITY", Path(__file__).resolve().parents[2] / "shared" / "parity"))


def official_timings() -> dict[str, dict]:
    "The official (eval, train) medians in seconds by reference name, where the reference folder is present."
    out = {}
    for name, label in (("sensex_co_dino_5scale_r50", "Sense-X Co-DINO (with_cp=4 active)"),
                        ("co_dino_5scale_r50", "mmdet 3.3 Co-DINO (with_cp inactive)")):
        f = REFS / name / "timing.json"
        if f.exists():
            t = json.loads(f.read_text())
            out[name] = dict(label=label, eval=t["eval_forward_median_s"], train=t["train_fwd_bwd_median_s"],
                             torch=t["versions"]["torch"])
    return out


def build_models(size: int) -> dict:
    from codetr.models.co_dino import co_dino_5scale_r50_1x_coco, dino_5scale_r50_1x_coco
    from codetr.models.detector import build_model
    co = co_dino_5scale_r50_1x_coco(80).without_pretrained()
    no_cp = replace(co, query_head=replace(co.query_head, transformer=replace(co.query_head.transformer, with_cp=0)))
    models = {}
    for name, cfg in (("co_dino", co), ("co_dino_no_cp", no_cp), ("dino", dino_5scale_r50_1x_coco(80).without_pretrained())):
        torch.manual_seed(0)
        models[name] = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=g)
    xy = torch.rand(20, 2, generator=g) * size * 0.7
    wh = torch.rand(20, 2, generator=g) * size * 0.3 + 16
    targets = [{"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 80, (20,), generator=g),
                "img_size": (size, size)}]
    return dict(models=models, image=image, targets=targets)


def eval_step(model, image, targets) -> float:
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(): model(image)
    return time.perf_counter() - t0


def train_step(model, image, targets) -> float:
    from codetr.models.detector import total_loss
    model.train()
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    total_loss(model(image, targets)).backward()
    return time.perf_counter() - t0


def interleaved(step, setup: dict, names: list[str], repeats: int) -> dict[str, float]:
    "Median seconds per model: one warm-up step each, then `repeats` rounds of one step per model."
    times = {n: [] for n in names}
    for r in range(repeats + 1):
        this_round = {n: step(setup["models"][n], setup["image"], setup["targets"]) for n in names}
        if r: [times[n].append(t) for n, t in this_round.items()]
        print(f"  {'round ' + str(r) if r else 'warm-up'}: " + ", ".join(f"{n} {t:.2f} s" for n, t in this_round.items()), flush=True)
    return {n: statistics.median(v) for n, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = build_models(args.size)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}x{args.size}, batch 1, median of {args.repeats}")
    print("eval (no_grad, soft-NMS):")
    ev = interleaved(eval_step, setup, ["co_dino", "dino"], args.repeats)  # with_cp does nothing in evaluation
    tr = {} if args.skip_train else (print("train (forward + backward):"),
                                     interleaved(train_step, setup, ["co_dino", "co_dino_no_cp", "dino"], args.repeats))[1]
    official = official_timings()
    print("\nseconds            eval    train")
    rows = [("codetr Co-DINO", ev["co_dino"], tr.get("co_dino")), ("  with_cp=0", None, tr.get("co_dino_no_cp")),
            ("codetr DINO", ev["dino"], tr.get("dino"))]
    rows += [(o["label"], o["eval"], o["train"]) for o in official.values()]
    fmt = lambda v: f"{v:7.2f}" if v is not None else "      -"
    for label, e, t in rows: print(f"{label:38s} {fmt(e)} {fmt(t)}")
    print("\nratios (goal: at most 0.5 against the official code; Co-DINO / DINO at most 1.5 in training)")
    for name, o in official.items():
        pairs = [("eval", ev["co_dino"], o["eval"])]
        if tr: pairs += [("train", tr["co_dino"] if "sensex" in name else tr["co_dino_no_cp"], o["train"])]
        print(f"  codetr / {o['label']}: " + ", ".join(f"{k} {a / b:.2f}x" for k, a, b in pairs))
    if tr:
        print(f"  Co-DINO / DINO in training (both with_cp=4): {tr['co_dino'] / tr['dino']:.2f}x;"
              f" eval: {ev['co_dino'] / ev['dino']:.2f}x")
        print(f"  with_cp=4 / with_cp=0 in training: {tr['co_dino'] / tr['co_dino_no_cp']:.2f}x")
    if args.profile:
        from torch.profiler import profile
        model = setup["models"]["co_dino_no_cp"].train()
        with profile() as prof: train_step(model, setup["image"], setup["targets"])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


if __name__ == "__main__":
    main()
