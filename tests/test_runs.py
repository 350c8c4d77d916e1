"""Papermill smoke runs of the run templates nbs/runs/train.ipynb and nbs/runs/evaluate.ipynb.

Each executes the template with a couple of training iterations on a few synthetic images and checks the run
folder: the executed notebook (with outputs), the checkpoint, the exported weights, the log and metrics.json.
"""
import json
import os
from pathlib import Path

import papermill as pm
import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "nbs" / "runs"
THREADS = 1  # tiny tensors: one intra-op thread is fastest on a shared CPU


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    "A private synthetic-data folder, so the test neither reads nor writes the user's cache."
    path = tmp_path_factory.mktemp("data")
    old = os.environ.get("CODETR_DATA_DIR")
    os.environ["CODETR_DATA_DIR"] = str(path)  # papermill's kernel inherits it
    yield path
    if old is None: os.environ.pop("CODETR_DATA_DIR", None)
    else: os.environ["CODETR_DATA_DIR"] = old


def execute(name: str, out: Path, **parameters) -> dict:
    "Run a template with papermill, the repository as working directory; return the executed notebook."
    pm.execute_notebook(str(RUNS / name), str(out), parameters=parameters, cwd=str(REPO), kernel_name="python3",
                        progress_bar=False)
    return json.loads(out.read_text())


def cell_text(nb: dict) -> str:
    "All stream and text outputs of an executed notebook."
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            parts.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def has_image(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    "A two-iteration training run (4 images, batch 2, one epoch) through the train template."
    work = tmp_path_factory.mktemp("run")
    execute("train.ipynb", work / "train.ipynb", SMOKE=True, N_TRAIN=4, N_VAL=2, EPOCHS=1, BATCH_SIZE=2, SEED=1,
            WORK_DIR=str(work), NUM_THREADS=THREADS, DEVICE="cpu", N_SHOW=2)
    return work


def test_train_notebook_writes_the_run(trained):
    work = trained
    assert (work / "train.ipynb").is_file()
    assert (work / "epoch_0001_iter_000000.pt").is_file() and (work / "latest").read_text().strip() == "epoch_0001_iter_000000.pt"
    assert (work / "model.safetensors").is_file() and (work / "config.json").is_file()
    steps = [json.loads(l) for l in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["mode"] == "train"] == [1, 2]
    metrics = json.loads((work / "metrics.json").read_text())
    assert {"AP", "AP50", "per_class_AP", "epoch"} <= set(metrics) and metrics["epoch"] == 1
    assert (work / "detections.json").is_file()


def test_train_notebook_shows_curves_table_and_predictions(trained):
    nb = json.loads((trained / "train.ipynb").read_text())
    text = cell_text(nb)
    assert "python -m codetr.engine.train co_deformable_detr_tiny" in text and "AP50" in text and "2 steps" in text
    assert has_image(nb) >= 2  # loss/lr curves and the predictions grid
    params = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert "N_TRAIN = 4" in "".join(params["source"])


def test_evaluate_notebook_on_the_trained_run(trained, tmp_path):
    nb = execute("evaluate.ipynb", tmp_path / "evaluate.ipynb", WORK_DIR=str(tmp_path), N_VAL=2,
                 CHECKPOINT=str(trained / "epoch_0001_iter_000000.pt"), NUM_THREADS=THREADS, DEVICE="cpu", N_SHOW=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["per_class_AP"]) == {"ellipse", "rectangle", "triangle", "ring", "cross", "star"}
    assert (tmp_path / "detections.json").is_file() and (tmp_path / "evaluate.ipynb").is_file()
    assert "python -m codetr.engine.evaluate co_deformable_detr_tiny" in cell_text(nb) and has_image(nb) >= 2


def test_evaluate_notebook_finds_the_checkpoint_in_the_work_dir(trained, tmp_path):
    nb = execute("evaluate.ipynb", tmp_path / "evaluate.ipynb", WORK_DIR=str(trained), N_VAL=2,
                 NUM_THREADS=THREADS, DEVICE="cpu", N_SHOW=1)
    assert f"checkpoint: {trained / 'epoch_0001_iter_000000.pt'}" in cell_text(nb)


@pytest.mark.slow
def test_train_notebook_under_torchrun(tmp_path, data_dir):
    "NPROC=2 launches two gloo processes; their log is streamed into the notebook."
    work = tmp_path / "run"
    nb = execute("train.ipynb", tmp_path / "train.ipynb", SMOKE=True, N_TRAIN=4, N_VAL=2, EPOCHS=1, BATCH_SIZE=1,
                 WORK_DIR=str(work), NPROC=2, NUM_THREADS=THREADS, DEVICE="cpu", N_SHOW=1)
    assert (work / "metrics.json").is_file() and (work / "epoch_0001_iter_000000.pt").is_file()
    state = __import__("torch").load(work / "epoch_0001_iter_000000.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert "AP50" in cell_text(nb)  # rank 0's AP table, streamed from the torchrun log
