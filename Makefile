# One place for the project's commands. TORCH pins the PyTorch release: on a CPU-only machine
# with a local CPU build of it (like our CI) pip takes that; elsewhere PyPI serves the CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# warm-up steps of the GPU training-step benchmark (targets are read after 100; fewer fit a short GPU lease)
GPU_WARM_STEPS ?= 100
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-slow test-triton bench gpu-check docs

install:
	$(PIP) "$(TORCH)" -e ".[examples]"

demo: install
	$(PYTHON) -m modula_mhc train --preset tiny

test:
	$(PIP) "$(TORCH)" -e ".[test]"
	$(PYTHON) -m ruff check modula_mhc tests examples benchmarks docs
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest -q

test-slow:
	$(PIP) "$(TORCH)" -e ".[test]"
	$(PYTHON) -m pytest -q -m slow

test-triton:
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m triton tests/test_kernels_triton.py

# The GPU set in one command (needs CUDA): compiled Triton kernels against the references, then the
# GPU benchmarks (JSON and plots under benchmarks/results/)
# no install step: the lent GPU machines have PyTorch, Triton, tqdm and matplotlib but no network
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh $(GPU_WARM_STEPS)

bench: install
	for f in benchmarks/bench_*.py; do $(PYTHON) $$f || exit 1; done

docs:
	$(PYTHON) docs/build_api.py
