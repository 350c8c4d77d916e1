"""Run every notebook under nbs/ top to bottom, so each lesson's assertions count in pytest's summary.

Cells flagged `#| slow` or `#| cuda` are skipped, as `nbdev_test` does by default; set CODETR_NB_FLAGS="slow" (or
"slow cuda") to run them too. Each notebook runs in its own process so global state cannot leak between lessons.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (REPO / "nbs").rglob("*.ipynb")
             if not any(part.startswith(("_", ".")) for part in p.relative_to(REPO / "nbs").parts))

RUNNER = """
import sys
from pathlib import Path
from nbdev.test import test_nb
flags = {"slow", "cuda"} - set(sys.argv[2].split())
ok, secs = test_nb(Path(sys.argv[1]), skip_flags=sorted(flags), showerr=True)
print(f"{sys.argv[1]}: {'ok' if ok else 'FAILED'} in {secs:.1f}s")
sys.exit(0 if ok else 1)
"""


@pytest.mark.parametrize("nb", NBS, ids=[str(p.relative_to(REPO / "nbs")) for p in NBS])
def test_notebook_runs(nb: Path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0")
    if os.environ.get("PYTEST_XDIST_WORKER"): env.setdefault("OMP_NUM_THREADS", "1")  # one core per worker
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(nb), os.environ.get("CODETR_NB_FLAGS", "")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{nb.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def test_notebooks_found():
    assert any(p.name.startswith("00_") for p in NBS), "no lesson notebooks found under nbs/"
