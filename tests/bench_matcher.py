"""Time the Hungarian matcher on the CPU: cost building vs linear_sum_assignment, for encoder- and decoder-sized problems.

Spec 4.2: the Co-Deformable-DETR encoder loss matches every encoder token (about 20000 per image) against the image's
boxes with all labels 0; the decoder matches 300 queries. Baselines measured in the same run: the focal cost computed
over all K classes and indexed afterwards (mmdet's order), and a batch matched one image at a time.
Run: .venv/bin/python tests/bench_matcher.py [--repeats N] [--threads T]
"""
import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from codetr.ops.assigners import batch_match_cost, focal_cost, hungarian_match, hungarian_match_batch, match_cost


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def focal_cost_all_classes(logits, labels, alpha=0.25, gamma=2.0, eps=1e-12):
    "mmdet's order: focal terms for all K classes, then index the gt columns (the baseline)."
    p = logits.sigmoid()
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    return pos[:, labels] - neg[:, labels]


def problem(Q, G, K, seed, class_agnostic):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(Q, K, generator=g)
    boxes = torch.cat([torch.rand(Q, 2, generator=g) * 0.8 + 0.1, torch.rand(Q, 2, generator=g) * 0.3 + 0.02], 1)
    gt = torch.cat([torch.rand(G, 2, generator=g) * 0.8 + 0.1, torch.rand(G, 2, generator=g) * 0.3 + 0.02], 1)
    labels = torch.zeros(G, dtype=torch.long) if class_agnostic else torch.randint(0, K, (G,), generator=g)
    return logits, boxes, labels, gt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    hw, K, G = (800, 1216), 80, 50
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; K={K} classes, G={G} boxes, image {hw}; "
          f"median of {args.repeats} runs, ms")
    for Q, name, agnostic in ((20000, "encoder (every token, labels 0)", True), (300, "decoder (300 queries)", False)):
        logits, boxes, labels, gt = problem(Q, G, K, 0, agnostic)
        cost = match_cost(logits, boxes, labels, gt, hw)
        t_cost = median_ms(lambda: match_cost(logits, boxes, labels, gt, hw), args.repeats)
        c_np = cost.numpy()
        t_lsa = median_ms(lambda: linear_sum_assignment(c_np), args.repeats)
        t_all = median_ms(lambda: hungarian_match(logits, boxes, labels, gt, hw), args.repeats)
        t_focal = median_ms(lambda: focal_cost(logits, labels), args.repeats)
        t_focal_base = median_ms(lambda: focal_cost_all_classes(logits, labels), args.repeats)
        torch.testing.assert_close(focal_cost(logits, labels), focal_cost_all_classes(logits, labels))
        print(f"\n{Q} x {G}  {name}")
        print(f"  cost building (match_cost)       {t_cost:8.2f}")
        print(f"  linear_sum_assignment            {t_lsa:8.2f}")
        print(f"  hungarian_match end to end       {t_all:8.2f}  (cost + solve + bookkeeping)")
        print(f"  focal cost, gather first         {t_focal:8.2f}  vs all-K-then-index baseline {t_focal_base:.2f}"
              f"  -> {t_focal_base / t_focal:.1f}x")
        B = 2
        batch = [problem(Q, G, K, s, agnostic) for s in range(B)]
        bl, bb = torch.stack([p[0] for p in batch]), torch.stack([p[1] for p in batch])
        gl, gb = [p[2] for p in batch], [p[3] for p in batch]
        t_batch = median_ms(lambda: hungarian_match_batch(bl, bb, gl, gb, [hw] * B), args.repeats)
        t_loop = median_ms(lambda: [hungarian_match(bl[b], bb[b], gl[b], gb[b], hw) for b in range(B)], args.repeats)
        t_one = median_ms(lambda: batch_match_cost(bl, bb, gl, gb, [hw] * B, one_tensor=True), args.repeats)
        t_per = median_ms(lambda: batch_match_cost(bl, bb, gl, gb, [hw] * B, one_tensor=False), args.repeats)
        print(f"  batch of {B}: hungarian_match_batch {t_batch:8.2f}  vs one-image-at-a-time baseline {t_loop:.2f}"
              f"  -> {t_loop / t_batch:.2f}x")
        print(f"  batch of {B} costs, per image (CPU default) {t_per:8.2f}  vs one (B*Q, G_total) tensor {t_one:.2f}"
              f"  -> {t_one / t_per:.2f}x")


if __name__ == "__main__":
    main()
