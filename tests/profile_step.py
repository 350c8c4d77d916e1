"""Where the CPU time of one training step and one inference pass goes, by operator and by model part.

    python tests/profile_step.py [--preset co_deformable_detr_r50_1x_coco] [--size 512 512] [--batch 1] [--threads 2]
                                 [--top 25] [--floor]

Builds any preset (`codetr.models.presets.PRESETS`, e.g. co_dino_5scale_r50_1x_coco, co_deformable_detr_tiny,
co_dino_tiny) with seeded random weights (no download), makes a seeded batch of N(0, 1) images with 20 random boxes
each, runs one warm-up training step and one warm-up inference pass, then profiles one training step (forward, summed
losses, backward) and one inference pass (no_grad, post-processing included) with torch.profiler and prints:

(a) the top operators by self CPU time, with calls and share of the profiled total;
(b) the time per model part: backbone, neck, query head (its transformer outside encoder and decoder), encoder,
    decoder, query-head losses, the auxiliary pyramid, each auxiliary head (forward, targets, losses), each head's
    positive-query branch, and inside those the assignment (`codetr.ops.assigners` functions) and loss functions
    (`codetr.ops.losses`). Parts are `record_function` scopes opened from outside the model (forward pre/post hooks
    on submodules, wrapped head methods and module-level functions), restored afterwards. A part's forward time
    excludes the parts nested in it. Its backward time is that of the autograd nodes its forward ops created
    (matched by the profiler's sequence numbers); recomputation of checkpointed layers counts to the part whose
    backward triggers it. AccumulateGrad (writing parameter gradients) has no forward op and gets a row of its own.

(c) with --floor, the arithmetic floor of a training step and of an inference: the floating-point operations of their
    matrix products and convolutions, forward and backward (`torch.utils.flop_counter`'s formulas), divided by the best rates
    this machine reaches on such products at the same thread count (large fp32 matrix products and a ResNet
    convolution, timed here), next to the measured times: no change that keeps the arithmetic (fp32, the same layers)
    makes them faster than that.

The profiler adds overhead per operator (a few microseconds): read the numbers as shares, not as step times.
"""
import argparse
import functools
import importlib
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.autograd.profiler import record_function

PART = "part: "
STEP = "step: "
BACKWARD = "autograd::engine::evaluate_function: "
HEAD_MODULES = ("codetr.heads.detr", "codetr.heads.dino", "codetr.heads.rpn", "codetr.heads.roi", "codetr.heads.atss",
                "codetr.heads.positive_queries", "codetr.heads.denoising")
LEAF_FUNCTIONS = {"codetr.ops.assigners": "assign", "codetr.ops.losses": "loss fns"}


def build(preset: str, size: tuple[int, int], batch: int):
    "The model (seeded, no pretrained weights), a batch of images and targets (20 boxes per image)."
    from codetr.models.detector import build_model
    from codetr.models.presets import get_preset
    cfg = get_preset(preset).without_pretrained()
    torch.manual_seed(0)
    model = build_model(cfg)
    h, w = size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=g)
    targets = []
    for _ in range(batch):
        xy = torch.rand(20, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(20, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "img_size": (h, w),
                        "labels": torch.randint(0, cfg.num_classes, (20,), generator=g)})
    return model, images, targets


class Scopes:
    "A stack of named `record_function` scopes; each one's name is the path of the scopes open around it."
    def __init__(self):
        self.stack = []

    def enter(self, name: str):
        path = "/".join([s[0] for s in self.stack] + [name])
        scope = record_function(PART + path)
        scope.__enter__()
        self.stack.append((name, scope))

    def exit(self):
        self.stack.pop()[1].__exit__(None, None, None)

    def wrap(self, fn, name: str):
        "`fn` run inside the scope `name` (a callable name: evaluated per call, e.g. to number repeated calls)."
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.enter(name() if callable(name) else name)
            try: return fn(*args, **kwargs)
            finally: self.exit()
        return wrapped


