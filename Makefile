# One command sets up and runs the main job; one runs the tests. A venv in .venv holds the stack.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# Rules call `python -m moebench...`: the venv's python must come first on PATH for every job.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test report lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-gpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	if [ -n "$(GPU)" ]; then $(PY) -m pip install -q -r requirements-gpu.txt; fi
	touch $@

run: setup  ## the whole chain; the CPU tier when no GPU is present
	$(VENV)/bin/snakemake --cores $(CORES)

report: setup
	$(VENV)/bin/snakemake --report report.html

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/snakemake --lint
