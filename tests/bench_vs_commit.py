"""The code as it is against an earlier commit, in one session: training-step and inference times of a preset,
the two versions alternating, each in its own process.

    python tests/bench_vs_commit.py [--base f48d0ad] [--current HEAD] [--preset co_deformable_detr_r50_1x_coco] [--size 512 [W]]
                                    [--threads 2] [--rounds 3] [--steps 3]

The base commit is checked out into a temporary git worktree; a process imports `codetr` from there or from this
checkout (PYTHONPATH first), builds the preset without pretrained weights (seed 0), runs one warm-up training step
and one warm-up inference, then times `--steps` training steps (forward, losses, backward; no optimiser step) and
`--steps` inferences (evaluation mode, no autograd) on one N(0, 1) image with 20 random boxes. Rounds alternate
base, current, base, current, ... so that the machine's drift reaches both alike; the ratio is current / base of
the medians. Only ratios measured in one run mean anything on a shared machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = "--worker"


def worker(preset: str, size: list[int], steps: int) -> dict:
    import time
    import torch
    import codetr
    from codetr.models.detector import build_model, total_loss
    from codetr.models.presets import get_preset
    torch.manual_seed(0)
    model = build_model(get_preset(preset).without_pretrained())
    g = torch.Generator().manual_seed(0)
    h, w = size if len(size) == 2 else size * 2
    image = torch.randn(1, 3, h, w, generator=g)
    wh = torch.tensor([w, h], dtype=torch.float32)
    xy = torch.rand(20, 2, generator=g) * wh * 0.7
    targets = [{"boxes": torch.cat([xy, xy + torch.rand(20, 2, generator=g) * wh * 0.3 + 16], 1),
                "labels": torch.randint(0, 80, (20,), generator=g), "img_size": (h, w), "orig_size": (h, w)}]
    pad = torch.zeros(1, h, w, dtype=torch.bool)

    def train():
        model.train(); model.zero_grad(set_to_none=True)
        total_loss(model(image, targets, pad_mask=pad)).backward()

    def infer():
        model.eval()
        with torch.no_grad(): model(image, [dict(targets[0])], pad_mask=pad)

    out = {"module": str(Path(codetr.__file__).parent)}
    for name, fn in (("train", train), ("eval", infer)):
        fn()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def run(path: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run([sys.executable, __file__, WORKER, json.dumps([args.preset, args.size, args.steps])],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode: raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["module"]).resolve() != (path / "codetr").resolve():
        raise RuntimeError(f"imported codetr from {result['module']}, expected {path / 'codetr'}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="f48d0ad")
    p.add_argument("--current", help="a commit to compare instead of this checkout's working tree")
    p.add_argument("--preset", default="co_deformable_detr_r50_1x_coco")
    p.add_argument("--size", type=int, nargs="+", default=[512], help="H [W] (W = H when left out)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": (Path(tmp) / "base", args.base), "current": (Path(tmp) / "current", args.current)}
        for path, rev in trees.values():
            if rev: subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
        paths = {name: path if rev else REPO for name, (path, rev) in trees.items()}
        try:
            times = {"base": [], "current": []}
            for r in range(args.rounds):
                for name, path in paths.items():
                    t = run(path, args)
                    times[name].append(t)
                    print(f"round {r + 1} {name:8s} train {t['train']:.2f} s  eval {t['eval']:.2f} s", flush=True)
        finally:
            for path, rev in trees.values():
                if rev: subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
    med = {n: {k: statistics.median(t[k] for t in ts) for k in ("train", "eval")} for n, ts in times.items()}
    h, w = args.size if len(args.size) == 2 else args.size * 2
    print(f"\n{args.preset} at {h}x{w}, batch 1, {args.threads} threads, median of {args.rounds} rounds "
          f"x {args.steps} steps; base = {args.base}, current = {args.current or 'the working tree'}")
    print("| | training step (s) | inference (s) |\n|---|---|---|")
    for n in ("base", "current"): print(f"| {n} | {med[n]['train']:.2f} | {med[n]['eval']:.2f} |")
    print(f"| current / base | {med['current']['train'] / med['base']['train']:.2f}x | "
          f"{med['current']['eval'] / med['base']['eval']:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else: main()
