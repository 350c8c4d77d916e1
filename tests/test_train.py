"""Tests for codetr.engine.train: optimiser groups, schedule, clipping, NaN handling, atomic checkpoints, exact resume after
SIGKILL, two gloo processes vs one, Ctrl-C, the command line.

The real detector is not needed: `TinyDetectorDouble` is a test double that follows the model interface of
codetr.models.detector (training: a dict of loss tensors; eval: per-image boxes in original pixels, scores, labels). Its loss
is normalised the way every Co-DETR loss is (a sum over objects divided by `reduce_mean(count).clamp(min=1)`), which
is what makes W processes with b images each equal one process with W*b images (see the notebook 73_train).
"""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from codetr.models.co_deformable_detr import co_deformable_detr_tiny
from codetr.models.config import OptimConfig
from codetr.data.coco import AugConfig, build_dataset
from codetr.core.dist import reduce_mean
from codetr.core.io import CheckpointError, safe_load
from codetr.data.synthetic import make_synthetic_coco
from codetr.engine.checkpoint import (export_safetensors, latest_checkpoint, list_checkpoints, load_checkpoint,
                                     read_weights, save_checkpoint)
from codetr.engine.run_state import (EpochSampler, SeededDataset, build_optimizer, build_scheduler, clip_gradients,
                                     lr_mult_for, rng_state, set_rng_state)
from codetr.engine.predict import stored_class_mapping
from codetr.engine.train import Trainer, main

TESTS = Path(__file__).resolve().parent
SMALL_AUG = AugConfig(scales=(48, 56, 64), max_size=96, crop_scales=(48,), crop_max_size=96, crop_range=(32, 48),
                      test_scale=64, test_max_size=96)


class TinyDetectorDouble(nn.Module):
    """Test double for codetr.models.detector.CoDETR: a per-pixel conv named `backbone`, masked average pooling (so padding
    does not matter), a `sampling_offsets` layer and a linear head predicting `q` boxes and class logits."""

    def __init__(self, cfg, q: int = 3, normalise: str = "objects"):
        super().__init__()
        self.q, self.k, self.normalise = q, cfg.num_classes, normalise
        self.backbone = nn.Conv2d(3, 8, 1)
        self.sampling_offsets = nn.Linear(8, 8)
        self.head = nn.Linear(8, q * (self.k + 4))

    def _pad(self, images):
        h, w = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        out, mask = torch.zeros(len(images), 3, h, w), torch.ones(len(images), h, w, dtype=torch.bool)
        for b, img in enumerate(images):
            out[b, :, :img.shape[-2], :img.shape[-1]] = img
            mask[b, :img.shape[-2], :img.shape[-1]] = False
        return out, mask

    def forward(self, images, targets=None, pad_mask=None):
        if isinstance(images, (list, tuple)): images, pad_mask = self._pad(images)
        keep = (~pad_mask).unsqueeze(1).float()  # (B, 1, H, W)
        feats = (self.backbone(images).relu() * keep).sum((2, 3)) / keep.sum((2, 3))  # (B, 8)
        feats = feats + self.sampling_offsets(feats).tanh()
        out = self.head(feats).view(len(images), self.q, self.k + 4)  # (B, q, K + 4)
        logits, boxes = out[..., :self.k], out[..., self.k:].sigmoid()  # (B, q, K), (B, q, 4) normalised cxcywh
        sizes = [t["img_size"] for t in targets] if targets else [tuple((~m).sum(d).max().item() for d in (0, 1)) for m in pad_mask]
        return self._losses(logits, boxes, targets, sizes) if self.training else self._predict(logits, boxes, targets, sizes)

    def _losses(self, logits, boxes, targets, sizes):
        count = sum(len(t["labels"]) for t in targets) if self.normalise == "objects" else len(targets)
        n = reduce_mean(torch.tensor(float(count), device=logits.device)).clamp(min=1)
        l1 = cls = logits.sum() * 0
        for b, t in enumerate(targets):
            g = min(len(t["labels"]), self.q)
            h, w = sizes[b]
            gt = t["boxes"][:g] / torch.tensor([w, h, w, h], dtype=torch.float32)  # (g, 4) normalised xyxy
            gt = torch.cat([(gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]], 1)  # (g, 4) cxcywh
            l1 = l1 + (boxes[b, :g] - gt).abs().sum()
            onehot = torch.zeros_like(logits[b]); onehot[torch.arange(g), t["labels"][:g]] = 1
            cls = cls + nn.functional.binary_cross_entropy_with_logits(logits[b], onehot, reduction="sum")
        return {"loss_cls": cls / n, "loss_bbox": 5 * l1 / n, "acc0": torch.tensor(100.0)}

    def _predict(self, logits, boxes, targets, sizes):
        outs = []
        for b in range(len(boxes)):
            t = targets[b] if targets else {}
            oh, ow = t.get("orig_size", sizes[b])
            c = boxes[b]
            xyxy = torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1) * torch.tensor([ow, oh, ow, oh])
            scores, labels = logits[b].sigmoid().max(1)
            outs.append({"boxes": xyxy, "scores": scores, "labels": labels})
        return outs


