# Two commands do all the set-up on a fresh machine (Python 3.11+, npm and apt):
#   make pipeline   install (the venv, and web/'s npm packages), fetch the data, run the whole pipeline
#                   (the GPU profile where a CUDA device is found, else the CPU profile); then `ddpm web`
#   make test       install, run the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Installs take exactly the versions in requirements/linux-py<X.Y>.lock (with hashes), X.Y being
# the venv's Python; `make lock` regenerates the locks from pyproject.toml's ranges.
PYVER := $(shell $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK ?= requirements/linux-py$(PYVER).lock
PIP_VERSION := 26.3
UV_VERSION := 0.13.8
UV := $(VENV)/uv-$(UV_VERSION)/bin/uv
LOCK_PYTHONS := 3.11 3.12
LOCK_NOTE_3.11 := \# For the development and CI machines (Python 3.11; see ../shared/ENVIRONMENT.md).
LOCK_NOTE_3.12 := \# For Python 3.12 machines, such as a GPU host with internet (numpy, scipy and a few others resolve newer than on 3.11).

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install lock env-info data pipeline prefect-server deploy lint test test-all clean

# The lock is complete, so pip resolves nothing beyond it (and fails if it were not); the lock
# brings setuptools, which builds the editable project without an isolated build environment.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The sampling page's onnxruntime-web (`ddpm web`), exactly as web/package-lock.json pins it.
WEB_STAMP := web/node_modules/.installed
$(WEB_STAMP): web/package-lock.json web/package.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $(WEB_STAMP)

install: $(STAMP) $(WEB_STAMP)

requirements/linux-py%.lock:
	@echo "no lock for Python $*: run 'make lock LOCK_PYTHONS=$*' (or use Python $(LOCK_PYTHONS))" >&2; exit 1

# Re-resolve pyproject.toml's ranges (the test extra; requirements/constraints.txt caps torch) for
# Linux x86_64 with every file's hash from PyPI, keeping the current pins where they still fit.
# `make lock UPGRADE=1` takes the newest releases instead. Then run the tests.
lock: $(foreach v,$(LOCK_PYTHONS),lock-$(v))

lock-%: $(UV)
	$(UV) pip compile pyproject.toml --extra test -c requirements/constraints.txt \
	  --generate-hashes --python-version $* --python-platform x86_64-manylinux_2_28 \
	  --default-index https://pypi.org/simple --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade) \
	  -q -o requirements/linux-py$*.lock
	{ head -n 2 requirements/linux-py$*.lock; echo '$(LOCK_NOTE_$*)'; \
	  echo '# Linux x86_64 (glibc >= 2.28); torch is the CUDA build, which runs on CPU-only machines too.'; \
	  tail -n +3 requirements/linux-py$*.lock; } > requirements/linux-py$*.lock.tmp
	mv requirements/linux-py$*.lock.tmp requirements/linux-py$*.lock

$(UV):
	$(PYTHON) -m pip install -q --target $(VENV)/uv-$(UV_VERSION) uv==$(UV_VERSION)

# The machine's CPU flags and the versions that matter, printed at the top of `make test`.
env-info: $(STAMP)
	@$(PY) .ci/envinfo.py

# data/ for `dvc repro` on a fresh clone, where a bare `dvc pull` fails: the DVC remote (../ddpm-dvc-storage)
# holds data.dvc's version only after someone ran `dvc push` there. Pulled from it when it does, else
# fetched from the dataset's sources and checked against the SHA-256 pins of ddpm/data.py (the same
# files, so data.dvc then matches). One line says which.
data: $(STAMP)
	@if $(VENV)/bin/dvc pull -q data.dvc 2>/dev/null; then echo "data/: pulled from the DVC remote"; \
	else echo "data/: not in the DVC remote ($$($(VENV)/bin/dvc remote list | tr -s ' \t' ' ')); fetching it from its sources"; \
	$(PY) -m ddpm.cli data; fi

# ddpm-pipeline (flows/pipeline.py) on gpu-fast where torch sees a CUDA device, else params.yaml's
# default profile (cpu); PROFILE=cpu forces the CPU. It fetches and verifies MNIST, then
# train, evaluate, export to ONNX, sample with onnxruntime; log to MLflow (mlflow/ or
# $$MLFLOW_TRACKING_URI). A rerun resumes. `make pipeline PROFILE=gpu ARGS="train.steps=40000"`.
PROFILE ?= auto
ARGS ?=
pipeline: $(STAMP) $(WEB_STAMP)
	$(PY) -m flows.pipeline $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

# A Prefect server on loopback; prefect.toml (read from this folder) makes it stream flow-run logs to
# `prefect deployment run ... --watch`. Then `export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api`.
PREFECT_PORT ?= 4200
prefect-server: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# Create the work pools prefect.yaml names (kept when they exist) and deploy every deployment (flows/deploy.py).
deploy: $(STAMP)
	$(PY) -m flows.deploy

# ruff with pyproject.toml's [tool.ruff] settings; CI (.ci/run) runs it before the tests.
lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) $(WEB_STAMP) env-info
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf runs .pytest_cache
