# codetr: `make run` (the main job) and `make test` (the whole suite) each create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.codetr-installed

.PHONY: run test lab export clean-nbs check-sync setup

setup: $(STAMP)

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev,cuda]"
	$(BIN)/python -m pip check
	@touch $@

## The main job: train co_deformable_detr_tiny on the embedded synthetic dataset (generated once) with the papermill
## notebook nbs/runs/train.ipynb, evaluate it, print the AP table. `python -m codetr.engine.runs` is papermill with each
## cell's output streamed to the terminal as it runs (the command, one line per epoch with the time left, the AP
## table) and an encrypted kernel channel (no warning); the run folder gets the executed notebook.
## One process with two threads uses both cores of a small CPU (measured ~20% faster per step than two gloo
## processes of one thread each, RUN_NPROC=2 RUN_THREADS=1, which split the preset's batch of 4 into 2 x 2).
RUN_DIR ?= work_dirs/main
RUN_NPROC ?= 1
RUN_THREADS ?= 2
run: $(STAMP)
	@mkdir -p $(RUN_DIR)
	$(BIN)/python -m codetr.engine.runs nbs/runs/train.ipynb $(RUN_DIR)/train.ipynb --cwd . \
	  -p SMOKE False -p WORK_DIR $(RUN_DIR) -p NPROC $(RUN_NPROC) -p BATCH_SIZE $$((4 / $(RUN_NPROC))) -p NUM_THREADS $(RUN_THREADS)
	@$(BIN)/python -c "import json, sys; from codetr.engine.evaluate import ap_table; \
	  print(ap_table(json.load(open(sys.argv[1])))); print('run folder:', sys.argv[2])" $(RUN_DIR)/metrics.json $(RUN_DIR)

## The whole test suite: package and notebooks in sync, every notebook runs, pytest over tests/.
test: $(STAMP) check-sync
	$(BIN)/python -m pytest tests -n 2 -p no:cacheprovider -rs

## nbdev_export must leave codetr/ unchanged and nbdev_clean must leave nbs/ unchanged.
check-sync: $(STAMP)
	@before=$$(git diff -- codetr nbs | sha1sum; git status --porcelain -- codetr nbs); \
	$(BIN)/nbdev_export || exit 1; $(BIN)/nbdev_clean || exit 1; \
	after=$$(git diff -- codetr nbs | sha1sum; git status --porcelain -- codetr nbs); \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev_export / nbdev_clean changed codetr/ or nbs/: run them and commit the result:"; \
	  git status --porcelain -- codetr nbs; exit 1; fi; \
	echo "codetr/ matches the notebooks; notebooks are clean"

## Open the notebooks in JupyterLab (as root, e.g. in a container, with --allow-root, which JupyterLab requires there).
lab: $(STAMP)
	@root=""; if [ "$$(id -u)" = 0 ]; then root="--allow-root"; echo "running as root: starting JupyterLab with --allow-root"; fi; \
	$(BIN)/jupyter lab nbs $$root

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean
