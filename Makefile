# Two commands do all the set-up on a fresh machine (Python 3.11+, npm and apt):
#   make pipeline   install, fetch the data, run the whole pipeline on the CPU profile
#   make test       install, run the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install pipeline test test-all clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

pipeline: $(STAMP)
	$(VENV)/bin/ddpm data
	$(VENV)/bin/ddpm train --resume
	$(VENV)/bin/ddpm sample --out runs/default/samples

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
