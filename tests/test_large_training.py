"""Training what does not fit: activation checkpointing (equal gradients), frozen parts, the weight average (EMA:
the official formula, evaluation and export with it, exact resume after SIGKILL), warm-up, layer-wise decay from the
command line."""
import json
import math
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from codetr.core.config import override
from codetr.data.coco import build_dataset, collate
from codetr.engine.checkpoint import latest_checkpoint
from codetr.engine.evaluate import evaluate, shard_loader
from codetr.engine.run_state import warmup_factor
from codetr.engine.train import Trainer
from codetr.engine.train_args import cli_options as _cli_options, train_parser as _train_parser
from codetr.models.co_deformable_detr import co_deformable_detr_tiny
from codetr.models.detector import build_model
from codetr.models.presets import run_config

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_train import SMALL_AUG, TinyDetectorDouble, data_args, run_script, synth, tiny_cfg, train_set, val_set  # noqa: E402,F401


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["co_deformable_detr_tiny", "co_dino_tiny"])
def test_grad_checkpointing_gives_equal_gradients(preset, train_set):
    "Backbone blocks and every encoder layer recomputed in backward: the same loss and gradients as the plain model."
    plain_cfg = run_config(preset, num_classes=train_set.num_classes).without_pretrained()
    layers = plain_cfg.query_head.transformer.num_encoder_layers
    cp_cfg = override(plain_cfg, **{"backbone.with_cp": "True", "query_head.transformer.with_cp": str(layers)})
    batch = collate([train_set[0], train_set[1]])
    results = []
    for cfg in (plain_cfg, cp_cfg):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if results: model.load_state_dict(results[0][2])
        losses = model(batch.images, batch.targets, pad_mask=batch.pad_mask)
        sum(v for k, v in losses.items() if "loss" in k).backward()
        results.append(({k: v.detach() for k, v in losses.items()}, grads(model), model.state_dict()))
    (l0, g0, _), (l1, g1, _) = results
    assert cp_cfg.backbone.with_cp and cp_cfg.query_head.transformer.with_cp == layers
    assert l0.keys() == l1.keys() and g0.keys() == g1.keys() and len(g0) > 50
    for k in l0: torch.testing.assert_close(l1[k], l0[k], rtol=1e-5, atol=1e-6)
    for k in g0: torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_cli_switches_become_the_config():
    args = _train_parser().parse_args(["co_deformable_detr_tiny", "--grad-checkpoint", "backbone", "encoder",
                                       "--freeze", "backbone", "--ema", "--epochs", "3",
                                       "--cfg-options", "optim.lr=1e-3"])
    cfg = run_config("co_deformable_detr_tiny", _cli_options(args))
    assert (cfg.backbone.with_cp, cfg.query_head.transformer.with_cp) == (True, cfg.query_head.transformer.num_encoder_layers)
    assert (cfg.optim.frozen, cfg.optim.ema_momentum, cfg.optim.epochs, cfg.optim.lr) == (("backbone",), 1e-4, 3, 1e-3)
    vit = run_config("co_dino_vit_tiny_synthetic", _cli_options(_train_parser().parse_args(
        ["co_dino_vit_tiny_synthetic", "--layer-decay", "0.8", "--ema", "0.001"])))
    assert (vit.optim.layer_decay, vit.optim.ema_momentum) == (0.8, 0.001)
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        run_config("co_deformable_detr_tiny", ["optim.layer_decay=1.5"])


def test_vit_preset_is_the_official_recipe():
    "Spec: the ViT-L config trains with layer decay 0.8 over 24 blocks, EMA momentum 1e-4, 500 warm-up steps from 1%."
    o = run_config("co_dino_5scale_vit_large_coco").optim
    assert (o.lr, o.weight_decay, o.layer_decay, o.ema_momentum, o.ema_warmup, o.warmup_iters, o.warmup_ratio) == \
        (5e-5, 0.01, 0.8, 1e-4, 2000, 500, 0.01)


def test_frozen_backbone_stays_fixed(tmp_path, train_set):
    "A frozen backbone: out of the optimiser, weights and BatchNorm statistics unchanged after training; the rest learns."
    cfg = run_config("co_deformable_detr_tiny", ["optim.epochs=1", "optim.batch_size=4", "optim.frozen=('backbone',)"],
                     num_classes=train_set.num_classes).without_pretrained()
    trainer = Trainer(cfg, train_set, tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in trainer.model.backbone.parameters())
    trainer.fit()
    after = trainer.model.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("query_head."))