@contextmanager
def part_scopes(model):
    "Open a scope around every part of `model` while inside; the model and the head modules are restored on exit."
    scopes, handles, patched = Scopes(), [], []

    def hook_module(module, name):
        handles.append(module.register_forward_pre_hook(lambda *_: scopes.enter(name)))
        handles.append(module.register_forward_hook(lambda *_: scopes.exit()))

    def patch(owner, attr, name):
        patched.append((owner, attr, owner.__dict__.get(attr, None), attr in owner.__dict__))
        setattr(owner, attr, scopes.wrap(getattr(owner, attr), name))

    hook_module(model.backbone, "backbone")
    hook_module(model.neck, "neck")
    hook_module(model.query_head, "query head")
    transformer = getattr(model.query_head, "transformer", None)
    for part in ("encoder", "decoder"):
        if transformer is not None and hasattr(transformer, part): hook_module(getattr(transformer, part), part)
    if model.aux_pyramid is not None: hook_module(model.aux_pyramid, "aux pyramid")
    patch(model.query_head, "loss", "query head losses")
    patch(model.query_head, "predict", "post-processing")
    for i, head in enumerate(model.aux_heads):
        patch(head, "forward_train", f"aux {i} {type(head).__name__}")
    calls = iter(range(10**6))
    patch(model.query_head, "positive_query_loss", lambda: f"positive queries {next(calls) % max(1, len(model.aux_heads))}")
    for module_name in HEAD_MODULES:  # the assigners and loss functions the heads call, by their module-level names
        module = importlib.import_module(module_name)
        for attr, obj in list(vars(module).items()):
            kind = LEAF_FUNCTIONS.get(getattr(obj, "__module__", None))
            if kind and callable(obj) and not isinstance(obj, type): patch(module, attr, kind)
    try:
        yield
    finally:
        for h in handles: h.remove()
        for owner, attr, old, had in reversed(patched):
            if had: setattr(owner, attr, old)
            else: delattr(owner, attr)


def train_step(model, images, targets):
    from codetr.models.detector import total_loss
    model.train()
    model.zero_grad(set_to_none=True)
    with record_function(STEP + "forward"):
        loss = total_loss(model(images, targets))
    with record_function(STEP + "backward"):
        loss.backward()


def infer(model, images, targets):
    model.eval()
    with torch.no_grad(), record_function(STEP + "forward"):
        model(images)


def profile(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return prof


def enclosing(event, prefix: str):
    "The nearest enclosing event (itself included) whose name starts with `prefix`, or None."
    while event is not None and not event.name.startswith(prefix): event = event.cpu_parent
    return event


def part_times(events) -> tuple[dict, dict, dict]:
    "Forward (exclusive of nested parts) and backward microseconds per part path, and the step totals."
    fwd, bwd, steps = defaultdict(float), defaultdict(float), {}
    part_of_node = {}  # (thread, sequence number) of a forward op -> its innermost part
    for e in events:
        if e.name.startswith(STEP): steps[e.name[len(STEP):]] = e.cpu_time_total
        if e.name.startswith(PART):
            fwd[e.name[len(PART):]] += e.cpu_time_total
            parent = enclosing(e.cpu_parent, PART)
            if parent is not None: fwd[parent.name[len(PART):]] -= e.cpu_time_total
        elif e.sequence_nr >= 0 and not e.name.startswith(BACKWARD) and enclosing(e, BACKWARD) is None:
            part = enclosing(e, PART)
            part_of_node.setdefault((e.thread, e.sequence_nr), part.name[len(PART):] if part else "(outside the parts)")
    for e in events:
        if not e.name.startswith(BACKWARD) or enclosing(e.cpu_parent, BACKWARD) is not None: continue  # outermost only
        if "AccumulateGrad" in e.name: bwd["(accumulate parameter gradients)"] += e.cpu_time_total
        else: bwd[part_of_node.get((e.fwd_thread, e.sequence_nr), "(outside the parts)")] += e.cpu_time_total
    covered = sum(fwd.values())
    fwd["(outside the parts)"] += steps.get("forward", covered) - covered
    return fwd, bwd, steps


def print_parts(prof, title: str):
    fwd, bwd, steps = part_times(prof.events())
    names = list(dict.fromkeys([*fwd, *bwd]))
    total = sum(steps.values())
    print(f"\n{title}: time per part (ms; forward exclusive of nested parts; share of the profiled step)")
    print(f"  {'part':<48}{'forward':>10}{'backward':>10}{'total':>10}{'share':>8}")
    for n in names:
        f, b = fwd.get(n, 0.0), bwd.get(n, 0.0)
        if f + b < 1: continue  # below a microsecond
        print(f"  {n:<48}{f / 1e3:10.1f}{b / 1e3:10.1f}{(f + b) / 1e3:10.1f}{100 * (f + b) / total:7.1f}%")
    line = ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in steps.items())
    print(f"  step totals: {line}; backward attributed to parts: {sum(bwd.values()) / 1e3:.1f} ms")