def image_normalised_double(cfg): return TinyDetectorDouble(cfg, normalise="images")


class NaNDouble(TinyDetectorDouble):
    "Returns a NaN loss on the training calls listed in `bad`."
    bad: set = set()
    calls = 0

    def forward(self, images, targets=None, pad_mask=None):
        out = super().forward(images, targets, pad_mask)
        if self.training:
            NaNDouble.calls += 1
            if NaNDouble.calls in NaNDouble.bad: out["loss_bbox"] = out["loss_bbox"] * float("inf")
        return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic"), n_train=8, n_val=4, min_size=64, max_size=96, seed=0)


@pytest.fixture(scope="module")
def train_set(synth): return build_dataset("train", synth.train_images, synth.train_json, aug=SMALL_AUG)


@pytest.fixture(scope="module")
def val_set(synth): return build_dataset("val", synth.val_images, synth.val_json, aug=SMALL_AUG)


def tiny_cfg(num_classes=6, epochs=2, batch_size=2, lr=1e-2, lr_steps=(1,)):
    cfg = co_deformable_detr_tiny(num_classes=num_classes)
    return replace(cfg, optim=replace(cfg.optim, epochs=epochs, lr_steps=lr_steps, batch_size=batch_size, lr=lr,
                                      lr_mult=(("backbone", 0.1), ("sampling_offsets", 0.5))))


def weights(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- optimiser, schedule, clipping

@pytest.mark.parametrize("name,keys,expected", [
    ("backbone.layer1.conv.weight", (("backbone", 0.1), ("sampling_offsets", 0.1)), 0.1),
    ("encoder.layers.0.attn.sampling_offsets.bias", (("backbone", 0.1), ("sampling_offsets", 0.2)), 0.2),
    ("transformer.decoder.reference_points.weight", (("backbone", 0.1), ("reference_points", 0.3)), 0.3),
    ("head.cls.weight", (("backbone", 0.1),), 1.0),
    ("backbone.sampling_offsets", (("backbone", 0.1), ("sampling_offsets", 0.5)), 0.5),  # longest key wins
    ("backbone.sampling_offsets", (("sampling_offsets", 0.5), ("backbone", 0.1)), 0.5),  # config order irrelevant
    ("xx.yy", (("yy", 0.3), ("xx", 0.2)), 0.2),  # equal length: alphabetically first
])
def test_lr_mult_rule(name, keys, expected):
    assert lr_mult_for(name, keys) == expected


def test_optimizer_groups():
    model = TinyDetectorDouble(tiny_cfg())
    model.head.bias.requires_grad_(False)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, lr_mult=(("backbone", 0.1), ("sampling_offsets", 0.5)))
    opt = build_optimizer(model, cfg)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["param_names"]}
    assert by_name == {"backbone.weight": (1e-4, 0.05), "backbone.bias": (1e-4, 0.05),
                       "sampling_offsets.weight": (5e-4, 0.05), "sampling_offsets.bias": (5e-4, 0.05),
                       "head.weight": (1e-3, 0.05)}
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    names = dict(model.named_parameters())
    for g in opt.param_groups:  # the group's params are exactly the named ones
        assert all(p is names[n] for p, n in zip(g["params"], g["param_names"]))


