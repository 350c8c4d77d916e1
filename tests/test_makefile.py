"""The Makefile's user-facing targets: `make run` streams its progress to the terminal without warnings (its own
papermill command, run in smoke mode), `make lab` works for root."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.fixture
def fake_bin(tmp_path):
    "A bin folder whose `jupyter` and `papermill` print their arguments; an existing file as the install stamp."
    for tool in ("jupyter", "papermill"):
        script = tmp_path / tool
        script.write_text("#!/bin/sh\necho \"$0 $@\"\n")
        script.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.write_text("")
    return tmp_path, stamp


def test_lab_passes_allow_root_only_to_root(fake_bin):
    bin_dir, stamp = fake_bin
    out = make("lab", f"BIN={bin_dir}", f"STAMP={stamp}")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith(str(bin_dir / "jupyter")))
    assert ("--allow-root" in line.split()) == (os.geteuid() == 0)


@pytest.mark.slow
def test_run_streams_progress_without_warnings(tmp_path):
    "`make run`'s own command (from `make -n`), in smoke mode: the epoch line with the time left reaches the terminal, no warning."
    out = make("-n", "run", f"RUN_DIR={tmp_path / 'run'}", f"STAMP={REPO / 'Makefile'}")
    assert out.returncode == 0, out.stderr
    cmd = next(l for l in out.stdout.replace("\\\n", " ").splitlines() if "nbs/runs/train.ipynb" in l)
    assert "codetr.engine.runs" in shlex.split(cmd) and "-p SMOKE False" in cmd
    smoke = cmd.replace("-p SMOKE False", "-p SMOKE True")  # the same command on 8 images for one epoch
    (tmp_path / "run").mkdir()  # make run creates it first
    proc = subprocess.run(["bash", "-c", smoke], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    streamed = proc.stdout + proc.stderr
    assert "epoch 1/1:" in streamed and "AP50" in streamed  # the epoch line and the AP table, as they happen
    assert "MissingIDFieldWarning" not in streamed and "without encryption" not in streamed
    assert "WARNING" not in streamed and "Traceback" not in streamed
    assert re.search(r"epoch 1/1: \d+ steps, .* s/step\), \S+ left", streamed)  # the time left on the epoch line
