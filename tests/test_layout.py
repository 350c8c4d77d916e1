"""The package's shape: areas import one way (core <- ops <- data <- backbones <- transformer <- heads <- models <-
engine <- workbench), modules stay short, no code switches on head names, every notebook builds the module its
folder and name say, and the public surface of `codetr` resolves."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "codetr"
AREAS = ["core", "ops", "data", "backbones", "transformer", "heads", "models", "engine", "workbench"]
MAX_LINES = 400
MODULES = sorted(p for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "_modidx.py"))


def area_of(path: Path) -> str:
    return path.relative_to(PKG).parts[0]


def imported_areas(path: Path) -> set[tuple[str, int]]:
    "(area, line) of every codetr module `path` imports (relative or absolute)."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 2 and node.module: out.add((node.module.split(".")[0], node.lineno))
            elif node.level == 1: out.add((area_of(path), node.lineno))
            elif node.level == 0 and node.module and node.module.startswith("codetr."):
                out.add((node.module.split(".")[1], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("codetr."): out.add((a.name.split(".")[1], node.lineno))
    return out


def test_every_module_is_in_an_area():
    assert {area_of(p) for p in MODULES} == set(AREAS)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PKG)) for p in MODULES])
def test_imports_flow_one_way(path):
    own = AREAS.index(area_of(path))
    upward = [(a, line) for a, line in imported_areas(path) if a in AREAS and AREAS.index(a) > own]
    assert not upward, f"{path.relative_to(REPO)} imports from higher areas: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PKG)) for p in MODULES])
def test_modules_stay_short(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines; split it (the convention is ~{MAX_LINES})"


def test_no_switch_on_head_names():
    "Heads are chosen by the type of their config object; no module compares strings against head kinds."
    pattern = re.compile(r"""(==|!=|\bin)\s*[\(\[{]?\s*["'](rcnn|atss|rpn|roi|detr|dino)["']""")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in MODULES
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_notebooks_build_the_module_their_path_names():
    for nb in sorted((REPO / "nbs").rglob("[0-9][0-9]_*.ipynb")):
        area, stem = nb.parent.name, nb.stem.split("_", 1)[1]
        text = nb.read_text()
        assert f"#| default_exp {area}.{stem}" in text, f"{nb.relative_to(REPO)} should export codetr.{area}.{stem}"


def test_public_surface():
    import codetr
    from codetr.engine.checkpoint import load_official
    from codetr.engine.evaluate import evaluate
    from codetr.engine.predict import load_predictor, predict_files
    from codetr.engine.train import Trainer
    from codetr.models.detector import build_model
    from codetr.models.presets import PRESETS, get_preset
    assert (codetr.build_model, codetr.get_preset, codetr.PRESETS, codetr.load_official, codetr.Trainer, codetr.evaluate,
            codetr.load_predictor, codetr.predict_files) == (build_model, get_preset, PRESETS, load_official, Trainer,
                                                             evaluate, load_predictor, predict_files)
    with pytest.raises(AttributeError, match="no attribute 'train_model'"): codetr.train_model