def test_ema_is_what_validation_and_export_use(tmp_path, train_set, val_set):
    cfg = tiny_cfg(epochs=1, batch_size=4)
    cfg = replace(cfg, optim=replace(cfg.optim, ema_momentum=0.3, ema_warmup=1))
    trainer = Trainer(cfg, train_set, tmp_path, val_set=val_set, model_factory=TinyDetectorDouble, progress=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hand, step = dict(start), 0
    step_fn = trainer._apply_step
    def record(bad):  # the official formula, applied by hand after every optimiser step
        nonlocal hand, step
        out = step_fn(bad)
        m = (1 - 0.3) * math.exp(-(1 + step) / 1) + 0.3
        hand = {k: (1 - m) * v + m * trainer.model.state_dict()[k] for k, v in hand.items()}
        step += 1
        return out
    trainer._apply_step = record
    trainer.fit()
    assert step == 2
    averaged = trainer.weights()
    for k, v in hand.items(): torch.testing.assert_close(averaged[k], v, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(averaged["head.weight"], trainer.model.state_dict()["head.weight"])
    live = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.validate()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in live.items())  # live weights back
    twin = TinyDetectorDouble(cfg); twin.load_state_dict(averaged)
    want, _ = evaluate(twin, shard_loader(val_set, 4, 0), val_set, torch.device("cpu"), progress=False)
    assert metrics["AP"] == want["AP"]


@pytest.mark.slow
def test_exact_resume_after_sigkill_with_ema_and_warmup(tmp_path, synth):
    "The weight average and the warm-up continue bit for bit after a kill between checkpoints."
    optim = {"ema_momentum": 0.01, "ema_warmup": 3, "warmup_iters": 5, "warmup_ratio": 0.1}
    base = data_args(synth, epochs=2, batch_size=2, interval=2, optim=optim)
    done = run_script(tmp_path, {**base, "work_dir": str(tmp_path / "plain"), "out": str(tmp_path / "plain.pt")})
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run_script(tmp_path, {**base, "work_dir": str(tmp_path / "killed"), "out": str(tmp_path / "never.pt"),
                                   "kill_at": [1, 3]})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_script(tmp_path, {**base, "work_dir": str(tmp_path / "killed"), "out": str(tmp_path / "resumed.pt"),
                                    "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "resumed.pt")
    for key in ("model", "weights"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    assert not torch.equal(a["weights"]["head.weight"], a["model"]["head.weight"])
    assert a["AP"] == b["AP"]
    log = [json.loads(l) for l in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if r["mode"] == "train"]
    want = [1e-2 * warmup_factor(s, replace(tiny_cfg().optim, **optim)) for s in range(len(lrs))]
    assert lrs == pytest.approx(want, rel=1e-9) and lrs[0] == pytest.approx(1e-3)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume_anywhere(tmp_path, synth):
    "FSDP over two gloo processes takes the steps one unsharded process takes; its checkpoint is a whole file."
    one = run_script(tmp_path, {**data_args(synth, epochs=2, batch_size=4), "work_dir": str(tmp_path / "one"),
                                "out": str(tmp_path / "one.pt")})
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script(tmp_path, {**data_args(synth, epochs=2, batch_size=2), "work_dir": str(tmp_path / "two"),
                                "out": str(tmp_path / "two.pt"), "fsdp": True}, nproc=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k, v in a["weights"].items(): torch.testing.assert_close(b["weights"][k], v, rtol=1e-5, atol=1e-6)
    assert math.isclose(a["AP"], b["AP"], abs_tol=1e-6)
    state = torch.load(latest_checkpoint(tmp_path / "two"), weights_only=True)
    assert state["optimizer_by_name"] and set(state["model"]) == set(a["model"])
    for k, v in a["model"].items(): torch.testing.assert_close(state["model"][k], v, rtol=1e-5, atol=1e-6)
    # the sharded run's checkpoint resumes in one unsharded process (one more epoch, from the same state)
    more = run_script(tmp_path, {**data_args(synth, epochs=3, batch_size=4), "work_dir": str(tmp_path / "two"),
                                 "out": str(tmp_path / "more.pt"), "resume": True})
    assert more.returncode == 0, more.stderr[-3000:]
    cont = run_script(tmp_path, {**data_args(synth, epochs=3, batch_size=4), "work_dir": str(tmp_path / "one"),
                                 "out": str(tmp_path / "cont.pt"), "resume": True})
    assert cont.returncode == 0, cont.stderr[-3000:]
    c, d = torch.load(tmp_path / "cont.pt"), torch.load(tmp_path / "more.pt")
    for k, v in c["weights"].items(): torch.testing.assert_close(d["weights"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_keeps_the_weight_average(tmp_path, synth):
    "EMA under FSDP: two sharded processes keep the average one unsharded process keeps, saved whole; it resumes both ways."
    optim = {"ema_momentum": 0.2, "ema_warmup": 2}
    runs = {"one": (4, 1), "two": (2, 2)}  # batch per process, processes
    for name, (batch, nproc) in runs.items():
        proc = run_script(tmp_path, {**data_args(synth, epochs=2, batch_size=batch, optim=optim), "fsdp": nproc > 1,
                                     "work_dir": str(tmp_path / name), "out": str(tmp_path / f"{name}.pt")}, nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert not torch.allclose(a["weights"]["head.weight"], a["model"]["head.weight"])  # the average is not the live model
    for k, v in a["weights"].items(): torch.testing.assert_close(b["weights"][k], v, rtol=1e-5, atol=1e-6)
    assert math.isclose(a["AP"], b["AP"], abs_tol=1e-6)  # validation used the average in both
    sa, sb = (torch.load(latest_checkpoint(tmp_path / n), weights_only=True)["ema"] for n in runs)
    assert sa["updates"] == sb["updates"] > 0 and set(sa["shadow"]) == set(sb["shadow"])
    for k, v in sa["shadow"].items(): torch.testing.assert_close(sb["shadow"][k], v, rtol=1e-5, atol=1e-6)  # whole tensors
    # the sharded checkpoint resumes sharded (the average scattered back into shards) and unsharded: one more epoch each
    shutil.copytree(tmp_path / "two", tmp_path / "two_whole")
    for name, (batch, nproc), out in (("two", runs["two"], "more_sharded"), ("two_whole", runs["one"], "more_whole"),
                                      ("one", runs["one"], "cont")):
        proc = run_script(tmp_path, {**data_args(synth, epochs=3, batch_size=batch, optim=optim), "fsdp": nproc > 1,
                                     "work_dir": str(tmp_path / name), "out": str(tmp_path / f"{out}.pt"), "resume": True},
                          nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    want = torch.load(tmp_path / "cont.pt")["weights"]
    for out in ("more_sharded", "more_whole"):
        got = torch.load(tmp_path / f"{out}.pt")["weights"]
        for k, v in want.items(): torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_command_line_trains_a_real_preset(tmp_path, synth):
    "torchrun -m codetr.engine.train --fsdp --ema on the tiny Co-Deformable-DETR (scalar ATSS scales, frozen stem): to the end."
    import os, subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "codetr.engine.train",
           "co_deformable_detr_tiny", "--train-images", str(synth.train_images), "--train-ann", str(synth.train_json),
           "--val-images", str(synth.val_images), "--val-ann", str(synth.val_json), "--work-dir", str(tmp_path / "run"),
           "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--fsdp",
           "--grad-checkpoint", "encoder", "--ema", "0.01", "--cfg-options", "aug.scales=(48,64)", "aug.max_size=96",
           "aug.crop_scales=(48,)", "aug.crop_range=(32,48)", "aug.test_scale=64", "aug.test_max_size=96"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    proc = run()
    if proc.returncode and "terminate called without an active exception" in proc.stderr: proc = run()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["AP"] <= 1 and (tmp_path / "run" / "model.safetensors").exists()
    state = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    model = build_model(run_config("co_deformable_detr_tiny", num_classes=6).without_pretrained())
    model.load_state_dict(state["model"])  # a whole state dict, loadable without FSDP


@pytest.mark.parametrize("preset", ["co_dino_tiny", "co_dino_vit_tiny_synthetic", "co_deformable_detr_swin_tiny_synthetic"])
def test_bf16_training_step_on_the_new_models(preset, train_set):
    "bf16 autocast on the CPU through Co-DINO, ViT and Swin: finite losses near fp32's and finite gradients everywhere."
    from codetr.engine.run_state import autocast_for
    from codetr.models.detector import total_loss
    cfg = run_config(preset, num_classes=train_set.num_classes).without_pretrained()
    batch = collate([train_set[0], train_set[1]])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad(): fp32 = total_loss(model(batch.images, batch.targets, pad_mask=batch.pad_mask))
    torch.manual_seed(0)
    with autocast_for(torch.device("cpu"), "bf16"): loss = total_loss(model(batch.images, batch.targets, pad_mask=batch.pad_mask))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.05 * fp32.item()
    g = grads(model)
    assert len(g) > 50 and all(torch.isfinite(v).all() for v in g.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs two CUDA devices")
def test_fsdp_on_two_gpus(tmp_path, synth):
    "The GPU path: torchrun --fsdp on two CUDA devices (NCCL), the tiny Co-DINO to the end."
    import os, subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "codetr.engine.train",
           "co_dino_tiny", "--train-images", str(synth.train_images), "--train-ann", str(synth.train_json),
           "--val-images", str(synth.val_images), "--val-ann", str(synth.val_json), "--work-dir", str(tmp_path / "run"),
           "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--fsdp", "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 0 <= json.loads((tmp_path / "run" / "metrics.json").read_text())["AP"] <= 1
