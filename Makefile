# Every target creates .venv/ on first use from the pinned constraints; re-running is a no-op.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make test` builds the docs with --strict: broken links, missing API targets and docstring
# warnings fail. NO_MKDOCS_2_WARNING silences Material's notice about MkDocs 2 on every build.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

.PHONY: setup demo test test-fast lint docs bench clean

setup: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[deepspeed,peft,eval,sweep,dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/abkd-train $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check abkd_trainer tests benchmarks examples scripts
	$(MKDOCS) build --strict
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check abkd_trainer tests benchmarks examples scripts
	$(PY) -m ruff format --check abkd_trainer tests benchmarks examples scripts

# The documentation site, into build/site/ (mkdocs.yml); offline, no plugin fetches anything.
docs: $(STAMP)
	$(MKDOCS) build

BENCH_STAMP := $(VENV)/.bench-installed

# Liger-Kernel (and triton, ~1 GB) only for the benchmark's comparison cases.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/bench_divergence.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
