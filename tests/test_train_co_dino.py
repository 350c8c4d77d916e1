"""Training runs of the real Co-DINO tiny model (not a test double): exact resume after SIGKILL with the denoising
queries' random draws, two gloo processes under torchrun, the command line from official-style weights, and the
papermill template. Small images keep each run to seconds."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codetr.engine.checkpoint import latest_checkpoint, to_official_state_dict
from codetr.engine.train import main
from codetr.models.co_dino import co_dino_tiny
from codetr.models.detector import build_model

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_train import SMALL_AUG, data_args, synth  # noqa: E402,F401  (synth is a fixture)

SCRIPT = r"""
import json, os, signal, sys
from dataclasses import replace
import torch
sys.path.insert(0, {tests!r})
from test_train import SMALL_AUG
from codetr.core.dist import init_device, is_dist, is_main_process
from codetr.data.coco import build_dataset
from codetr.engine.train import Trainer
from codetr.models.co_dino import co_dino_tiny
args = json.loads(sys.argv[1])
init_device("cpu")
torch.set_num_threads(1)
train = build_dataset("train", args["images"], args["ann"], aug=SMALL_AUG)
cfg = co_dino_tiny(train.num_classes)
cfg = replace(cfg, aug=SMALL_AUG, optim=replace(cfg.optim, epochs=args["epochs"], batch_size=args["batch_size"], lr_steps=(2,)))
trainer = Trainer(cfg, train, args["work_dir"], progress=False, checkpoint_interval=args.get("interval", 0))
kill_at = args.get("kill_at")
if kill_at:
    log_step = trainer._log_step
    def killing_log_step(*a, **k):
        out = log_step(*a, **k)
        if [trainer.epoch, trainer.iteration] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
        return out
    trainer._log_step = killing_log_step
trainer.fit(auto_resume=args.get("resume", False))
torch.save({{"model": trainer.model.state_dict()}}, args["out"] + f".rank{{int(os.environ.get('RANK', 0))}}")
if is_dist(): torch.distributed.destroy_process_group()
"""


def run(tmp_path, args, nproc=1):
    script = tmp_path / "run_co_dino.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + [str(script), json.dumps(args)], capture_output=True, text=True, env=env, timeout=600)


def train_losses(work_dir):
    return {r["step"]: r for r in map(json.loads, (work_dir / "log.jsonl").read_text().splitlines()) if r["mode"] == "train"}


@pytest.mark.slow
def test_co_dino_resumes_exactly_after_sigkill(tmp_path, synth):
    "The denoising draws, the RPN / RoI sampling and the data order all continue as if the run had never stopped."
    base = data_args(synth, epochs=2, batch_size=2, interval=1)
    plain = run(tmp_path, {**base, "work_dir": str(tmp_path / "plain"), "out": str(tmp_path / "plain.pt")})
    assert plain.returncode == 0, plain.stderr[-3000:]
    killed = run(tmp_path, {**base, "work_dir": str(tmp_path / "killed"), "out": str(tmp_path / "never.pt"),
                            "kill_at": [1, 2]})  # second epoch, after its 2nd batch
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "killed").name == "epoch_0001_iter_000001.pt"  # the killed step is redone
    resumed = run(tmp_path, {**base, "work_dir": str(tmp_path / "killed"), "out": str(tmp_path / "resumed.pt"), "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "plain.pt.rank0"), torch.load(tmp_path / "resumed.pt.rank0")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    p, k = train_losses(tmp_path / "plain"), train_losses(tmp_path / "killed")
    assert p.keys() == k.keys() and all(p[s]["loss"] == k[s]["loss"] for s in p)
    assert any(key.startswith("dn_") for key in p[1])  # the denoising losses are among the logged terms


@pytest.mark.slow
def test_co_dino_under_torchrun_with_two_processes(tmp_path, synth):
    "Two gloo processes train one model: both ranks end with the same weights, which moved from the start."
    two = run(tmp_path, {**data_args(synth, epochs=1, batch_size=2), "work_dir": str(tmp_path / "two"),
                         "out": str(tmp_path / "two.pt")}, nproc=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "two.pt.rank0")["model"], torch.load(tmp_path / "two.pt.rank1")["model"]
    # the same parameters; BatchNorm's running statistics are each rank's own (the tiny preset trains its BatchNorm,
    # the R50 presets freeze it) and rank 0's go into the checkpoints
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(v, r1[k]) for k, v in r0.items() if not k.endswith(stats))
    torch.manual_seed(0)
    start = build_model(co_dino_tiny(6)).state_dict()
    assert not torch.equal(start["query_head.label_embedding.weight"], r0["query_head.label_embedding.weight"])
    log = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in log] == ["train"] * 2  # 8 images, 2 per process: 2 steps, logged by rank 0 alone


def test_cli_fine_tunes_co_dino_from_official_weights(tmp_path, synth, capsys):
    "--load-from with an official-style file of another class count: the run starts from its weights."
    torch.manual_seed(1)
    src_cfg = co_dino_tiny(80)
    src = build_model(src_cfg)
    torch.save({"meta": {"epoch": 12, "CLASSES": ("person",) * 80}, "state_dict": to_official_state_dict(src.state_dict(), src_cfg)},
               tmp_path / "coco.pth")
    common = ["--train-images", str(synth.train_images), "--train-ann", str(synth.train_json), "--no-validate",
              "--work-dir", str(tmp_path / "run"), "--num-workers", "0", "--no-progress", "--epochs", "1",
              "--batch-size", "8", "--cfg-options", "optim.lr=0", "aug.scales=(48,)", "aug.max_size=64"]
    main(["co_dino_tiny", "--load-from", str(tmp_path / "coco.pth"), *common])
    assert "another class count" in capsys.readouterr().out
    out = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)["model"]
    key = "query_head.transformer.encoder.layers.0.self_attn.value_proj.weight"
    torch.testing.assert_close(out[key], src.state_dict()[key])  # lr 0: still the loaded weights
    assert out["query_head.label_embedding.weight"].shape[0] == 6
    # the run's safetensors export carries the config and the classes: the predictor and the evaluation CLI need
    # nothing else, and give the same detections
    from codetr.engine.evaluate import main as evaluate_main
    from codetr.engine.predict import load_predictor
    export = tmp_path / "run" / "model.safetensors"
    pred = load_predictor(export)
    assert pred.cfg.name == "co_dino_tiny" and pred.classes.names[0] == "ellipse"
    metrics = evaluate_main(["co_dino_tiny", "--checkpoint", str(export), "--images", str(synth.val_images),
                             "--ann", str(synth.val_json), "--work-dir", str(tmp_path / "eval")])
    assert 0 <= metrics["AP"] <= 100 and (tmp_path / "eval" / "detections.json").is_file()


@pytest.mark.slow
def test_train_template_runs_co_dino(tmp_path):
    "The papermill template of `make run` with PRESET=co_dino_tiny, smoke size."
    out = tmp_path / "train.ipynb"
    done = subprocess.run([str(Path(sys.executable).parent / "papermill"), str(REPO / "nbs/runs/train.ipynb"), str(out),
                           "-k", "python3", "--cwd", str(REPO), "-p", "PRESET", "co_dino_tiny", "-p", "WORK_DIR",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["AP"] <= 100
    assert "python -m codetr.engine.train co_dino_tiny" in out.read_text()
