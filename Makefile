# Developer entry points for deepseek-hf.
#   make venv         - create .venv: torch 2.13.0 CPU first, then this package with the dev extra, every dependency at
#                       the exact version in .ci/constraints.txt (the lower end of the range pyproject.toml declares)
#   make test         - run the test suite in .venv (the pinned versions)
#   make venv-latest  - create .venv-latest: the same, with the newest releases pyproject.toml allows
#   make test-latest  - run the test suite in .venv-latest
#   make demo         - small pretraining demo on Python stdlib sources (about 4-7 min on 2 CPU cores)
#   make serve        - serve the `make demo` model (runs/demo/final) with the OpenAI-compatible server from .venv-latest
#                       (it needs transformers >= 5.25); SERVE_MODEL, SERVE_HOST, SERVE_PORT, SERVE_ARGS to change it
#   make grpo-demo    - GRPO learning curve: a small DeepSeek learns two-digit sums (about 6 min on 2 CPU cores)
#   make r1-demo      - the R1 recipe end to end on Countdown (cold start, GRPO, rejection sampling, SFT,
#                       distillation into a dense Llama; random-reward and R1-Zero controls in a second process),
#                       each stage measured on 300 held-out problems (17.6 min measured on 2 idle CPU cores, seed 2:
#                       benchmarks/RESULTS.md)
#   make bench        - run benchmarks (if present)
#   make docs         - build the documentation site into site/ (mkdocs --strict: a broken link or reference fails)
#   make clean        - remove build outputs and demo runs (keeps the venvs; `make distclean` removes them too)

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VENV_LATEST := .venv-latest
PY := $(VENV)/bin/python
PY_LATEST := $(VENV_LATEST)/bin/python
CONSTRAINTS := .ci/constraints.txt
TORCH_VERSION := 2.13.0
TORCH_WHEEL := /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
PYTEST_FLAGS ?= -x -q -p no:cacheprovider --timeout=600

.PHONY: venv venv-latest test test-latest demo serve grpo-demo r1-demo bench docs clean distclean

venv: $(VENV)/.stamp
venv-latest: $(VENV_LATEST)/.stamp

# $(call torch_first,VENV_DIR): the venv, holding torch $(TORCH_VERSION) (the local CPU wheel when there is one).
define torch_first
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	@if $(1)/bin/python -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" >/dev/null 2>&1; then \
		echo "$(1): torch $(TORCH_VERSION) already installed"; \
	elif [ -f "$(TORCH_WHEEL)" ] && $(1)/bin/python -m pip install "$(TORCH_WHEEL)"; then \
		echo "$(1): installed torch from $(TORCH_WHEEL)"; \
	else \
		$(1)/bin/python -m pip install "torch==$(TORCH_VERSION)"; \
	fi
endef

# The stamps are rebuilt only when missing or when pyproject.toml / the constraints changed, so repeated runs are fast.
# Pinned: pip moves every installed package named in the constraints to its exact version (up or down).
$(VENV)/.stamp: pyproject.toml $(CONSTRAINTS)
	$(call torch_first,$(VENV))
	$(PY) -m pip install -c $(CONSTRAINTS) -e '.[dev,docs]'
	@$(PY) -m pip check
	@touch $@

# Latest: every dependency upgraded to the newest release pyproject.toml allows; torch stays $(TORCH_VERSION).
$(VENV_LATEST)/.stamp: pyproject.toml
	$(call torch_first,$(VENV_LATEST))
	$(PY_LATEST) -m pip install --upgrade --upgrade-strategy eager "torch==$(TORCH_VERSION)" -e '.[dev,docs]'
	@$(PY_LATEST) -m pip check
	@touch $@

test: venv
	@$(PY) -c "import transformers, trl, peft, accelerate as a; print('pinned: transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', a.__version__)"
	$(PY) -m pytest $(PYTEST_FLAGS) tests

test-latest: venv-latest
	@$(PY_LATEST) -c "import transformers, trl, peft, accelerate as a; print('latest: transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', a.__version__)"
	$(PY_LATEST) -m pytest $(PYTEST_FLAGS) tests

demo: venv
	$(PY) examples/pretrain.py --config hub_configs/small --output runs/demo

SERVE_MODEL ?= runs/demo/final
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
SERVE_ARGS ?= --continuous-batching --device cpu
# The server needs transformers >= 5.25, which .venv-latest has (.venv holds the pinned lower end). A key:
# DEEPSEEK_API_KEY=... make serve, or SERVE_ARGS="... --api-key KEY".
serve: venv-latest
	@test -d $(SERVE_MODEL) || { echo "no model in $(SERVE_MODEL): run 'make demo' first (or set SERVE_MODEL)"; exit 1; }
	$(PY_LATEST) -m modeling_deepseek.serve $(SERVE_MODEL) --host $(SERVE_HOST) --port $(SERVE_PORT) $(SERVE_ARGS)

grpo-demo: venv
	$(PY) examples/grpo_arithmetic.py --output runs/grpo_arithmetic

r1-demo: venv
	$(PY) examples/r1_pipeline.py --output runs/r1_pipeline

bench: venv
	@if [ -f benchmarks/run.py ]; then \
		$(PY) -m benchmarks.run; \
	else \
		echo "benchmarks/run.py not present; nothing to run"; \
	fi

docs: venv
	$(PY) -m mkdocs build --strict

clean:
	rm -rf site build dist *.egg-info runs .venv-stamp $(VENV)/.stamp $(VENV_LATEST)/.stamp .pytest_cache
	find . -path ./$(VENV) -prune -o -path ./$(VENV_LATEST) -prune -o -type d -name __pycache__ -prune \
		-exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VENV_LATEST)
