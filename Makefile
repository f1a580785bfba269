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

# ddpm-pipeline (flows/pipeline.py) on params.yaml's default profile (cpu): fetch and verify MNIST,
# train, evaluate, export to ONNX, sample with onnxruntime; log to MLflow (mlflow/ or
# $$MLFLOW_TRACKING_URI). A rerun resumes. `make pipeline PROFILE=gpu ARGS="train.steps=40000"`.
PROFILE ?=
ARGS ?=
pipeline: $(STAMP)
	$(PY) -m flows.pipeline $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
