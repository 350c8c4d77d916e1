"""The official parity references (`../shared/parity`, or $CODETR_SHARED_PARITY): finding a reference folder (a
skip, or a failure when $CODETR_REQUIRE_SHARED is set, when it is missing), rebuilding its weights from their key
names with the reference's own `fill.py` / `fill_v2.py`, and the fixed input every reference was run on."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("CODETR_SHARED_PARITY", REPO.parent / "shared" / "parity"))
REQUIRED = os.environ.get("CODETR_REQUIRE_SHARED", "") not in ("", "0")
FILES = ("keys.txt", "meta.json", "outputs.npz", "params.json")


def missing_reference(msg: str):
    "Fail where the shared references are required (CI), skip elsewhere."
    if REQUIRED: pytest.fail(msg)
    pytest.skip(msg)


def reference_folder(name: str, files: tuple[str, ...] = FILES, fill: str = "fill.py") -> Path:
    "The folder of reference `name`, checked for `files` and the `fill` script beside it."
    folder = PARITY / name
    missing = [f for f in files if not (folder / f).is_file()] + ([] if (PARITY / fill).is_file() else [f"../{fill}"])
    if missing: missing_reference(f"official parity reference {folder} lacks {missing} (set CODETR_SHARED_PARITY to its folder)")
    return folder


def fill_module(fill: str = "fill.py"):
    "The reference's weight-rebuilding script, imported from its file."
    spec = importlib.util.spec_from_file_location(f"codetr_parity_{Path(fill).stem}", PARITY / fill)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parity_input(folder: Path) -> np.ndarray:
    "The fixed (1, 3, 512, 512) float32 input of every reference (N(0, 1), numpy seeded 0), checked against `folder`'s."
    x = np.random.default_rng(0).normal(0, 1, size=(1, 3, 512, 512)).astype(np.float32)
    np.testing.assert_array_equal(x[0, :, 0, :8], np.load(folder / "outputs.npz")["input_head"])
    return x


def load_reference(name: str, files: tuple[str, ...] = FILES, fill: str = "fill.py") -> dict:
    "name, folder, meta, the rebuilt official state dict (fingerprint checked), the input image and the outputs."
    folder = reference_folder(name, files, fill)
    meta = json.loads((folder / "meta.json").read_text())
    script = fill_module(fill)
    sd = script.fill_state_dict(script.load_keys(folder / "keys.txt"))
    assert script.fingerprint(sd) == meta["weights"]["fingerprint"], f"{fill} did not rebuild the reference weights"
    x, out = parity_input(folder), dict(np.load(folder / "outputs.npz"))
    return dict(name=name, folder=folder, meta=meta, state_dict=sd, image=torch.from_numpy(x), out=out)
