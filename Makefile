# One command sets up and runs the main job; one runs the tests. A venv in .venv holds the stack.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# Rules call `python -m moebench...`: the venv's python must come first on PATH for every job.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test report config-doc docs lint
setup: $(VENV)/.installed

# The pinned stack first, then moebench itself as an editable package (pyproject.toml: scripts/moebench), so every
# python of the venv imports it. --no-build-isolation: the venv's setuptools builds it, no download needed.
$(VENV)/.installed: requirements.txt requirements-gpu.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	if [ -n "$(GPU)" ]; then $(PY) -m pip install -q -r requirements-gpu.txt; fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# A run killed earlier leaves Snakemake's lock behind: moebench.unlock clears it when it is certainly stale (no
# Snakemake in this directory on this host, local filesystem) and otherwise prints the exact --unlock command.
run: setup  ## the whole chain; the CPU tier when no GPU is present
	$(PY) -m moebench.unlock --snakemake $(VENV)/bin/snakemake
	$(VENV)/bin/snakemake --cores $(CORES) --rerun-incomplete

report: setup
	$(VENV)/bin/snakemake --report report.html
	@echo "report: $(abspath report.html)"

test: setup
	$(PY) -m pytest -q tests

# config/README.md lists every config key; it is generated from workflow/schemas/config.schema.yaml.
config-doc: setup
	$(PY) -m moebench.report.configdoc --out config/README.md

# README.md and docs/results.md: results figures rendered from the committed runs' provenance (templates in
# docs/templates/); docs/figures.json lists each figure's provenance ids, a revision of its own hash chain
# (audits/.ots-history/cross-run-figures/), stamped here (offline: recorded as unstamped; `snakemake ots_upgrade`).
docs: setup
	$(PY) -m moebench.report.readme
	-$(PY) -m moebench.stamp stamp --provenance docs/figures.json --out docs/figures.stamp.json \
		--log audits/figures-stamp.log

lint: setup
	$(VENV)/bin/snakemake --lint
