# Two entry points, each bootstraps its own virtualenv from nothing.
#   make demo   train the toy world with Euphonium on an embedded local Ray
#   make test   run the test suite (unit, Ray components and end-to-end runs; under 15 minutes on 2 cores);
#               installs Debian's prometheus as root, else stops at once with the command to run
#               (scripts/test_prereqs.sh). The suites marked slow run with `make test-slow`; CI runs both.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-suite test-slow lint venv vllm-env clean

venv: $(STAMP)

# vLLM (CPU build) lives in its own environment: it pins transformers below what the project uses.
VLLM_VENV ?= .venv-vllm
vllm-env:
	bash scripts/vllm_env.sh $(VLLM_VENV)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,video]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/euphonium-ray train --config configs/toy.yaml

# System packages first (installed as root with apt, else one line with the command to run), then the suite.
# Ray binds the machine's address; where we may, the tests run in a loopback-only network namespace.
test:
	PYTHON=$(PYTHON) sh scripts/test_prereqs.sh
	$(MAKE) --no-print-directory test-suite

test-suite: $(STAMP) vllm-env lint
	sh scripts/loopback.sh $(PY) -m pytest -q -m "not slow" tests

# The slow suites (long Ray runs end to end, fault injection, job submission, real Prometheus): still tests, run in
# CI after `make test` (.ci/run).
test-slow: $(STAMP) vllm-env
	sh scripts/loopback.sh $(PY) -m pytest -q -m slow tests

# The guards (pyproject.toml): ruff on the whole tree, mypy strict on sde.py, grpo.py and step.py.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) outputs .pytest_cache