def test_optimizer_matches_reference_adamw():
    "The (fused) optimizer takes the same steps as torch's per-tensor AdamW over the same groups."
    torch.manual_seed(0)
    model = TinyDetectorDouble(tiny_cfg())
    ref_model, init = copy.deepcopy(model), copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.05, lr_mult=(("backbone", 0.1),))
    opt = build_optimizer(model, cfg)
    ref = torch.optim.AdamW([{"params": [dict(ref_model.named_parameters())[n] for n in g["param_names"]], "lr": g["lr"]}
                             for g in opt.param_groups], weight_decay=0.05, foreach=False)
    for _ in range(5):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for m in (model, ref_model):
            for n, p in m.named_parameters(): p.grad = grads[n].clone()
        opt.step(); ref.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert not torch.allclose(model.backbone.weight, init.backbone.weight, atol=1e-3)  # the steps did move it


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("steps,gamma,epochs", [((11,), 0.1, 12), ((8, 11), 0.1, 12), ((), 0.1, 3), ((30,), 0.5, 36)])
def test_scheduler_steps(steps, gamma, epochs):
    model = nn.Linear(2, 2)
    cfg = OptimConfig(lr=2e-4, lr_steps=steps, lr_gamma=gamma, lr_mult=())
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for epoch in range(epochs):
        expected = 2e-4 * gamma ** sum(epoch >= s for s in steps)  # mmcv step policy
        assert math.isclose(opt.param_groups[0]["lr"], expected, rel_tol=1e-12), epoch
        sched.step()


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0, None, 0])
def test_clip_gradients(max_norm):
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    for p in params: p.grad = torch.randn(p.shape, generator=g)
    grads = [p.grad.clone() for p in params]
    total = torch.sqrt(sum((x ** 2).sum() for x in grads))
    norm = clip_gradients(params + [nn.Parameter(torch.zeros(2))], max_norm)  # a parameter without grad is ignored
    assert torch.allclose(norm, total)
    scale = min(1.0, max_norm / (total.item() + 1e-6)) if max_norm else 1.0
    for p, x in zip(params, grads): assert torch.allclose(p.grad, x * scale, atol=1e-7)


# ---------------------------------------------------------------- sampler, seeds

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), world=st.integers(1, 4), seed=st.integers(0, 5), epoch=st.integers(0, 3), start=st.integers(0, 10))
def test_sampler_shards_and_resume(n, world, seed, epoch, start):
    shards = [EpochSampler(n, seed, rank=r, world_size=world) for r in range(world)]
    for s in shards: s.set_epoch(epoch)
    orders = [s.order() for s in shards]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == math.ceil(n / world)
    assert set().union(*map(set, orders)) == set(range(n))
    single = EpochSampler(n, seed, rank=0, world_size=1); single.set_epoch(epoch)
    interleaved = [o[i] for i in range(len(orders[0])) for o in orders]
    assert interleaved[:n] == single.order()  # the union of the t-th items is one process's order
    shards[0].set_epoch(epoch, start)
    assert list(shards[0]) == orders[0][start:] and len(shards[0]) == max(len(orders[0]) - start, 0)


