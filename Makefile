# Two commands do all the set-up on a fresh machine (Python 3.11 + pip):
#   make demo   -> creates .venv, installs pinned dependencies, runs the end-to-end demo with a report
#   make test   -> creates .venv, installs pinned dependencies, lints and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench browser

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel here; an unpinned torch would pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ncppo demo

lint: $(STAMP)
	$(VENV)/bin/ruff check ncppo tests benchmarks docs

# the study's browser test drives Debian's chromium with Playwright (no browser download needed)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: no chromium; install Debian's chromium package for tests/test_study_browser.py"

test: lint browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py
