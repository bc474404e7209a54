# Developer entry points for deepseek-hf.
#   make venv   - create .venv (torch 2.13.0 CPU first, then this package with the dev extra)
#   make test   - run the test suite
#   make demo   - small pretraining demo on Python stdlib sources (about 4-7 min on 2 CPU cores)
#   make bench  - run benchmarks (if present)
#   make clean  - remove build outputs and demo runs (keeps .venv; `make distclean` removes it too)

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .venv-stamp
TORCH_VERSION := 2.13.0
TORCH_WHEEL := /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
PYTEST_FLAGS ?= -x -q -p no:cacheprovider --timeout=600

.PHONY: venv test demo bench clean distclean

venv: $(STAMP)

# The stamp is rebuilt only when it is missing or pyproject.toml changed, so repeated runs are fast.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" >/dev/null 2>&1; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif [ -f "$(TORCH_WHEEL)" ] && $(PY) -m pip install "$(TORCH_WHEEL)"; then \
		echo "installed torch from $(TORCH_WHEEL)"; \
	else \
		$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_FLAGS) tests

demo: venv
	$(PY) examples/pretrain.py --config hub_configs/small --output runs/demo

bench: venv
	@if [ -f benchmarks/run.py ]; then \
		$(PY) -m benchmarks.run; \
	else \
		echo "benchmarks/run.py not present; nothing to run"; \
	fi

clean:
	rm -rf build dist *.egg-info runs $(STAMP) .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