def print_top_ops(prof, title: str, top: int):
    rows = [e for e in prof.key_averages() if not e.key.startswith((PART, STEP))]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"\n{title}: top {top} operators by self CPU time (total self CPU {total / 1e3:.1f} ms)")
    print(f"  {'operator':<64}{'calls':>8}{'self ms':>10}{'share':>8}")
    for e in rows[:top]:
        print(f"  {e.key[:63]:<64}{e.count:8d}{e.self_cpu_time_total / 1e3:10.1f}{100 * e.self_cpu_time_total / total:7.1f}%")


def gemm_rates(repeats: int = 5) -> dict:
    "This machine's best fp32 GFLOP/s at the current thread count: matrix products and a 3x3 convolution."
    import time
    g = torch.Generator().manual_seed(0)
    shapes = {"matrix products": [((5440, 256), (256, 2048)), ((5440, 2048), (2048, 256)), ((1024, 12544), (12544, 1024))],
              "convolutions": [((1, 256, 64, 64), (256, 256, 3, 3)), ((1, 128, 64, 64), (128, 128, 3, 3))]}
    best = {}
    for kind, pairs in shapes.items():
        for a, b in pairs:
            x, w = torch.randn(*a, generator=g), torch.randn(*b, generator=g)
            fn = (lambda: x @ w) if kind == "matrix products" else (lambda: torch.nn.functional.conv2d(x, w, padding=1))
            flops = 2 * a[0] * a[1] * b[1] if kind == "matrix products" else 2 * b[0] * b[1] * 9 * a[2] * a[3]
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
            best[kind] = max(best.get(kind, 0.0), flops / min(times) / 1e9)
    return best


def step_flops(fn, *args) -> tuple[float, float]:
    "GFLOP of the matrix products and of the convolutions (forward and backward) that `fn(*args)` runs."
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry  # torch's FLOP formulas (FlopCounterMode's, without its module hooks)

    class Count(TorchDispatchMode):
        mm = conv = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                n = formula(*args, **(kwargs or {}), out_val=out)
                if "convolution" in str(func._overloadpacket): self.conv += n
                else: self.mm += n
            return out

    with Count() as count:
        fn(*args)
    return count.mm / 1e9, count.conv / 1e9


def print_floor(model, images, targets):
    "The matrix-product and convolution FLOPs of a training step and an inference over this machine's best rates."
    import statistics, time
    rates = gemm_rates()
    print("\narithmetic floor: fp32 matrix products and convolutions (forward and backward) at this machine's best rates "
          f"({rates['matrix products']:.0f} GFLOP/s for matrix products, {rates['convolutions']:.0f} for convolutions)")
    for name, fn in (("training step", train_step), ("inference", infer)):
        mm, conv = step_flops(fn, model, images, targets)
        times = []
        for _ in range(3):
            t0 = time.perf_counter(); fn(model, images, targets); times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        floor = mm / rates["matrix products"] + conv / rates["convolutions"]
        print(f"  {name}: matrix products {mm:.1f} GFLOP, convolutions {conv:.1f} GFLOP: floor {floor:.2f} s; measured "
              f"{step:.2f} s (median of 3, no profiler): the floor is {100 * floor / step:.0f}%, the rest {step - floor:.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="co_deformable_detr_r50_1x_coco")
    ap.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--floor", action="store_true", help="also print the step's arithmetic floor on this machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, images, targets = build(args.preset, tuple(args.size), args.batch)
    print(f"{args.preset}: torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.size[0]}x{args.size[1]}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    train_step(model, images, targets)  # warm-up: allocator, first-call set-up
    infer(model, images, targets)
    with part_scopes(model):
        train = profile(train_step, model, images, targets)
        inference = profile(infer, model, images, targets)
    print_top_ops(train, "training step", args.top)
    print_parts(train, "training step")
    print_top_ops(inference, "inference", args.top)
    print_parts(inference, "inference")
    if args.floor: print_floor(model, images, targets)


if __name__ == "__main__":
    main()
