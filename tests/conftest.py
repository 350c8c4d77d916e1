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
