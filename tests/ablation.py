"""The paper's central claim at small scale: Co-Deformable-DETR against the plain Deformable-DETR baseline.

Trains `co_deformable_detr_tiny` and `deformable_detr_tiny` (the same model without the auxiliary heads and the
customized positive queries) with the same budget (epochs, batch size, learning-rate schedule, data order) on the
embedded synthetic set, for several seeds each, evaluates every run on the synthetic validation set and tables the
COCO box AP as mean +- std over the seeds. Every run is `python -m codetr.engine.train` in its own process; finished runs
(their metrics.json exists) are reused, so an interrupted ablation continues where it stopped.

    python tests/ablation.py --epochs 3                     # 2 presets x 3 seeds, the tiny preset's recipe
    python tests/ablation.py --epochs 1 --n-train 128 --jobs 2 --work-dir work_dirs/ablation_small

Not collected by pytest (no test_ prefix). The table is printed and written to <work-dir>/ablation.md and .json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PRESETS = ("co_deformable_detr_tiny", "deformable_detr_tiny")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--n-train", type=int, default=512, help="synthetic training images")
    p.add_argument("--n-val", type=int, default=128, help="synthetic validation images")
    p.add_argument("--work-dir", default="work_dirs/ablation")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg-options", nargs="*", default=[], metavar="KEY=VALUE", help="passed to every run")
    return p.parse_args(argv)


def synthetic_paths(n_train: int, n_val: int):
    from codetr.data.synthetic import synthetic_dataset
    return synthetic_dataset(n_train=n_train, n_val=n_val)


def run_one(args, data, preset: str, seed: int) -> dict:
    "Train and evaluate one run in a subprocess (or reuse its metrics.json); returns its metrics and seconds."
    work = Path(args.work_dir) / f"{preset}_seed{seed}"
    done = work / "metrics.json"
    if not done.is_file():
        cmd = [sys.executable, "-m", "codetr.engine.train", preset, "--train-images", str(data.train_images),
               "--train-ann", str(data.train_json), "--val-images", str(data.val_images), "--val-ann", str(data.val_json),
               "--work-dir", str(work), "--seed", str(seed), "--num-workers", "0", "--no-progress",
               "--device", args.device, "--auto-resume"]
        cmd += ["--epochs", str(args.epochs)] * (args.epochs is not None)
        cmd += ["--batch-size", str(args.batch_size)] * (args.batch_size is not None)
        cmd += ["--cfg-options", *args.cfg_options] if args.cfg_options else []
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        start = time.time()
        with open(work / "stdout.txt", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc: raise RuntimeError(f"{preset} seed {seed} failed (exit {rc}); see {work / 'stdout.txt'}")
        (work / "seconds.txt").write_text(f"{time.time() - start:.1f}\n")
        print(f"{preset} seed {seed}: AP {100 * json.loads(done.read_text())['AP']:.1f} "
              f"in {time.time() - start:.0f} s", flush=True)
    metrics = json.loads(done.read_text())
    seconds = float((work / "seconds.txt").read_text()) if (work / "seconds.txt").is_file() else float("nan")
    return {"preset": preset, "seed": seed, "seconds": seconds, **{k: 100 * metrics[k] for k in STATS}}


def mean_std(values) -> str:
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):5.1f} +- {std:4.1f}"


def table(runs: list[dict], presets, header: str) -> str:
    "Markdown table: one row per preset, mean +- std over its seeds."
    lines = [header, "", "| model | seeds | " + " | ".join(STATS) + " | s/run |", "|---|---|" + "---|" * (len(STATS) + 1)]
    for preset in presets:
        rows = [r for r in runs if r["preset"] == preset]
        if not rows: continue
        cells = [mean_std(r[k] for r in rows) for k in STATS]
        lines.append(f"| {preset} | {len(rows)} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    lines += ["", "per run: " + ", ".join(f"{r['preset'].split('_')[0]}/s{r['seed']} AP {r['AP']:.1f}" for r in runs)]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    data = synthetic_paths(args.n_train, args.n_val)
    jobs = [(p, s) for s in args.seeds for p in args.presets]  # alternate presets: an early stop leaves both measured
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda ps: run_one(args, data, *ps), jobs))
    budget = (f"{args.epochs or 'preset'} epoch(s), batch {args.batch_size or 'preset'}, {args.n_train} train / "
              f"{args.n_val} val synthetic images, seeds {args.seeds}")
    text = table(runs, args.presets, f"COCO box AP (%) on the synthetic validation set, mean +- std over seeds; {budget}")
    print(text)
    out = Path(args.work_dir)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps({"budget": budget, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
