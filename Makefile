# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing, install torch (reusing one that is already installed, otherwise the
# CPU build), the build and test dependencies and lowbit itself, then run.

PYTHON ?= python3
# The CPU build of torch comes from PyTorch's CPU index (or a local wheel of the same version).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc python -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: demo test bench install clean cuda-check browser

demo: $(STAMP)
	$(PY) -m lowbit.demo

test: $(STAMP) cuda-check browser
	$(PY) -m pytest -q tests

# Compiles the CUDA kernels (skipped without nvcc): CI has no GPU, this keeps them building.
cuda-check:
	bash .ci/cuda_compile_check.sh

# Chromium + chromedriver from apt when missing (the chat page's browser test; it skips where none can be had).
browser:
	bash .ci/browser.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py

install: $(STAMP)

$(STAMP): $(SOURCES)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the torch installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install --retries 1 --timeout 20 "$(TORCH_SPEC)" --index-url $(TORCH_INDEX) || \
	  $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install numpy safetensors tokenizers jinja2 gguf tqdm transformers sentencepiece pybind11 pytest \
	  nbclient nbformat ipykernel matplotlib "scikit-build-core>=0.10" ninja cmake \
	  fastapi "uvicorn[standard]" httpx openai selenium
	$(PY) -m pip install --no-build-isolation -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) build
