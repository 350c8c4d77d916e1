"""Shared pytest set-up: markers, paths, and a headless matplotlib."""
import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Under pytest-xdist every worker gets one thread: two workers on two cores, no oversubscription
    # (tiny convolutions run many times slower when threads fight over cores).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords: item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    "The shared reference data folder (../shared/data next to the repository, or $CODETR_SHARED_DATA)."
    return Path(os.environ.get("CODETR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def explorer_env(tmp_path_factory):
    "A fresh tiny model, its config at half the test size, and 4 small synthetic validation images (explore, widgets)."
    from dataclasses import replace
    from codetr.workbench.explore import explorer_model, open_dataset
    from codetr.data.synthetic import make_synthetic_coco
    work = tmp_path_factory.mktemp("explorer")
    synth = make_synthetic_coco(work / "synthetic", n_train=0, n_val=4, min_size=80, max_size=112, seed=5)
    model, cfg = explorer_model(seed=0)
    cfg = replace(cfg, aug=cfg.aug.scaled(0.5))
    ds = open_dataset(synth.val_images, synth.val_json, aug=cfg.aug)
    return dict(work=work, synth=synth, model=model, cfg=cfg, ds=ds)


@pytest.fixture(scope="module")
def explorer_asg(explorer_env):
    "`head_assignments` on images 0 and 1 with seed 0."
    from codetr.workbench.explore import head_assignments
    return [head_assignments(explorer_env["model"], explorer_env["ds"], i, seed=0) for i in range(2)]