def test_seeded_dataset_independent_of_order_and_global_rng(train_set):
    seeded = SeededDataset(train_set, seed=1)
    a = seeded[3]
    torch.manual_seed(123); np.random.seed(4)
    _ = seeded[0]
    b = seeded[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    same = SeededDataset(train_set, seed=1)
    c = same[3]
    assert torch.equal(a[0], c[0])  # a fresh wrapper with the same seed gives the same augmented item


def test_rng_state_roundtrip_weights_only(tmp_path):
    torch.manual_seed(3); np.random.seed(3)
    import random
    random.seed(3); np.random.randn()  # has_gauss state
    state = rng_state()
    want = (random.random(), np.random.randn(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


# ---------------------------------------------------------------- checkpoints

def fake_state(e, i, value=0.0):
    return {"model": {"w": torch.full((3,), value)}, "optimizer": {}, "scheduler": {}, "epoch": e, "iteration": i,
            "rng": [], "config": {}}


def test_keep_last_and_latest(tmp_path):
    for k, (e, i) in enumerate([(0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]):
        save_checkpoint(tmp_path, fake_state(e, i, k), keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0001_iter_000000.pt", "epoch_0001_iter_000001.pt",
                                                           "epoch_0002_iter_000000.pt"]
    assert (tmp_path / "latest").read_text().strip() == "epoch_0002_iter_000000.pt"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"], torch.full((3,), 4.0))
    (tmp_path / "latest").unlink()  # without the pointer the newest file is used
    assert latest_checkpoint(tmp_path).name == "epoch_0002_iter_000000.pt"
    for k in range(3): save_checkpoint(tmp_path / "all", fake_state(k, 0), keep_last=0)
    assert len(list_checkpoints(tmp_path / "all")) == 3
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("where", ["torch.save", "os.replace"])
def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch, where):
    save_checkpoint(tmp_path, fake_state(0, 2, 7.0))
    before = sorted(p.name for p in tmp_path.iterdir())
    import codetr.core.io as io
    def boom(*a, **k): raise KeyboardInterrupt("killed during the write")
    if where == "os.replace": monkeypatch.setattr(io.os, "replace", boom)
    else: monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt): save_checkpoint(tmp_path, fake_state(0, 4, 8.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left, no new checkpoint
    assert latest_checkpoint(tmp_path).name == "epoch_0000_iter_000002.pt"
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"], torch.full((3,), 7.0))


def test_run_start_removes_temporaries_of_dead_writers_only(tmp_path, train_set):
    "A writer SIGKILLed mid-save leaves `.epoch_*.pt.tmp.<pid>`; the next start removes it, never a live writer's file."
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".epoch_0000_iter_000003.pt.tmp.{int(gone.stdout)}"
    ours = tmp_path / f".epoch_0000_iter_000004.pt.tmp.{os.getpid()}"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        other = tmp_path / f".latest.tmp.{alive.pid}"
        kept = tmp_path / "notes.tmp.12"  # not a temporary's name
        for p in (dead, ours, other, kept): p.write_bytes(b"half a checkpoint")
        Trainer(tiny_cfg(epochs=1), train_set, tmp_path, model_factory=TinyDetectorDouble, progress=False).fit()
        assert not dead.exists() and ours.exists() and other.exists() and kept.exists()
    finally: alive.kill(); alive.wait()


def test_resumed_log_reads_as_one_run(tmp_path, train_set):
    "Steps logged between the last checkpoint and a kill are dropped on resume, so no step appears twice."
    cfg = tiny_cfg(epochs=2)
    Trainer(cfg, train_set, tmp_path, model_factory=TinyDetectorDouble, progress=False, checkpoint_interval=2,
            keep_last=0).fit()
    steps = [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(steps) > 3 and steps == list(range(1, len(steps) + 1))
    (tmp_path / "latest").write_text("epoch_0000_iter_000002.pt\n")  # the run was killed after step 2's checkpoint
    with open(tmp_path / "log.jsonl", "a") as f: f.write('{"mode": "train", "step": 99, "lo')  # cut short by the kill
    resumed = Trainer(cfg, train_set, tmp_path, model_factory=TinyDetectorDouble, progress=False)
    resumed.fit(auto_resume=True)
    again = [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert again == steps


def test_weights_only_refusal(tmp_path):
    torch.save({**fake_state(0, 0), "config": tiny_cfg()}, tmp_path / "bad.pt")  # a dataclass needs code to rebuild
    with pytest.raises(CheckpointError, match=r"bad\.pt' was refused: loading it would need to run arbitrary code"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="not a codetr training checkpoint"): load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"): load_checkpoint(tmp_path / "absent.pt")


def test_trainer_checkpoint_is_weights_only_and_exports_safetensors(tmp_path, train_set):
    trainer = Trainer(tiny_cfg(epochs=1), train_set, tmp_path, model_factory=TinyDetectorDouble, progress=False)
    trainer.fit()
    state = safe_load(latest_checkpoint(tmp_path))  # weights_only=True
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "iteration", "rng", "sampler", "config"}
    assert (state["epoch"], state["iteration"]) == (1, 0) and state["config"]["optim"]["epochs"] == 1
    from safetensors.torch import load_file
    export_safetensors(latest_checkpoint(tmp_path), tmp_path / "m.safetensors")
    exported = load_file(tmp_path / "m.safetensors")
    assert exported.keys() == trainer.model.state_dict().keys()
    assert all(torch.equal(v, exported[k]) for k, v in trainer.model.state_dict().items())


# ---------------------------------------------------------------- faults

def test_nan_skips_step_then_recovers(tmp_path, train_set):
    NaNDouble.calls, NaNDouble.bad = 0, {2}
    trainer = Trainer(tiny_cfg(epochs=1), train_set, tmp_path, model_factory=NaNDouble, progress=False)
    snapshots = []
    original = trainer._apply_step
    def spy(bad):
        before = weights(trainer.model)
        out = original(bad)
        snapshots.append((bad, all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())))
        return out
    trainer._apply_step = spy
    with pytest.warns(UserWarning, match="step skipped"): trainer.fit()
    assert snapshots == [(False, False), (True, True), (False, False), (False, False)]
    assert trainer.bad_steps == 0 and trainer.global_step == 4
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert math.isinf(log[1]["loss"]) and all(math.isfinite(r["loss"]) for r in log[2:])


def test_nan_error_after_n_in_a_row(tmp_path, train_set):
    NaNDouble.calls, NaNDouble.bad = 0, set(range(2, 100))
    trainer = Trainer(tiny_cfg(epochs=5), train_set, tmp_path, model_factory=NaNDouble, progress=False, max_bad_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FloatingPointError, match="3 consecutive steps with a non-finite loss"): trainer.fit()
    assert sum("step skipped" in str(w.message) for w in caught) == 3


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataset_error_names_the_image(tmp_path, synth, num_workers):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(synth.train_images, root)
    data = json.loads(Path(synth.train_json).read_text())
    broken = data["images"][3]
    (root / broken["file_name"]).write_bytes(b"not an image")
    (tmp_path / "train.json").write_text(json.dumps(data))
    ds = build_dataset("train", root, tmp_path / "train.json", aug=SMALL_AUG)
    trainer = Trainer(tiny_cfg(epochs=1), ds, tmp_path / "run", model_factory=TinyDetectorDouble, progress=False,
                      num_workers=num_workers)
    with pytest.raises(Exception, match=f"{broken['file_name']} \\(image id {broken['id']}\\)"): trainer.fit()


def test_ctrl_c_saves_and_resumes(tmp_path, train_set):
    class SigintDouble(TinyDetectorDouble):
        calls = 0
        def forward(self, *a, **k):
            if self.training:
                SigintDouble.calls += 1
                if SigintDouble.calls == 3: os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third step
            return super().forward(*a, **k)
    cfg = tiny_cfg(epochs=2)
    trainer = Trainer(cfg, train_set, tmp_path, model_factory=SigintDouble, progress=False)
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a process started in the background
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"): trainer.fit()
    assert latest_checkpoint(tmp_path).name == "epoch_0000_iter_000003.pt"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = Trainer(cfg, train_set, tmp_path, model_factory=TinyDetectorDouble, progress=False)
    resumed.fit(auto_resume=True)
    plain = Trainer(cfg, train_set, tmp_path / "plain", model_factory=TinyDetectorDouble, progress=False)
    plain.fit()
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in plain.model.state_dict().items())


def test_raw_keyboard_interrupt_saves_last_committed_state(tmp_path, train_set):
    class RaiseDouble(TinyDetectorDouble):
        calls = 0
        def forward(self, *a, **k):
            if self.training:
                RaiseDouble.calls += 1
                if RaiseDouble.calls == 4: raise KeyboardInterrupt
            return super().forward(*a, **k)
    trainer = Trainer(tiny_cfg(epochs=2), train_set, tmp_path, model_factory=RaiseDouble, progress=False)
    with pytest.raises(KeyboardInterrupt): trainer.fit()
    assert latest_checkpoint(tmp_path).name == "epoch_0000_iter_000003.pt"


# ---------------------------------------------------------------- recipe options

def test_gradient_accumulation_matches_large_batch(tmp_path, train_set):
    "Per-image normalised loss: 2 micro-batches of 2 images == 1 batch of 4 images."
    big = Trainer(tiny_cfg(batch_size=4), train_set, tmp_path / "big", model_factory=image_normalised_double, progress=False)
    big.fit()
    acc = Trainer(tiny_cfg(batch_size=2), train_set, tmp_path / "acc", model_factory=image_normalised_double,
                  progress=False, accum_steps=2)
    acc.fit()
    assert acc.global_step == big.global_step == 4
    for k, v in big.model.state_dict().items(): torch.testing.assert_close(acc.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu(tmp_path, train_set):
    trainer = Trainer(tiny_cfg(epochs=1), train_set, tmp_path, model_factory=TinyDetectorDouble, progress=False, amp="bf16")
    trainer.fit()
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(math.isfinite(r["loss"]) and r["memory_mb"] > 0 and r["time"] > 0 for r in log)
    assert set(log[0]) >= {"loss_cls", "loss_bbox", "acc0", "lr", "grad_norm", "data_time", "epoch", "iter", "step"}


def test_cli_trains_and_evaluates(tmp_path, synth):
    common = ["--train-images", str(synth.train_images), "--train-ann", str(synth.train_json), "--val-images",
              str(synth.val_images), "--val-ann", str(synth.val_json), "--work-dir", str(tmp_path), "--num-workers", "0",
              "--no-progress", "--batch-size", "4", "--cfg-options", "aug.test_scale=64", "aug.test_max_size=96",
              "aug.scales=(48,64)", "aug.max_size=96", "aug.crop_scales=(48,)", "aug.crop_range=(32,48)"]
    metrics = main(["co_deformable_detr_tiny", "--epochs", "1", *common], model_factory=TinyDetectorDouble)
    assert 0 <= metrics["AP"] <= 1 and json.loads((tmp_path / "metrics.json").read_text())["AP"] == metrics["AP"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_classes"] == 6 and cfg["optim"]["batch_size"] == 4 and cfg["aug"]["scales"] == [48, 64]
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "detections.json").exists()
    # the class mapping travels with the weights: codetr.engine.predict names detections from the file alone
    cats = sorted(json.loads(synth.train_json.read_text())["categories"], key=lambda c: c["id"])
    for name in ("model.safetensors", latest_checkpoint(tmp_path).name):
        classes = stored_class_mapping(read_weights(tmp_path / name).meta, name)
        assert classes.cat_ids == [c["id"] for c in cats] and classes.names == [c["name"] for c in cats]
    assert read_weights(tmp_path / "model.safetensors").config == cfg
    main(["co_deformable_detr_tiny", "--epochs", "2", "--auto-resume", "--no-validate", *common],
         model_factory=TinyDetectorDouble)  # extends the finished run by one epoch
    assert latest_checkpoint(tmp_path).name == "epoch_0002_iter_000000.pt"
    with pytest.raises(ValueError, match="not key=value"):
        main(["co_deformable_detr_tiny", "--cfg-options", "optim.lr"], model_factory=TinyDetectorDouble)


# ---------------------------------------------------------------- subprocess runs: SIGKILL + resume, two processes

RUN_SCRIPT = r"""
import json, os, signal, sys
from dataclasses import replace
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_train import TinyDetectorDouble, SMALL_AUG, tiny_cfg
from codetr.data.coco import build_dataset
from codetr.core.dist import init_device
from codetr.engine.train import Trainer
from codetr.core.dist import is_main_process, is_dist
args = json.loads(sys.argv[1])
init_device("cpu")
torch.set_num_threads(1)
train = build_dataset("train", args["images"], args["ann"], aug=SMALL_AUG)
val = build_dataset("val", args["val_images"], args["val_ann"], aug=SMALL_AUG)
cfg = tiny_cfg(epochs=args["epochs"], batch_size=args["batch_size"], lr_steps=(2,))
cfg = replace(cfg, optim=replace(cfg.optim, **{{k: tuple(v) if isinstance(v, list) else v for k, v in args.get("optim", {{}}).items()}}))
trainer = Trainer(cfg, train, args["work_dir"], val_set=val, model_factory=TinyDetectorDouble, progress=False,
                  checkpoint_interval=args.get("interval", 0), num_workers=args.get("workers", 0),
                  fsdp=args.get("fsdp", False))
kill_at = args.get("kill_at")
if kill_at:
    log_step = trainer._log_step
    def killing_log_step(*a, **k):
        out = log_step(*a, **k)
        if [trainer.epoch, trainer.iteration] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
        return out
    trainer._log_step = killing_log_step
trainer.fit(auto_resume=args.get("resume", False))
metrics = trainer.validate()
weights = trainer.weights()  # collective under FSDP
model = trainer.state_dict()["model"]  # whole (gathered to rank 0) under FSDP
if is_main_process():
    torch.save({{"model": model, "weights": weights, "AP": metrics["AP"]}}, args["out"])
if is_dist(): torch.distributed.destroy_process_group()
"""


def run_script(tmp_path, args, nproc=1):
    script = tmp_path / "run_train.py"
    script.write_text(RUN_SCRIPT.format(tests=str(TESTS)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    run = lambda: subprocess.run(launcher + [str(script), json.dumps(args)], capture_output=True, text=True, env=env,
                                 timeout=300)
    proc = run()
    if nproc > 1 and proc.returncode and "terminate called without an active exception" in proc.stderr:
        proc = run()  # gloo's threads can abort the process as it exits on a loaded machine: launch the run once more
    return proc


def data_args(synth, **kw):
    return {"images": str(synth.train_images), "ann": str(synth.train_json), "val_images": str(synth.val_images),
            "val_ann": str(synth.val_json), **kw}


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, synth):
    base = data_args(synth, epochs=3, batch_size=2, interval=2)
    done = run_script(tmp_path, {**base, "work_dir": str(tmp_path / "plain"), "out": str(tmp_path / "plain.pt")})
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_script(tmp_path, {**base, "work_dir": str(tmp_path / "killed"), "out": str(tmp_path / "never.pt"),
                                   "kill_at": [1, 3]})  # epoch 2, after its 3rd batch; last checkpoint after the 2nd
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "killed").name == "epoch_0001_iter_000002.pt"
    resumed = run_script(tmp_path, {**base, "work_dir": str(tmp_path / "killed"), "out": str(tmp_path / "resumed.pt"),
                                    "resume": True, "workers": 2})  # worker count does not change the data
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "resumed.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["AP"] == b["AP"]
    plain_log = (tmp_path / "plain" / "log.jsonl").read_text().splitlines()
    killed_log = [json.loads(l) for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    # the killed run logged step 7 before the kill and again after resuming: the log keeps it once, as the plain run
    by_step = {}
    for r in killed_log:
        if r["mode"] == "train": by_step.setdefault(r["step"], []).append(r["loss"])
    plain = {json.loads(l)["step"]: json.loads(l)["loss"] for l in plain_log if json.loads(l)["mode"] == "train"}
    assert sorted(by_step) == sorted(plain) and all(by_step[s] == [plain[s]] for s in plain)


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, synth):
    one = run_script(tmp_path, {**data_args(synth, epochs=2, batch_size=4), "work_dir": str(tmp_path / "one"),
                                "out": str(tmp_path / "one.pt")})
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script(tmp_path, {**data_args(synth, epochs=2, batch_size=2), "work_dir": str(tmp_path / "two"),
                                "out": str(tmp_path / "two.pt")}, nproc=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k, v in a["model"].items(): torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6)
    assert math.isclose(a["AP"], b["AP"], abs_tol=1e-6)  # distributed evaluation: shards gathered on rank 0
    log = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["mode"] for l in log] == ["train"] * 4 + ["val"]  # rank 0 alone writes: 2 epochs x 2 steps


@pytest.mark.slow
def test_ctrl_c_from_the_terminal_with_workers(tmp_path, synth):
    "SIGINT to the whole process group (what Ctrl-C does): the run finishes its step, saves and exits."
    import time
    script = tmp_path / "run_train.py"
    script.write_text(RUN_SCRIPT.format(tests=str(TESTS)))
    args = {**data_args(synth, epochs=1000, batch_size=2, workers=2), "work_dir": str(tmp_path / "run"), "out": "x"}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 6): time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt: training interrupted; checkpoint saved to" in err, err[-3000:]
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    steps = [json.loads(l)["step"] for l in log.read_text().splitlines()]
    assert state["global_step"] == steps[-1] >= 6  # the checkpoint is the last step that was logged
